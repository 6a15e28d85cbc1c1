"""Tiny checkpoints shared by the reward tests, written once per session in their real formats."""

import pytest

from tests.rewards.references import reference_models, write_checkpoints


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("reward_checkpoints"))


@pytest.fixture(scope="session")
def references(checkpoints):
    """(transformers CLIPModel, torch aesthetic MLP) read back from the same files."""
    return reference_models(checkpoints)
