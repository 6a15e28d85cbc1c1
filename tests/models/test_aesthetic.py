"""LAION aesthetic predictor parity against the torch MLP, from a `.pth` saved as LAION distributes it."""

import pytest
import torch

from alignax.errors import WeightsError
from alignax.models.aesthetic import load_aesthetic
from tests.parity import max_rel_err, to_numpy

FILE = "sac+logos+ava1-l14-linearMSE.pth"


class MLP(torch.nn.Module):
    """improved-aesthetic-predictor's MLP (a LightningModule there; only `layers` holds weights)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.manual_seed(0)
    model = MLP().eval()
    path = tmp_path_factory.mktemp("aesthetic") / FILE
    torch.save(model.state_dict(), path)
    return model, path, load_aesthetic(path)


def test_forward_matches_torch(case):
    model, _, pretrained = case
    x = torch.randn(4, 768)
    with torch.no_grad():
        expected = to_numpy(model(x))
    err = max_rel_err(pretrained(x.numpy()), expected)
    print(f"aesthetic forward: max_rel_err={err:.2e}")
    assert err <= 1e-5


def test_score_normalises_the_clip_embedding(case):
    model, _, pretrained = case
    image_embeds = torch.randn(4, 768) * 3.0
    with torch.no_grad():  # LAION's inference script: normalized(embedding) then the MLP
        expected = to_numpy(model(image_embeds / image_embeds.norm(dim=-1, keepdim=True)))[:, 0]
    err = max_rel_err(pretrained.score(image_embeds.numpy()), expected)
    print(f"aesthetic score: max_rel_err={err:.2e}")
    assert err <= 1e-5


def test_wrong_input_size_is_a_shape_mismatch(case):
    _, path, _ = case
    with pytest.raises(WeightsError, match=r"shape mismatch for 'layers\.0\.weight'"):
        load_aesthetic(path, input_size=512)


def test_missing_key_names_it(tmp_path):
    state = MLP().state_dict()
    del state["layers.7.bias"]
    torch.save(state, tmp_path / FILE)
    with pytest.raises(WeightsError, match=r"missing key 'layers\.7\.bias'"):
        load_aesthetic(tmp_path / FILE)


def test_whole_module_pickle_is_refused(tmp_path):
    torch.save(MLP(), tmp_path / FILE)
    with pytest.raises(WeightsError, match=rf"{FILE.replace('+', '.')}: holds more than tensors"):
        load_aesthetic(tmp_path / FILE)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="file not found"):
        load_aesthetic(tmp_path / FILE)



@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update({"layers.2.weight": (s["layers.2.weight"] * 100).to(torch.int64)}),
     r"tensor 'layers\.2\.weight' has dtype int64; a parameter must be floating point"),
    (lambda s: s.update({"layers.7.bias": s["layers.7.bias"] > 0}), r"tensor 'layers\.7\.bias' has dtype bool"),
    (lambda s: s["layers.4.weight"].view(-1)[:3].fill_(float("nan")), r"tensor 'layers\.4\.weight' holds 3 NaN/Inf"),
    (lambda s: s["layers.0.bias"].fill_(float("-inf")), r"tensor 'layers\.0\.bias' holds 1024 NaN/Inf"),
])
def test_non_float_and_non_finite_tensors_are_refused(tmp_path, edit, match):
    state = MLP().state_dict()
    edit(state)
    torch.save(state, tmp_path / FILE)
    with pytest.raises(WeightsError, match=rf"{FILE.replace('+', '.')}: {match}"):
        load_aesthetic(tmp_path / FILE)
