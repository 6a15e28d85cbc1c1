"""Every name → thing lookup behaves the same: a duplicate registration fails at import, an unknown
name is a user error naming the field and the known names."""

import pytest

from alignax import objectives
from alignax.data import schemas
from alignax.errors import ConfigError, DataError, WeightsError
from alignax.models import attention, pretrained
from alignax.registry import Registry
from launch import backends


def test_duplicate_names_are_refused():
    registry = Registry("widget", field="config.widget")
    registry.register("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        registry.register("a", 2)
    assert registry["a"] == 1


def test_attention_kernels_no_longer_overwrite_silently():
    with pytest.raises(ValueError, match="registered twice"):
        attention.register("einsum")(lambda q, k, v: q)
    assert attention.get("einsum") is attention.einsum_attention


@pytest.mark.parametrize("lookup, error, field", [
    (lambda: objectives.get("dpx"), ConfigError, "config.objective.name='dpx'"),
    (lambda: attention.get("flash"), ConfigError, "config.model.attention='flash'"),
    (lambda: backends.get("tpu"), ConfigError, "--backend='tpu'"),
    (lambda: schemas.get_schema("images"), DataError, "unknown dataset kind 'images'"),
    (lambda: pretrained.DIFFUSERS.lookup("UNet2DModel"), WeightsError, "unknown diffusers architecture"),
])
def test_unknown_names_name_the_field_and_the_choices(lookup, error, field):
    with pytest.raises(error) as info:
        lookup()
    message = str(info.value)
    assert field in message and "choose one of [" in message


def test_a_registry_is_a_read_only_mapping():
    registry = Registry("widget")
    registry.decorator("x", "y")(7)
    assert dict(registry) == {"x": 7, "y": 7} and "x" in registry and registry.get("z") is None
