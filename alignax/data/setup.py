"""Which dataset a run reads, and generating the synthetic tiny world when asked to.

`config.data.path` is either one dataset directory or a root holding one directory per
dataset kind (`captioned_images/`, `prompts/`, `preference_pairs/`), as the tiny world
does; the objective's data kind picks the sub-directory. With `config.data.generate =
'tiny_world'` and no path, the world is generated under `workdir/tiny_world` by process 0,
sized to fit `config.model`. With 'portrait_world', the datasets of the built portrait world
(alignax.world) are generated once into the cache and shared by every run on it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections

from alignax import fs
from alignax.errors import ConfigError

GENERATORS = ("tiny_world", "portrait_world")


def _portrait_world() -> str:
    from alignax.world import datasets, paths
    return str(datasets.ensure(paths.default_world()))


# Generators whose data does not depend on the run: written once into the cache and shared by every run.
SHARED = {"portrait_world": _portrait_world}


def prepare_shared(generate: str) -> str:
    """The cached dataset root of a shared generator (written first when missing)."""
    return SHARED[generate]()


def tiny_world_sizes(config: ml_collections.ConfigDict) -> dict:
    """Text-embedding and image sizes that fit the configured (random-init) model."""
    from alignax.models import setup as model_setup
    _, transformer, _, vae_module = model_setup.build_modules(config.model)
    cfg = transformer.config
    return dict(image_size=cfg.sample_size * vae_module.config.downsample_factor,
                context_dim=cfg.joint_attention_dim, pooled_dim=cfg.pooled_projection_dim)


def prepare(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Generates the configured synthetic data if needed, then points `config.data.path` at it."""
    generate = config.data.get("generate", "")
    if not generate:
        return
    if generate not in GENERATORS:
        raise ConfigError(f"config.data.generate={generate!r}: unknown; choose one of {list(GENERATORS)} or ''")
    if config.data.path:
        raise ConfigError(f"config.data.path={config.data.path!r} and config.data.generate={generate!r} are both "
                          "set; keep one")
    if generate in SHARED:  # shared by every run on the world: cached, not per workdir
        config.data.path = prepare_shared(generate)
        return
    root = generated_root(workdir, generate)
    remote = fs.is_remote(workdir)
    # A remote workdir's generated data lives on each host's local disk (the readers need random access
    # to local files); every host builds the same deterministic copy, so no barrier is needed.
    if (remote or jax.process_index() == 0) and not (root / "world.json").exists():
        from alignax.data import build_tiny_world
        build_tiny_world(root, seed=config.seed, **tiny_world_sizes(config))
    if jax.process_count() > 1 and not remote:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("alignax: tiny world written")
    config.data.path = str(root)


def generated_root(workdir: str | Path, generate: str) -> Path:
    """Where generated data goes: `workdir/<generator>`, or for a remote workdir (gs://...) a local
    mirror under `$ALIGNAX_CACHE_DIR/generated/<protocol>/<path>/<generator>` (never a local `gs:/` tree)."""
    if not fs.is_remote(workdir):
        return Path(workdir) / generate
    from alignax.models import remote_weights
    protocol, _, rest = str(workdir).partition("://")
    return remote_weights.cache_dir() / "generated" / protocol / rest.strip("/") / generate


def dataset_path(data_config: ml_collections.ConfigDict, kind: str) -> str:
    if not data_config.path:
        raise ConfigError("config.data.path is empty: point it at a dataset directory, or set "
                          "config.data.generate='tiny_world' (see README, 'Data')")
    per_kind = Path(data_config.path) / kind
    return str(per_kind) if per_kind.is_dir() else data_config.path
