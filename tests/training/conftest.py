"""Shared fixtures for training tests: one generated tiny world and a tiny SFT config."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from alignax.data import setup as data_setup
from experiments.configs import common


def tiny_config(total_steps: int = 6, **overrides):
    c = common.tiny_run(total_steps=total_steps, batch_size=8)
    c.log_every = 1
    c.checkpoint_every = 3
    c.eval_every = 0
    c.data.generate = ""
    c.mesh.shape = (1, 1, 1)
    c.objective.sample_posterior = False
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from alignax.data import build_tiny_world
    root = tmp_path_factory.mktemp("tiny_world")
    build_tiny_world(root, num_train=32, num_eval=8, **data_setup.tiny_world_sizes(tiny_config()))
    return str(root)


def devices(n: int):
    return jax.devices()[:n]


def assert_trees_equal(a, b):
    """Bit-exact, leaf by leaf."""
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y)),
                                      err_msg=jax.tree_util.keystr(path))


def tree_max_rel_err(a, b) -> float:
    """max |a − b| / max |b| over the whole tree: the parity measure of tests/parity.py, tree-wide.

    Tree-wide because Adam normalises each element's update by its own gradient scale, so a
    zero-initialised param whose gradients are ~1e-8 turns a reduction-order difference into
    a large *element-wise* relative change while being negligible for the model."""
    a_leaves = [np.asarray(jax.device_get(x), np.float64) for x in jax.tree.leaves(a)]
    b_leaves = [np.asarray(jax.device_get(x), np.float64) for x in jax.tree.leaves(b)]
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a_leaves, b_leaves, strict=True))
    scale = max(float(np.abs(y).max()) for y in b_leaves)
    return diff / scale


@pytest.fixture(scope="session")
def pretrained_root(tmp_path_factory):
    """A diffusers pipeline-style root (model_index.json, transformer/, vae/) of tiny random torch
    models with the tiny-world sizes: the path a user passes as config.model.pretrained."""
    import json

    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from alignax import config as config_lib
    from tests.reference_models import randomize_

    root = tmp_path_factory.mktemp("pretrained")
    transformer = randomize_(SD3Transformer2DModel(**config_lib.TINY_TRANSFORMER), seed=11)
    transformer.save_pretrained(root / "transformer")
    vae = randomize_(AutoencoderKL(**config_lib.TINY_VAE), seed=12, scale=0.1)
    vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return str(root)
