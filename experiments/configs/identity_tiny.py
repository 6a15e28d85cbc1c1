"""Train a tiny IResNet identity embedder with ArcFace on a generated identity world (16 face-like identities,
32x32, jittered in position, scale, brightness and noise); on CPU a few hundred steps take held-out
verification accuracy from about chance to well above it.

    python -m alignax.identity.train --config=experiments/configs/identity_tiny.py --workdir=/tmp/alignax_runs/id

For a real embedder, point it at aligned 112x112 face crops (one directory per identity) and use an r50:
    --config.data.generate='' --config.data.images=/data/faces --config.data.image_size=112
    --config.model.layers='(3,4,14,3)' --config.model.widths='(64,128,256,512)' --config.model.stem_width=64
    --config.model.embedding_size=512 --config.loss.scale=64 --config.loss.margin=0.5 ...
"""

from alignax.identity import train as train_id
from experiments.configs import common


def get_config(arg: str = ""):
    common.parse_options(arg, (), config_file=__file__)
    c = train_id.default_config()
    c.total_steps = 200
    c.batch_size = 64
    c.eval_batch_size = 64
    c.eval_every = 100
    c.log_every = 20
    c.checkpoint_every = 100
    c.augment.flip = False           # the synthetic identities are not mirror-symmetric
    c.loss.scale = 16.0              # 16 classes: s = 64 would saturate the softmax of a tiny net from the start
    c.loss.margin = 0.3
    c.model.layers = (1, 1, 1, 1)
    c.model.widths = (8, 16, 32, 64)
    c.model.stem_width = 8
    c.model.embedding_size = 32
    c.data.generate = "synthetic"
    c.data.synthetic = dict(num_identities=16, images_per_identity=20, image_size=32, num_validation=4, num_test=4)
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 5e-4
    c.optim.grad_clip_norm = 5.0
    return c
