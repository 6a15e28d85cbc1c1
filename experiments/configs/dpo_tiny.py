"""Diffusion-DPO of a random tiny MM-DiT on the tiny world's preference pairs; ~20 steps on CPU.

    python -m alignax.train --config=experiments/configs/dpo_tiny.py --workdir=/tmp/alignax_runs/dpo_tiny
    python -m alignax.train --config=experiments/configs/dpo_tiny.py:lora ...     # reference = base, LoRA off
    python -m alignax.train --config=experiments/configs/dpo_tiny.py:online ...   # reference refreshed every 5 steps
"""

from experiments.configs import common


def get_config(arg: str = ""):
    options = common.parse_options(arg, ("lora", "online"), config_file=__file__)
    c = common.tiny_run(total_steps=20)
    c.objective.name = "dpo"
    c.objective.beta = 100.0
    c.objective.sample_posterior = False  # the random tiny VAE's posterior std is ~1: train on its mean
    if "online" in options:
        c.objective.reference_refresh_every = 5
    if "lora" in options:
        common.tiny_lora(c)
    return c
