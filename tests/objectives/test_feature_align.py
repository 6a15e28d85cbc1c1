"""feature_align: λ = 0 is sft, pooling parity, heads never exported, alignment learns, sharded resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors import safe_open

from alignax import objectives
from alignax.errors import DataError
from alignax.objectives import feature_align
from tests.parity import max_rel_err
from tests.training.conftest import assert_trees_equal, tiny_world  # noqa: F401  (session fixture)
from tests.training.test_trainer import make_trainer

ALIGN = {"objective.name": "feature_align", "objective.targets": "random_projection", "objective.blocks": (0, 1),
         "objective.global_image": True, "objective.head_hidden": 32, "objective.target_dim": 32,
         "objective.target_grid": 4, "objective.align_weight": 1.0}


def numpy_head(params, x):
    silu = lambda v: v / (1.0 + np.exp(-v))  # noqa: E731
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = silu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def numpy_cos_distance(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float(np.mean(1.0 - np.sum(a * b, axis=-1)))


def numpy_regions(grid, g):
    """(B, n, n, D) → (B, g*g, D) by explicit loops over the cells."""
    b, n, _, d = grid.shape
    c = n // g
    out = np.zeros((b, g * g, d))
    for i in range(g):
        for j in range(g):
            out[:, i * g + j] = grid[:, i * c:(i + 1) * c, j * c:(j + 1) * c].mean(axis=(1, 2))
    return out


def numpy_upsample_bilinear(grid, size):
    """Half-pixel-centre bilinear upsampling with edge clamping, axis by axis."""
    def along(x, axis, out):
        n = x.shape[axis]
        pos = np.clip((np.arange(out) + 0.5) * n / out - 0.5, 0, n - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = (pos - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        return np.take(x, lo, axis) * (1 - w) + np.take(x, hi, axis) * w
    return along(along(grid, 1, size), 2, size)


def test_granularity_terms_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    batch, tokens, width, dim, patches = 2, 16, 8, 6, 4  # 4×4 token grid, 2×2 patch grid
    cfg = ml_collections.ConfigDict(dict(blocks=(1,), granularities=("global", "regional", "token"),
                                         regional_grids=(2,), global_image=True))
    heads = {"block_1": {g: {"fc1": {"kernel": rng.normal(size=(width, 5)), "bias": rng.normal(size=5)},
                             "fc2": {"kernel": rng.normal(size=(5, dim)), "bias": rng.normal(size=dim)}}
                         for g in cfg.granularities}}
    hidden = rng.normal(size=(batch, tokens, width))
    targets = {"text": rng.normal(size=(batch, dim)), "image": rng.normal(size=(batch, dim)),
               "patches": rng.normal(size=(batch, patches, dim))}
    as32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    terms = feature_align.alignment_terms(cfg, as32(heads), {1: jnp.asarray(hidden, jnp.float32)}, as32(targets))

    patch_grid = targets["patches"].reshape(batch, 2, 2, dim)
    glob = numpy_head(heads["block_1"]["global"], hidden).mean(axis=1)
    regional = numpy_head(heads["block_1"]["regional"], hidden).reshape(batch, 4, 4, dim)
    token = numpy_head(heads["block_1"]["token"], hidden).reshape(batch, 4, 4, dim)
    expected = {
        "block_1/global_text": numpy_cos_distance(glob, targets["text"]),
        "block_1/global_image": numpy_cos_distance(glob, targets["image"]),
        "block_1/regional_2x2": numpy_cos_distance(numpy_regions(regional, 2), numpy_regions(patch_grid, 2)),
        "block_1/token": numpy_cos_distance(token, numpy_upsample_bilinear(patch_grid, 4)),
    }
    assert sorted(terms) == sorted(expected)
    for name, value in expected.items():
        assert abs(float(terms[name]) - value) <= 1e-5 * max(abs(value), 1e-3), name
    # The pooling alone, on a 4×4 grid into 4×4 and 2×2 regions.
    grid = rng.normal(size=(batch, 4, 4, dim)).astype(np.float32)
    for g in (2, 4):
        np.testing.assert_allclose(np.asarray(feature_align.pool_regions(jnp.asarray(grid), g, "test")),
                                   numpy_regions(grid.astype(np.float64), g), rtol=1e-5, atol=1e-6)


def test_batch_targets_name_the_missing_field():
    cfg = ml_collections.ConfigDict(dict(global_image=False))
    with pytest.raises(DataError, match="siglip_patch_embeds"):
        feature_align.batch_targets(cfg)({}, {"siglip_text_embeds": jnp.zeros((2, 4))})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_world):  # noqa: F811
    trainer = make_trainer(tmp_path_factory.mktemp("fa"), tiny_world, name="fa", **ALIGN)
    batch = trainer.device_batch(trainer.make_loader().batch_at(0))
    return trainer, batch


def test_lambda_zero_equals_sft_exactly(setup):
    trainer, batch = setup
    state = trainer.initial_state()
    trainable = jax.device_get(state["trainable"])
    sft = objectives.build(ml_collections.ConfigDict(dict(name="sft", sample_posterior=False)), trainer.models)
    cfg = objectives.with_defaults(ml_collections.ConfigDict(
        {k.removeprefix("objective."): v for k, v in {**ALIGN, "objective.align_weight": 0.0}.items()}))
    cfg.sample_posterior = False
    zero = feature_align.make_objective(cfg, trainer.models)
    rng = jax.random.key(11)
    grad = lambda objective: jax.jit(jax.value_and_grad(objective.loss, has_aux=True))(  # noqa: E731
        trainable, trainer.frozen, {}, batch, rng)
    (sft_loss, _), sft_grads = grad(sft)
    (loss, (metrics, _)), grads = grad(zero)
    assert float(loss) == float(sft_loss) and float(metrics["sft_loss"]) == float(sft_loss)
    assert_trees_equal(grads["transformer"], sft_grads["transformer"])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["heads"]))
    # With λ > 0 the SFT part still draws the same noise and t as `sft`.
    (_, (aligned, _)), _ = grad(trainer.objective)
    assert abs(float(aligned["sft_loss"]) - float(sft_loss)) <= 1e-6 * float(sft_loss)
    assert float(aligned["align_loss"]) > 0


def test_heads_are_absent_from_the_diffusers_export(tmp_path, tiny_world):  # noqa: F811
    """A feature_align run, exported by the `alignax.export` CLI as users run it: exactly diffusers' own
    parameter names (nothing of the heads), loaded by diffusers unchanged, equal to the trained MM-DiT."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from diffusers import SD3Transformer2DModel

    from tests import reference_models as ref
    trainer = make_trainer(tmp_path, tiny_world, name="fa_run", total_steps=2, checkpoint_every=2, **ALIGN)
    state = trainer.run().state
    assert jax.tree.leaves(state["trainable"]["heads"])
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-m", "alignax.export", f"--workdir={tmp_path / 'fa_run'}",
                           f"--out={tmp_path / 'export'}"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    keys = set()
    for path in (tmp_path / "export").glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            keys |= set(f.keys())
    config = dict(trainer.config.model.transformer.to_dict())
    assert keys == set(SD3Transformer2DModel(**config).state_dict())
    torch_model = SD3Transformer2DModel.from_pretrained(tmp_path / "export").eval()
    inputs = ref.transformer_inputs(config)
    params = jax.device_get(state["trainable"]["transformer"])
    ours = trainer.models.transformer.apply({"params": params}, *(jnp.asarray(inputs[k]) for k in (
        "hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")))
    theirs = ref.run_torch_transformer(torch_model, inputs)
    assert max_rel_err(np.asarray(ours), theirs) <= 1e-5


def test_alignment_loss_falls_on_a_fixed_batch(setup):
    trainer, batch = setup
    step = trainer.compile(batch)
    state = trainer.initial_state()

    @jax.jit
    def align_loss(trainable):  # fixed draws of noise and t
        return jnp.mean(jnp.stack([trainer.objective.loss(trainable, trainer.frozen, {}, batch, r)[1][0]["align_loss"]
                                   for r in jax.random.split(jax.random.key(5), 4)]))

    initial = float(align_loss(state["trainable"]))
    for _ in range(30):
        state, _ = step(state, trainer.frozen, batch)
    final = float(align_loss(state["trainable"]))
    assert final < 0.6 * initial, (initial, final)


def test_feature_align_runs_sharded_and_resumes_exactly(tmp_path, tiny_world):  # noqa: F811
    overrides = dict(total_steps=4, **ALIGN)
    straight = make_trainer(tmp_path, tiny_world, (2, 2, 2), name="straight", **overrides).run()
    first = make_trainer(tmp_path, tiny_world, (2, 2, 2), name="resumed", **overrides).run(stop_after=3)
    assert first.final_step == 3
    resumed = make_trainer(tmp_path, tiny_world, (2, 2, 2), name="resumed", **overrides).run()
    assert resumed.final_step == 4
    for part in ("trainable", "opt_state", "rng", "step"):
        assert_trees_equal(resumed.state[part], straight.state[part])
    kernel = resumed.state["trainable"]["heads"]["block_0"]["token"]["fc1"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape  # the heads are sharded too
