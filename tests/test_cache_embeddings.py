"""`alignax.cache_embeddings`: prompts → a `prompts` dataset + negative.npz, resumable after an interruption.
The encoders are shared with the check below (one compiled batch shape for the whole file)."""

from __future__ import annotations

import numpy as np
import pytest

from alignax import cache_embeddings
from alignax.conditioning import TextEncoders, negative_prompt
from alignax.data import open_dataset
from alignax.errors import DataError

# No "": a prompt file's blank lines are skipped.
PROMPTS = ["portrait of a person", "the red person", "x", "blue", "a smiling person, 42"]
BATCH = 4
T5_LENGTH = 8


def test_empty_prompt_file_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=r"prompts\.txt'?: the file holds no prompts"):
        cache_embeddings.cache_embeddings("unused", path, tmp_path / "out")
    with pytest.raises(DataError, match="missing.txt'?: no such file"):
        cache_embeddings.cache_embeddings("unused", tmp_path / "missing.txt", tmp_path / "out")


def test_writes_dataset_and_negative_and_resumes_after_interruption(tiny_sd3_pipeline, tmp_path, monkeypatch):
    encoders = TextEncoders.load(tiny_sd3_pipeline)
    monkeypatch.setattr(TextEncoders, "load", classmethod(lambda cls, *a, **k: encoders))
    calls = []
    original = TextEncoders.encode_prompt

    def failing_second_call(self, prompts, **kwargs):
        calls.append(list(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed mid-way
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(TextEncoders, "encode_prompt", failing_second_call)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:2] + ["   "] + PROMPTS[2:]) + "\n")  # blank lines are skipped
    out = tmp_path / "cached"
    kwargs = dict(batch_size=BATCH, max_sequence_length=T5_LENGTH, negative_prompt="blue", progress=False)
    with pytest.raises(KeyboardInterrupt):
        cache_embeddings.cache_embeddings(tiny_sd3_pipeline, prompts_file, out, **kwargs)
    assert not out.exists() and (tmp_path / "cached.partial" / "chunk-000000.npz").is_file()

    calls.clear()
    monkeypatch.setattr(TextEncoders, "encode_prompt", lambda self, prompts, **kw: (calls.append(list(prompts)),
                                                                                   original(self, prompts, **kw))[1])
    result = cache_embeddings.cache_embeddings(tiny_sd3_pipeline, prompts_file, out, **kwargs)
    assert calls == [[PROMPTS[4], "blue", "blue", "blue"]]  # only the missing chunk, padded to the batch size
    assert result["prompts"] == len(PROMPTS) and not (tmp_path / "cached.partial").exists()

    source = open_dataset(str(out), "train", kind="prompts")
    assert len(source) == len(PROMPTS)
    expected = [original(encoders, PROMPTS[:4], max_sequence_length=T5_LENGTH),
                original(encoders, [PROMPTS[4], "blue", "blue", "blue"], max_sequence_length=T5_LENGTH)]
    embeds = np.concatenate([np.asarray(e[0]) for e in expected])
    pooled = np.concatenate([np.asarray(e[1]) for e in expected])
    for i, prompt in enumerate(PROMPTS):
        record = source[i]
        assert record["prompt"] == prompt
        np.testing.assert_array_equal(record["encoder_hidden_states"], embeds[i])
        np.testing.assert_array_equal(record["pooled_projections"], pooled[i])
    negative = negative_prompt.load(out / "negative.npz", joint_attention_dim=16, pooled_projection_dim=16)
    np.testing.assert_array_equal(negative["negative_encoder_hidden_states"], embeds[5])
    np.testing.assert_array_equal(negative["negative_pooled_projections"], pooled[5])
    assert len(encoders.compiled_shapes) == 1

    with pytest.raises(DataError, match="already exists"):
        cache_embeddings.cache_embeddings(tiny_sd3_pipeline, prompts_file, out, **kwargs)
