"""DRaFT-style reward backprop of SD3.5-medium against HPSv2.1 and the LAION aesthetic score, with LoRA.

The full-size run, for a TPU pod (FSDP over every device, bf16 compute, per-block remat):

    python -m alignax.train --config=experiments/configs/sd35_reward_backprop.py \\
        --config.model.pretrained=/data/stable-diffusion-3.5-medium \\
        --config.data.path=/data/prompts \\
        --config.rewards.hps.checkpoint=/data/HPS_v2.1_compressed.pt \\
        --config.rewards.hps.tokenizer=/data/clip-vit-h-14-tokenizer \\
        --config.rewards.aesthetic.checkpoint=/data/sac+logos+ava1-l14-linearMSE.pth \\
        --config.rewards.aesthetic.clip=/data/clip-vit-large-patch14 \\
        --config.pareto.weights.hps=0.7 --config.pareto.weights.aesthetic=0.3 --workdir=DIR

`:runlocal` is the same experiment shrunk for a CPU (big_vision's convention): the tiny world,
a random tiny MM-DiT, and the two toy rewards in place of the two reward models, so the same
trainer, objective and scalarisation run end to end in about a minute.
"""

import ml_collections

from experiments.configs import common

# The paths a user must set: missing files are refused, naming the field, before anything compiles.
MODEL_PATH = "/path/to/stable-diffusion-3.5-medium"


def get_config(arg: str = ""):
    options = common.parse_options(arg, ("runlocal",), config_file=__file__)
    if "runlocal" in options:
        c = common.tiny_run(total_steps=20)
        c.rewards.hps = dict(kind="channel_share", channel=0)
        c.rewards.aesthetic = dict(kind="channel_share", channel=2)
        c.sample.num_steps = 4
    else:
        c = common.tiny_run(total_steps=2000, batch_size=64)
        c.data.generate = ""
        c.data.path = "/path/to/prompts"       # a `prompts` dataset (alignax.data.write_prompts)
        c.model.pretrained = MODEL_PATH
        c.model.compute_dtype = "bfloat16"
        c.model.remat = "full"                 # per MM-DiT block; each sampler step is remat'ed as well
        # Flash attention (Pallas splash): XLA's attention writes every score to HBM, which bounds this step at
        # ~33% MFU on v5p-64 on paper (docs/performance.md); not yet timed on a TPU: `=xla` is the fallback.
        c.model.attention = "splash"
        c.mesh.shape = (1, -1, 1)              # FSDP over every device
        c.log_every, c.checkpoint_every, c.keep_checkpoints, c.eval_every = 10, 200, 3, 200
        c.rewards.hps = dict(kind="hpsv2.1", checkpoint="/path/to/HPS_v2.1_compressed.pt",
                             tokenizer="/path/to/clip-vit-h-14-tokenizer")
        c.rewards.aesthetic = dict(kind="aesthetic", checkpoint="/path/to/sac+logos+ava1-l14-linearMSE.pth",
                                   clip="/path/to/clip-vit-large-patch14")
        c.sample.num_steps = 20
        c.sample.guidance_scale = 4.5
        c.optim.learning_rate = 3e-4
        c.optim.warmup_steps = 50
    c.objective.name = "reward_backprop"
    c.objective.mode = "draft_k"
    c.objective.k = 1
    c.objective.kl_weight = 0.01               # drift penalty against the start model: the remedy for reward hacking
    c.lora.enabled = "runlocal" not in options  # LoRA needs a pretrained base (a random one is adaLN-Zero)
    c.lora.rank, c.lora.alpha = 32, 32.0
    c.pareto.weights = ml_collections.ConfigDict(dict(hps=0.5, aesthetic=0.5))
    c.pareto.normalization = common.running_normalization(("hps", "aesthetic"), momentum=0.99)
    return c
