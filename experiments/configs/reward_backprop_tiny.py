"""Reward backpropagation on a random tiny MM-DiT with two conflicting toy rewards; ~20 steps on CPU.

Red share against blue share of each pixel (`channel_share`, channels 0 and 2): a real conflict, as
no image maximises both, so the weight vector picks a point on the trade-off.

    python -m alignax.train --config=experiments/configs/reward_backprop_tiny.py --workdir=/tmp/alignax_runs/rb_tiny
    python -m alignax.train --config=experiments/configs/reward_backprop_tiny.py:draft_k ...   # any mode name
    python -m alignax.train --config=experiments/configs/reward_backprop_tiny.py:refl,kl,lora,running ...
    ... --config.pareto.weights.red=0.25 --config.pareto.weights.blue=0.75

Options (comma-separated): a mode (full, draft_k, random_k, draft_lv, refl); `kl` adds the drift
penalty against the start model; `lora` trains LoRA adapters; `running` normalises each reward
by running statistics; `chebyshev` scalarises with the running ideal point; `mgda` balances the two
rewards' gradients (MGDA's min-norm combination steered by the weights; one backward per reward).
"""

import ml_collections

from alignax.errors import ConfigError
from alignax.objectives import reward_backprop
from experiments.configs import common

FLAGS = ("kl", "lora", "running", "chebyshev", "mgda")


def get_config(arg: str = ""):
    options = common.parse_options(arg, (*reward_backprop.MODES, *FLAGS), config_file=__file__)
    modes = [o for o in options if o in reward_backprop.MODES]
    if len(modes) > 1:
        raise ConfigError(f"reward_backprop_tiny.py:{arg}: options name {len(modes)} modes {modes}; give one")
    c = common.tiny_run(total_steps=20)
    c.objective.name = "reward_backprop"
    c.objective.mode = modes[0] if modes else "full"
    c.objective.k = 2
    c.objective.k_max = 3
    c.objective.lv_n = 2
    c.sample.num_steps = 4
    c.rewards.red = dict(kind="channel_share", channel=0)
    c.rewards.blue = dict(kind="channel_share", channel=2)
    c.pareto.weights = ml_collections.ConfigDict(dict(red=0.5, blue=0.5))
    if "kl" in options:
        c.objective.kl_weight = 0.1
    if "lora" in options:
        common.tiny_lora(c)
    if "running" in options:
        c.pareto.normalization = common.running_normalization(("red", "blue"))
    if "chebyshev" in options and "mgda" in options:
        raise ConfigError(f"reward_backprop_tiny.py:{arg}: options chebyshev and mgda are two scalarisations; give one")
    if "chebyshev" in options:
        c.pareto.scalarization = "chebyshev"
    if "mgda" in options:
        c.pareto.scalarization = "mgda"
    return c
