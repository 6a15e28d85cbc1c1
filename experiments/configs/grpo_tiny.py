"""Flow-GRPO on a random tiny MM-DiT with the two conflicting toy rewards of reward_backprop_tiny; ~20 steps on CPU.

    python -m alignax.train --config=experiments/configs/grpo_tiny.py --workdir=/tmp/alignax_runs/grpo_tiny
    python -m alignax.train --config=experiments/configs/grpo_tiny.py:fast,kl,lora,running ...

Options (comma-separated): `fast` is Flow-GRPO-Fast (SDE and training on 2 of the 4 sampler steps);
`kl` adds the KL penalty to the start model; `lora` trains LoRA adapters; `running` normalises each reward
by running statistics; `host` adds `attribute_match`, a non-differentiable reward computed on the host.
"""

import ml_collections

from experiments.configs import common

OPTIONS = ("fast", "kl", "lora", "running", "host")


def get_config(arg: str = ""):
    options = common.parse_options(arg, OPTIONS, config_file=__file__)
    c = common.tiny_run(total_steps=20)
    c.objective.name = "grpo"
    c.objective.group_size = 4
    c.objective.noise_level = 0.7
    c.objective.clip_range = 0.2
    c.sample.num_steps = 4
    if "fast" in options:
        c.objective.sde_window = (1, 3)
    c.rewards.red = dict(kind="channel_share", channel=0)
    c.rewards.blue = dict(kind="channel_share", channel=2)
    c.pareto.weights = ml_collections.ConfigDict(dict(red=0.5, blue=0.5))
    if "host" in options:
        c.rewards.attributes = dict(kind="attribute_match")
        c.pareto.weights.attributes = 0.5
    if "kl" in options:
        c.objective.kl_beta = 0.04
    if "lora" in options:
        common.tiny_lora(c)
    if "running" in options:
        c.pareto.normalization = common.running_normalization(c.rewards)
    return c
