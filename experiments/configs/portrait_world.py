"""Alignment runs on the portrait world (alignax.world): LoRA on its sft-pretrained SD3 pipeline, with its
rewards, all trained in alignax. The world's datasets are generated once into the cache.

    python -m alignax.train --config=experiments/configs/portrait_world.py --workdir=DIR    # reward_backprop
    python -m alignax.train --config=experiments/configs/portrait_world.py:dpo --workdir=DIR
    ... :feature_align, :sft

Rewards (higher is better):
- `aesthetic`: the world's preference scorer (HPSv2-style CLIP fine-tuned on preference pairs that favour
  an "ideal" face, warm light and symmetry — in part against identity), read as PickScore;
- `identity`: the world's ArcFace IResNet, cosine to the requested person's reference portraits, faces
  aligned by the world's fixed landmarks;
- `alignment`: the world CLIP's CLIP score of the caption.
`reward_backprop` trains on their weighted sum (DRaFT-K, K=1; `--config.pareto.weights.<name>=w`), each reward
normalised by running statistics.
`feature_align` is sft plus projector heads on the image stream supervised by the world CLIP's projected
patch and pooled features (precomputed into the dataset; the heads are dropped at export).

Set `ALIGNAX_WORLD=DIR` to run on another built world than the shipped one.
"""

from __future__ import annotations

import ml_collections

from alignax import config as config_lib
from alignax.errors import ConfigError
from alignax.world import paths, portraits
from alignax.world.pipeline import MAX_SEQUENCE_LENGTH
from experiments.configs import common

OBJECTIVES = ("reward_backprop", "dpo", "feature_align", "sft")
TRAINED_REWARDS = ("aesthetic", "identity", "alignment")


def rewards(world: paths.WorldPaths, size: int) -> dict[str, dict]:
    """The world's rewards and held-out judges, as `config.rewards` / study `rewards` entries."""
    points = portraits.canonical_landmarks(size).tolist()
    face = dict(kind="identity", embedder=str(world.identity), landmarks="fixed", points=points,
                reference_size=[size, size])
    return {
        "aesthetic": dict(kind="pickscore", checkpoint=str(world.aesthetic)),
        "identity": dict(face, references=str(world.references)),
        "alignment": dict(kind="clip_score", checkpoint=str(world.clip)),
        # held-out judges: no arm trains on them
        "realism": dict(kind="realism", clip=str(world.clip), stats=str(world.realism_stats)),
        "identity_unseen": dict(face, references=str(world.unseen_references)),
    }


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    options = common.parse_options(arg, OBJECTIVES, config_file=__file__)
    if len(options) > 1:
        raise ConfigError(f"portrait_world.py:{arg}: name one objective of {list(OBJECTIVES)}, not {len(options)}")
    objective = options[0] if options else "reward_backprop"
    world = paths.default_world()
    recipe = world.read_manifest()["recipe"]  # a ConfigError naming the directory when no world is built there
    size, layers = int(recipe["image_size"]), int(recipe["transformer"]["num_layers"])

    c = config_lib.base_config()
    c.total_steps, c.batch_size = 40, 8
    c.log_every, c.checkpoint_every, c.keep_checkpoints, c.eval_every = 5, 20, 2, 0
    c.model.pretrained = str(world.pipeline)
    c.data.generate = "portrait_world"
    c.text.use_t5 = False
    c.text.max_sequence_length = MAX_SEQUENCE_LENGTH
    c.lora.enabled, c.lora.rank, c.lora.alpha = True, 8, 8.0
    c.optim.learning_rate, c.optim.warmup_steps = 2e-3, 2
    c.sample.num_steps, c.sample.guidance_scale, c.sample.num_images = 10, 1.0, 4
    c.objective = ml_collections.ConfigDict(dict(name=objective))
    if objective == "reward_backprop":
        c.objective.mode, c.objective.k = "draft_k", 1
        c.sample.num_steps = 8
        trained = rewards(world, size)
        for name in TRAINED_REWARDS:
            c.rewards[name] = trained[name]
        c.pareto.weights = ml_collections.ConfigDict(dict(aesthetic=1.0, identity=1.0, alignment=0.0))
        # The scores live on different scales (a PickScore-style logit, a cosine, 100 x cosine): each is divided
        # by its running std, so the weights, not the units, set the trade-off.
        c.pareto.normalization = common.running_normalization(TRAINED_REWARDS)
    elif objective == "dpo":
        c.objective.beta = 500.0
        c.objective.sample_posterior = False
    elif objective == "feature_align":
        c.objective.targets = "batch"
        c.objective.target_dim = int(recipe["clip_projection"])  # the world CLIP's joint width
        c.objective.blocks = (min(1, layers - 1),)  # an early block, as REPA aligns (the 2nd of 4)
        c.objective.granularities = ("global", "regional", "token")
        c.objective.regional_grids = (2,)
        c.objective.global_image = True
        c.objective.head_hidden = 64
        c.objective.align_weight = 0.5
        c.objective.sample_posterior = False
    else:
        c.objective.sample_posterior = False
    return c
