"""The shipped portrait world (alignax/world/portrait/) meets its quality bars, measured here on the shipped
fp16 weights, and fits the size budget."""

from __future__ import annotations

import pytest

from alignax.world import data as world_data
from alignax.world import paths, quality

SHIPPED = paths.WorldPaths(paths.SHIPPED)
pytestmark = pytest.mark.skipif(not SHIPPED.is_complete(), reason="no built world shipped in alignax/world/portrait")


def test_the_shipped_world_fits_the_size_budget_in_fp16():
    from safetensors import safe_open
    files = [p for p in SHIPPED.root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2 ** 20
    for weights in (p for p in files if p.suffix == ".safetensors"):
        with safe_open(str(weights), "numpy") as f:
            assert {str(f.get_tensor(k).dtype) for k in f.keys()} <= {"float16", "int64"}, weights


def test_the_shipped_world_meets_its_quality_bars():
    manifest = SHIPPED.read_manifest()
    recipe = manifest["recipe"]
    data = world_data.generate(manifest["seed"], size=recipe["image_size"], num_identities=recipe["num_identities"],
                               num_train=16, num_eval=96, num_pairs=8, num_eval_pairs=96, faces_per_identity=1,
                               references_per_identity=1)
    measured = quality.measure(SHIPPED, data, num_samples=64, seed=1, sample_steps=recipe["sample_steps"])
    assert measured["identity_top1"] >= quality.BARS["identity_top1"], measured
    assert measured["clip_retrieval"] >= quality.BARS["clip_retrieval"], measured
    assert measured["scorer_accuracy"] >= quality.BARS["scorer_accuracy"], measured
