"""A first TPU study: SD3.5-medium DRaFT-K on (HPSv2.1, LAION aesthetic) at two weight vectors, plus the base.

    python -m launch submit --study=experiments/studies/sd35_tpu.py --workdir=$HOME/studies/sd35 \\
        --backend=tpu_vm --tpu_type=v5p-64 --zone=us-east5-a --spot --bucket=gs://BUCKET/alignax --max_hours=12

`:2` runs every point on two slices (`--num_slices=2`): the data axis spans them over DCN and FSDP stays
inside each slice. Set the paths in experiments/configs/sd35_reward_backprop.py (or pass gs:// ones with
the arm overrides below) before submitting: the workers read them.
"""

from __future__ import annotations

CONFIG = "experiments/configs/sd35_reward_backprop.py"


def get_study(arg: str = "") -> dict:
    from experiments.configs import sd35_reward_backprop
    slices = int(arg) if arg else 1
    rewards = sd35_reward_backprop.get_config().rewards.to_dict()
    return dict(
        rewards=rewards,
        judges=[],
        eval=dict(num_prompts=64, seeds=[0, 1]),
        overrides={"mesh.shape": (slices, -1, 1)},  # data over the slices, FSDP inside each
        arms=[dict(name="draft_k", config=CONFIG,
                   weights=dict(rewards=["hps", "aesthetic"], grid=[[0.7, 0.3], [0.3, 0.7]]))],
    )
