"""`TextEncoders.encode_prompt` against diffusers' `StableDiffusion3Pipeline.encode_prompt` on the tiny random
SD3 pipeline (tests/sd3_pipeline.py: CLIP widths 6 + 8 zero-padded to T5's 16, real tokenizers), and the
`CLIPTextModelWithProjection` towers against transformers directly.

One prompt batch covers the cases: mixed lengths, the empty prompt, one prompt longer than CLIP's 77 tokens
and T5's 16. Each encode_prompt call below is one compiled program (with T5; with T5 on a mesh and
clip_skip=1; without T5), the tower test one more.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import pytest
import torch

from alignax import mesh as mesh_lib
from alignax.conditioning import TextEncoders
from alignax.errors import WeightsError
from alignax.models import load_transformers
from tests import sd3_pipeline
from tests.parity import max_rel_err, to_numpy

PROMPTS = ["portrait of a person", "", "a red " * 40, "the blue smiling person, 123.", "x"]
T5_LENGTH = 16
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tiny_sd3_pipeline):
    return sd3_pipeline.load(tiny_sd3_pipeline)


def diffusers_encode(pipe, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                                 max_sequence_length=T5_LENGTH, **kwargs)
    return to_numpy(out[0]), to_numpy(out[2])


def check_parity(ours, theirs, what: str) -> None:
    for name, a, b in zip(("prompt_embeds", "pooled"), ours, theirs, strict=True):
        err = max_rel_err(a, b)
        print(f"text encoders {what} {name} {tuple(b.shape)}: max_rel_err={err:.2e}")
        assert err <= TOL, (what, name, err)


def test_encode_prompt_matches_diffusers_with_t5_and_logs_truncation(tiny_sd3_pipeline, reference, caplog):
    encoders = TextEncoders.load(tiny_sd3_pipeline)
    with caplog.at_level(logging.WARNING, logger="alignax"):
        ours = encoders.encode_prompt(PROMPTS, max_sequence_length=T5_LENGTH)
    assert ours[0].shape == (len(PROMPTS), 77 + T5_LENGTH, 16) and ours[1].shape == (len(PROMPTS), 16)
    check_parity(ours, diffusers_encode(reference), "with T5")
    messages = [r.getMessage() for r in caplog.records]
    # The long prompt, and only it, exceeds each limit (diffusers only warns with the cut text).
    for limit in ("77 CLIP (tokenizer)", "77 CLIP (tokenizer_2)", f"{T5_LENGTH} T5"):
        assert f"1 of {len(PROMPTS)} prompts were truncated to {limit} tokens" in messages, messages
    encoders.encode_prompt(PROMPTS[::-1], max_sequence_length=T5_LENGTH)  # same shapes: no new program
    assert len(encoders.compiled_shapes) == 1


def test_encode_prompt_matches_diffusers_sharded_with_clip_skip(tiny_sd3_pipeline, reference):
    """On a (2, 2, 2) mesh the 5 prompts are padded to 8 rows and split 4 ways; T5's 3 heads do not divide the
    tensor axis, so its head dims stay replicated (mesh.fitted_shardings)."""
    mesh = mesh_lib.make_mesh((2, 2, 2))
    encoders = TextEncoders.load(tiny_sd3_pipeline, mesh=mesh)
    kernel = encoders.models[0].params["text_model"]["encoder"]["layers.0"]["mlp"]["fc1"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    ours = encoders.encode_prompt(PROMPTS, max_sequence_length=T5_LENGTH, clip_skip=1)
    check_parity(ours, diffusers_encode(reference, clip_skip=1), "sharded clip_skip=1")


def test_without_t5_the_t5_part_is_zeros_as_in_diffusers(tiny_sd3_pipeline, reference, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    no_t5 = StableDiffusion3Pipeline(**{**reference.components, "text_encoder_3": None, "tokenizer_3": None})
    encoders = TextEncoders.load(tiny_sd3_pipeline, use_t5=False)
    assert not encoders.use_t5 and len(encoders.tokenizers) == 2
    ours = encoders.encode_prompt(PROMPTS, max_sequence_length=T5_LENGTH)
    check_parity(ours, diffusers_encode(no_t5), "without T5")
    np.testing.assert_array_equal(np.asarray(ours[0][:, 77:]), 0.0)
    # A pipeline saved with text_encoder_3=None: use_t5=True falls back the same way, nothing of T5 is read.
    saved_without = linked_copy(tiny_sd3_pipeline, tmp_path / "no_t5", drop=("text_encoder_3", "tokenizer_3"))
    index = json.loads((saved_without / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (saved_without / "model_index.json").unlink()
    (saved_without / "model_index.json").write_text(json.dumps(index))
    fallback = TextEncoders.load(saved_without)
    assert not fallback.use_t5 and fallback.joint_attention_dim == 16


def test_clip_text_model_with_projection_loads_with_transformers_hidden_states(tiny_sd3_pipeline):
    """Tower 2 is gelu like OpenCLIP bigG as diffusers saves it; both towers' every hidden state (embeddings,
    each layer, no final norm), last state and projected pooled vector match transformers."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_sd3_pipeline, "tokenizer"))
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    folders = ("text_encoder", "text_encoder_2")
    towers = [load_transformers(os.path.join(tiny_sd3_pipeline, folder)) for folder in folders]
    assert [t.architecture.name for t in towers] == ["clip_text_model"] * 2
    outs = jax.jit(lambda params, x: [t.module.apply({"params": p}, x) for t, p in zip(towers, params, strict=True)])(
        [t.params for t in towers], ids)  # one program for both towers
    for folder, out in zip(folders, outs, strict=True):
        with torch.no_grad():
            ref = CLIPTextModelWithProjection.from_pretrained(os.path.join(tiny_sd3_pipeline, folder)).eval()(
                torch.from_numpy(ids).long(), output_hidden_states=True)
        assert len(out.hidden_states) == len(ref.hidden_states) == 4
        pairs = [("text_embeds", out.text_embeds, ref.text_embeds),
                 ("last_hidden_state", out.last_hidden_state, ref.last_hidden_state)]
        states = zip(out.hidden_states, ref.hidden_states, strict=True)
        pairs += [(f"hidden_states[{i}]", a, b) for i, (a, b) in enumerate(states)]
        for name, a, b in pairs:
            err = max_rel_err(a, to_numpy(b))
            print(f"{folder} {name}: max_rel_err={err:.2e}")
            assert err <= TOL, (folder, name, err)


def linked_copy(root, out, drop=()):
    """A pipeline directory of symlinked components (model_index.json copied), minus `drop`."""
    out.mkdir()
    for entry in os.listdir(root):
        if entry in drop:
            continue
        if entry == "model_index.json":
            (out / entry).write_text(open(os.path.join(root, entry)).read())
        else:
            os.symlink(os.path.join(root, entry), out / entry)
    return out


@pytest.mark.parametrize("missing", ["tokenizer_2", "text_encoder", "tokenizer_3"])
def test_missing_folder_is_a_weights_error_naming_it(tiny_sd3_pipeline, tmp_path, missing):
    broken = linked_copy(tiny_sd3_pipeline, tmp_path / "broken", drop=(missing,))
    with pytest.raises(WeightsError, match=rf"{missing}: no such folder"):
        TextEncoders.load(broken)
