"""SFT (rectified flow) of a random tiny MM-DiT on the generated tiny world; ~20 steps on CPU.

    python -m alignax.train --config=experiments/configs/sft_tiny.py --workdir=/tmp/alignax_runs/sft_tiny
    python -m alignax.train --config=experiments/configs/sft_tiny.py:lora ...   # LoRA + EMA variant
"""

from experiments.configs import common


def get_config(arg: str = ""):
    options = common.parse_options(arg, ("lora", "ema"), config_file=__file__)
    c = common.tiny_run(total_steps=20)
    c.objective.name = "sft"
    c.objective.sample_posterior = False  # the random tiny VAE's posterior std is ~1: train on its mean
    if "lora" in options:
        common.tiny_lora(c)
    if "ema" in options:
        c.ema.enabled = True
        c.ema.decay = 0.9
    return c
