"""The main job: a Pareto study of the alignment objectives on the portrait world (alignax.world).

    python -m alignax.study --study=experiments/studies/portrait_world.py --workdir=/tmp/alignax/portrait

Every arm starts from the world's sft-pretrained SD3 pipeline and trains LoRA adapters, at one budget:
- `reward_backprop-draft_k`: DRaFT-K (K=1) on (aesthetic, identity, alignment), three weight vectors from
  aesthetic-heavy to identity-heavy — the aesthetic scorer prefers an "ideal" face, which is not the
  requested person's, so the vectors trace the trade-off between the two;
- `dpo`: Diffusion-DPO on the world's preference pairs (the pairs the aesthetic scorer learnt from), so
  its target is aesthetic;
- `feature_align`: sft plus the vision-aligned feature loss (the world CLIP's features as targets); its
  target is alignment, the world CLIP's score;
- `sft`: the same data and steps without it (target alignment too, for the comparison);
plus the base point (the pretrained pipeline itself). Held-out judges, trained on by no arm: `realism`
(how typical the world CLIP finds the samples of held-out real portraits) and `identity_unseen` (the
identity reward against reference portraits no arm compares with).

Sized for 2 CPU cores (about 15 minutes with --parallel=2, the default here): `arg` scales the steps
(`portrait_world.py:2` doubles them).
"""

from __future__ import annotations

from alignax.world import paths
from experiments.configs.portrait_world import rewards

CONFIG = "experiments/configs/portrait_world.py"
JUDGES = ("realism", "identity_unseen")


def get_study(arg: str = "") -> dict:
    scale = float(arg) if arg else 1.0
    world = paths.default_world()
    size = int(world.read_manifest()["recipe"]["image_size"])  # ConfigError naming the directory if none is built
    steps = max(2, int(round(24 * scale)))
    return dict(
        rewards=rewards(world, size),
        judges=list(JUDGES),
        eval=dict(num_prompts=16, seeds=[0, 1]),
        export_best=True,
        overrides={"total_steps": steps, "checkpoint_every": steps, "log_every": max(1, steps // 6), "eval_every": 0},
        arms=[
            dict(name="reward_backprop-draft_k", config=f"{CONFIG}:reward_backprop",
                 weights=dict(rewards=["aesthetic", "identity", "alignment"],
                              grid=[[0.8, 0.1, 0.1], [0.45, 0.45, 0.1], [0.1, 0.8, 0.1]])),
            dict(name="dpo", config=f"{CONFIG}:dpo", targets=["aesthetic"]),
            dict(name="feature_align", config=f"{CONFIG}:feature_align", targets=["alignment"]),
            dict(name="sft", config=f"{CONFIG}:sft", targets=["alignment"]),
        ],
    )
