"""SFT + vision-aligned feature loss of a random tiny MM-DiT on the tiny world; ~20 steps on CPU.

The tiny world has no SigLIP 2 features, so the targets are a fixed random projection of the
clean image's pixel patches (4×4 grid) and of the pooled caption embedding
(`targets='random_projection'`); real runs precompute SigLIP 2 features into the batch
(`targets='batch'`).

    python -m alignax.train --config=experiments/configs/feature_align_tiny.py --workdir=/tmp/alignax_runs/fa_tiny
"""

from experiments.configs import common


def get_config(arg: str = ""):
    common.parse_options(arg, (), config_file=__file__)
    c = common.tiny_run(total_steps=20)
    c.objective.name = "feature_align"
    c.objective.sample_posterior = False  # the random tiny VAE's posterior std is ~1: train on its mean
    c.objective.align_weight = 0.5
    c.objective.blocks = (0, 1)
    c.objective.granularities = ("global", "regional", "token")
    c.objective.regional_grids = (2, 4)
    c.objective.global_image = True
    c.objective.head_hidden = 32
    c.objective.target_dim = 32
    c.objective.targets = "random_projection"
    c.objective.target_grid = 4
    return c
