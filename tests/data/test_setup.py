"""Generated data for a remote workdir lives on local disk, never in a local tree named after the URL."""

import os

from alignax import config as config_lib
from alignax.data import setup as data_setup


def test_a_remote_workdir_generates_its_world_in_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGNAX_CACHE_DIR", str(tmp_path / "cache"))
    config = config_lib.base_config()
    config.data.generate = "tiny_world"
    data_setup.prepare(config, "memory://bucket/run")
    expected = tmp_path / "cache" / "generated" / "memory" / "bucket" / "run" / "tiny_world"
    assert config.data.path == str(expected)
    assert (expected / "world.json").exists()
    assert not any(name.startswith(("memory:", "gs:")) for name in os.listdir(tmp_path))  # the old ./memory:/ tree
    mtime = (expected / "world.json").stat().st_mtime_ns
    config.data.path = ""
    data_setup.prepare(config, "memory://bucket/run")  # a second run reuses the generated world
    assert (expected / "world.json").stat().st_mtime_ns == mtime
