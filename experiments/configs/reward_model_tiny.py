"""Train a tiny random CLIP into a preference scorer on the generated tiny world's pairs (the preferred
image is the more saturated one); a few hundred CPU steps take held-out accuracy from ~50% to >90%.

    python -m alignax.reward_model.train --config=experiments/configs/reward_model_tiny.py --workdir=/tmp/rm
    python -m alignax.reward_model.train --config=experiments/configs/reward_model_tiny.py:frozen_text ...

For a real run, start from a downloaded CLIP and a Pick-a-Pic style dataset instead:
    --config.model.pretrained=/ckpt/CLIP-ViT-H-14-laion2B-s32B-b79K --config.data.generate=''
    --config.data.path=/data/pick_a_pic_v2 --config.preprocessing=hpsv2 ...
"""

from alignax.reward_model import train as train_reward
from experiments.configs import common


def get_config(arg: str = ""):
    options = common.parse_options(arg, ("frozen_text",), config_file=__file__)
    c = train_reward.default_config()
    c.total_steps = 200
    c.batch_size = 32
    c.eval_batch_size = 64
    c.eval_every = 50
    c.log_every = 10
    c.data.generate = "tiny_world"
    c.data.tiny_world = dict(image_size=32, num_train=256, num_eval=64)
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 1.0
    if "frozen_text" in options:
        # HPSv2 style: train the image side, keep the text tower's embeddings fixed.
        c.optim.frozen = (r"^text_model/embeddings/",)
    return c
