"""Remote pretrained weights (fsspec URLs; `memory://` stands in for `gs://` here): mirrored once, atomically,
only the model directories asked for, and loaded exactly like the local copy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest

from alignax import config as config_lib
from alignax.errors import ConfigError
from alignax.models import load_diffusers, remote_weights
from alignax.models import setup as model_setup
from tests.training.conftest import pretrained_root  # noqa: F401  (session fixture)


@pytest.fixture
def bucket(pretrained_root, tmp_path, monkeypatch):  # noqa: F811
    """The tiny pipeline root uploaded to an in-memory filesystem, plus a big file that must not be fetched."""
    monkeypatch.setenv("ALIGNAX_CACHE_DIR", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"/bucket-{tmp_path.name}/sd"
    for path in Path(pretrained_root).rglob("*"):
        if path.is_file():
            fs.pipe(f"{root}/{path.relative_to(pretrained_root)}", path.read_bytes())
    fs.pipe(f"{root}/text_encoder_3/model.safetensors", b"x" * 1000)
    yield f"memory://{root}", fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def config_for(url: str):
    c = config_lib.base_config()
    c.model.pretrained = url
    return c


def test_pipeline_root_is_mirrored_once_and_loads_like_the_local_copy(bucket, pretrained_root, tmp_path):  # noqa: F811
    url, fs, root = bucket
    t_src = model_setup.transformer_source(config_for(url).model)
    v_src = model_setup.vae_source(config_for(url).model)
    mirror = tmp_path / "cache" / "remote" / "memory" / root.strip("/")
    assert t_src.directory == mirror / "transformer" and v_src.directory == mirror / "vae"
    assert not (mirror / "text_encoder_3").exists()  # only what is loaded is fetched
    local, remote = load_diffusers(Path(pretrained_root) / "transformer"), load_diffusers(t_src.directory)
    for a, b in zip(jax.tree.leaves(local.params), jax.tree.leaves(remote.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    fs.rm(root, recursive=True)  # the bucket is gone: the complete mirror is reused, nothing is fetched
    assert model_setup.transformer_source(config_for(url).model).directory == mirror / "transformer"


def test_an_incomplete_mirror_is_fetched_again(bucket, tmp_path):
    url, _, root = bucket
    partial = tmp_path / "cache" / "remote" / "memory" / root.strip("/") / "transformer"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # an interrupted copy: no completion marker
    directory = model_setup.transformer_source(config_for(url).model).directory
    assert (directory / remote_weights.COMPLETE).is_file()
    assert "_class_name" in (directory / "config.json").read_text()


def test_bad_remote_paths_name_the_field(bucket, tmp_path):
    url, _, _ = bucket
    with pytest.raises(ConfigError, match=r"config\.model\.pretrained='memory://nowhere/x': not a directory"):
        model_setup.transformer_source(config_for("memory://nowhere/x").model)
    c = config_for(remote_weights.join(url, "transformer"))
    with pytest.raises(ConfigError, match="transformer directory; set config.model.vae_pretrained"):
        model_setup.vae_source(c.model)
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(ConfigError, match="gcsfs"):
            model_setup.transformer_source(config_for("gs://some-bucket/sd3.5").model)
