"""FLOPs per prompt of SD3's prompt encoding at the real sizes (CLIP-L + OpenCLIP bigG + T5-XXL).

    python -m experiments.benchmarks.text_encoder_flops [--batch=8] [--max_sequence_length=256]

No weights are needed: the modules are built from the published configs, their params exist only as
shapes (`jax.eval_shape`), and the jitted `TextEncoders` program is lowered and compiled for those
shapes; XLA's cost analysis gives the FLOPs. Also prints the params' bytes in fp32 (what must be sharded).
The last line is `flops_per_prompt=<x> params_gb_fp32=<y>`.
"""

from __future__ import annotations

import argparse
import types

import jax
import jax.numpy as jnp
import numpy as np

from alignax.conditioning import text_encoders
from alignax.models import clip, t5

CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=49406,
                   eos_token_id=49407, pad_token_id=1)
CLIP_L = dict(CLIP_COMMON, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(CLIP_COMMON, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6)


def abstract(module, length: int):
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, length), jnp.int32))
    return variables["params"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_sequence_length", type=int, default=256)
    args = parser.parse_args()

    modules = [clip.build_text_model(CLIP_L), clip.build_text_model(CLIP_G), t5.build(T5_XXL)]
    lengths = [77, 77, args.max_sequence_length]
    params = tuple(abstract(m, n) for m, n in zip(modules, lengths, strict=True))
    models = [types.SimpleNamespace(module=m) for m in modules]
    encode = text_encoders._encode_fn(models, -2, args.max_sequence_length, T5_XXL["d_model"])
    ids = [jax.ShapeDtypeStruct((args.batch, n), jnp.int32) for n in lengths]
    compiled = jax.jit(encode).lower(params, *ids).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost["flops"]) / args.batch
    sizes = [sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p)) for p in params]
    out = jax.eval_shape(encode, params, *ids)
    print(f"prompt_embeds {out[0].shape}, pooled {out[1].shape}")
    for name, n in zip(("CLIP-L", "OpenCLIP bigG", "T5-XXL"), sizes, strict=True):
        print(f"{name:14s} {n / 1e6:8.1f} M params  {4 * n / 1e9:6.2f} GB fp32")
    print(f"flops_per_prompt={flops:.4g} params_gb_fp32={4 * sum(sizes) / 1e9:.2f}")


if __name__ == "__main__":
    main()
