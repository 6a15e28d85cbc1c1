"""The tiny world's Pareto study: four objectives on one front, judged by rewards none of them trains on.

    python -m alignax.study --study=experiments/studies/tiny.py --workdir=/tmp/alignax_runs/study_tiny --parallel=2

Arms (all from the same random tiny MM-DiT, seed 0, so the base point is every arm's start):
- `reward_backprop` (full backprop through the sampler), `reward_backprop-draft_k` (DRaFT-K) and
  `reward_backprop-mgda` (full, gradient-balanced instead of the weighted sum): red share against blue share
  (`channel_share` 0 / 2), three weight vectors each (simplex lattice: 1-0, 0.5-0.5, 0-1);
- `grpo` (Flow-GRPO, online RL: group-relative advantages of the same weighted rewards), three weight vectors;
- `dpo`, `feature_align` and `sft`: one point each (they train on no reward).
Held-out judges: `green` (green share, which both training rewards push down) and `brightness`.

Sized for a 2-core CPU: `total_steps=8` (arg: another number, e.g. `tiny.py:4`), sample grids off during
training (the evaluation makes its own), 4 eval prompts × 2 seeds.
"""

from __future__ import annotations

CONFIGS = "experiments/configs"
TRAINED = dict(red=dict(kind="channel_share", channel=0), blue=dict(kind="channel_share", channel=2))
JUDGES = dict(green=dict(kind="channel_share", channel=1), brightness=dict(kind="brightness"))


def get_study(arg: str = "") -> dict:
    steps = int(arg) if arg else 8
    weights = dict(rewards=["red", "blue"], grid="simplex:3")
    return dict(
        rewards={**TRAINED, **JUDGES},
        judges=list(JUDGES),
        eval=dict(num_prompts=4, seeds=[0, 1]),
        overrides={"total_steps": steps, "checkpoint_every": max(1, steps // 2), "log_every": 1,
                   "eval_every": 0},
        arms=[
            dict(name="reward_backprop", config=f"{CONFIGS}/reward_backprop_tiny.py", weights=weights),
            dict(name="reward_backprop-draft_k", config=f"{CONFIGS}/reward_backprop_tiny.py:draft_k",
                 weights=weights),
            dict(name="reward_backprop-mgda", config=f"{CONFIGS}/reward_backprop_tiny.py:mgda", weights=weights),
            dict(name="grpo", config=f"{CONFIGS}/grpo_tiny.py", weights=weights),
            dict(name="dpo", config=f"{CONFIGS}/dpo_tiny.py"),
            dict(name="feature_align", config=f"{CONFIGS}/feature_align_tiny.py"),
            dict(name="sft", config=f"{CONFIGS}/sft_tiny.py"),
        ],
    )
