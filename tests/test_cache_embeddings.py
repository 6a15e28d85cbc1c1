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


@pytest.fixture(scope="module")
def encoders(tiny_sd3_pipeline):
    """One TextEncoders (one compiled batch shape) for the tests below."""
    return TextEncoders.load(tiny_sd3_pipeline)


def _records(path):
    source = open_dataset(str(path), "train", kind="prompts")
    return [source[i] for i in range(len(source))]


def _assert_same_dataset(out, reference):
    got, want = _records(out), _records(reference)
    assert [r["prompt"] for r in got] == [r["prompt"] for r in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g["encoder_hidden_states"], w["encoder_hidden_states"])
        np.testing.assert_array_equal(g["pooled_projections"], w["pooled_projections"])
    for key in ("encoder_hidden_states", "pooled_projections"):
        with np.load(out / "negative.npz") as a, np.load(reference / "negative.npz") as b:
            np.testing.assert_array_equal(a[key], b[key])


def test_two_processes_share_the_chunks_and_process_0_assembles(tiny_sd3_pipeline, encoders, tmp_path, monkeypatch):
    """Processes 0 and 1 run concurrently as two threads (subprocesses would each import JAX and compile)."""
    import threading
    monkeypatch.setattr(TextEncoders, "load", classmethod(lambda cls, *a, **k: encoders))
    calls = []
    original = TextEncoders.encode_prompt
    monkeypatch.setattr(TextEncoders, "encode_prompt", lambda self, prompts, **kw: (calls.append(list(prompts)),
                                                                                   original(self, prompts, **kw))[1])
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    kwargs = dict(batch_size=BATCH, max_sequence_length=T5_LENGTH, negative_prompt="blue", progress=False,
                  poll_seconds=0.01)
    reference = tmp_path / "single"
    cache_embeddings.cache_embeddings(tiny_sd3_pipeline, prompts_file, reference, **kwargs)

    out = tmp_path / "sharded"
    calls.clear()
    # Process 0 alone: encodes its chunk 0, then times out naming chunk 1 and its owner, process 1.
    with pytest.raises(DataError, match=r"waiting for 1 of 2 chunks: chunk-000001\.npz \(to be written by "
                                        r"processes \[1\] of 2\)"):
        cache_embeddings.cache_embeddings(tiny_sd3_pipeline, prompts_file, out, process_index=0, process_count=2,
                                          wait_timeout=0.05, **kwargs)
    assert calls == [PROMPTS[:4]] and not out.exists()

    # Both together: process 0 resumes (nothing left for it) and waits; process 1 encodes chunk 1 and returns.
    calls.clear()
    results, errors = {}, []

    def run(index):
        try:
            results[index] = cache_embeddings.cache_embeddings(tiny_sd3_pipeline, prompts_file, out,
                                                               process_index=index, process_count=2,
                                                               wait_timeout=60, **kwargs)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert calls == [[PROMPTS[4], "blue", "blue", "blue"]]
    assert results[1]["assembled"] is False and results[1]["chunks_written"] == ["chunk-000001.npz"]
    assert results[0]["assembled"] is True and results[0]["chunks_written"] == []
    assert not (tmp_path / "sharded.partial").exists()
    _assert_same_dataset(out, reference)


def test_bad_process_flags_are_config_errors(tmp_path):
    from alignax.errors import ConfigError
    with pytest.raises(ConfigError, match="--process_index=2, --process_count=2"):
        cache_embeddings.cache_embeddings("unused", tmp_path / "p.txt", tmp_path / "out", process_index=2,
                                          process_count=2)


def test_prompts_from_a_dataset_directory(tiny_sd3_pipeline, encoders, tmp_path, monkeypatch):
    from alignax.data import write_prompts
    monkeypatch.setattr(TextEncoders, "load", classmethod(lambda cls, *a, **k: encoders))
    source = tmp_path / "source"
    write_prompts(source, [{"prompt": p} for p in PROMPTS[:2] + ["  "] + PROMPTS[2:]])  # a blank one is skipped
    assert cache_embeddings.read_prompts(source) == PROMPTS

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    kwargs = dict(batch_size=BATCH, max_sequence_length=T5_LENGTH, negative_prompt="blue", progress=False)
    cache_embeddings.cache_embeddings(tiny_sd3_pipeline, source, tmp_path / "from_dataset", **kwargs)
    cache_embeddings.cache_embeddings(tiny_sd3_pipeline, prompts_file, tmp_path / "from_file", **kwargs)
    _assert_same_dataset(tmp_path / "from_dataset", tmp_path / "from_file")

    blank = tmp_path / "blank"
    write_prompts(blank, [{"prompt": ""}, {"prompt": " "}])
    with pytest.raises(DataError, match=r"blank'?: the dataset's 2 records hold no prompts"):
        cache_embeddings.cache_embeddings("unused", blank, tmp_path / "out")
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(DataError, match=r"--prompts=.*not_a_dataset'?: dataset directory .*expected a TFDS dataset"):
        cache_embeddings.cache_embeddings("unused", tmp_path / "not_a_dataset", tmp_path / "out")
