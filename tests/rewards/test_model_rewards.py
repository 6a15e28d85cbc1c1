"""hpsv2, pickscore, clip_score and aesthetic on tiny checkpoints written in their real formats: jit-able,
(B,) scores equal to the PyTorch pipeline's, gradients equal to finite differences, shardable params."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest
import transformers

import alignax.rewards
from alignax import mesh as mesh_lib
from tests.parity import max_rel_err
from tests.rewards import references as ref

NAMES = ["hpsv2", "pickscore", "clip_score", "aesthetic"]
# (height, width) of the scored images: already the model's size (no resampling), and a
# downsampled non-square one (HPSv2 pads, the others crop).
NATIVE, RESAMPLED = (ref.IMAGE_SIZE, ref.IMAGE_SIZE), (45, 64)


def build(name: str, paths: dict) -> alignax.rewards.Reward:
    kwargs = {
        "hpsv2": dict(checkpoint=paths["open_clip"], tokenizer=paths["tokenizer"], model_config=ref.MODEL_CONFIG),
        "pickscore": dict(checkpoint=paths["hf"]),
        "clip_score": dict(checkpoint=paths["hf"]),
        "aesthetic": dict(checkpoint=paths["aesthetic"], clip=paths["hf"]),
    }[name]
    return alignax.rewards.get(name, **kwargs)


def full_scale(name: str, case, expected: np.ndarray) -> float:
    """What a score's error is measured against: cosine-based scores are fixed multiples of a cosine in [-1, 1]
    (the tiny random CLIPs give cosines near 0, where a relative error means nothing); the aesthetic
    regression has no fixed range, so its own magnitude."""
    return {"hpsv2": 1.0, "pickscore": ref.torch_logit_scale(case.references[0]), "clip_score": 100.0,
            "aesthetic": float(np.abs(expected).max())}[name]


def reference_scores(name: str, case, images: np.ndarray, eight_bit: bool) -> np.ndarray:
    """The PyTorch pipeline: PIL + numpy preprocessing, transformers CLIPModel / torch MLP, each reward's formula;
    token ids from the tokenizer called as the original code calls it (no fixed-length padding)."""
    clip, mlp = case.references
    if name == "hpsv2":
        pixels = np.stack([ref.hpsv2_reference(im, ref.IMAGE_SIZE, eight_bit) for im in images])
        ids = ref.open_clip_token_ids(case.tokenizer, ref.PROMPTS, ref.CONTEXT)
        return ref.torch_cosine(clip, pixels, ids)
    offset = "round" if name == "aesthetic" else "floor"
    pixels = np.stack([ref.clip_reference(im, ref.IMAGE_SIZE, eight_bit, offset) for im in images])
    if name == "aesthetic":
        return ref.torch_aesthetic(clip, mlp, pixels)
    text = case.tokenizer(ref.PROMPTS, padding=True, truncation=True, max_length=ref.CONTEXT, return_tensors="np")
    cosine = ref.torch_cosine(clip, pixels, text["input_ids"], text["attention_mask"])
    if name == "pickscore":
        return ref.torch_logit_scale(clip) * cosine
    return 100 * np.maximum(cosine, 0)


@pytest.fixture(scope="module")
def case(checkpoints, references):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(checkpoints["tokenizer"])
    rewards = {name: build(name, checkpoints) for name in NAMES}
    return SimpleNamespace(paths=checkpoints, references=references, tokenizer=tokenizer, rewards=rewards,
                           jitted={name: jax.jit(r.apply) for name, r in rewards.items()})


def score(case, name, images):
    reward = case.rewards[name]
    return case.jitted[name](reward.params, images, reward.prepare(ref.PROMPTS))


@pytest.mark.parametrize("name", NAMES)
def test_scores_match_torch_without_resampling(case, name):
    """At the model's input size the preprocessing is only normalisation: fp32 parity (<= 1e-5)."""
    images = ref.sample_images(*NATIVE)
    scores, info = score(case, name, images)
    assert scores.shape == (2,) and scores.dtype == np.float32
    expected = reference_scores(name, case, images, eight_bit=True)
    err = np.abs(np.asarray(scores, np.float64) - expected).max() / full_scale(name, case, expected)
    print(f"{name} native-size scores {np.asarray(scores)}: max err / full scale vs torch {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_scores_match_torch_with_resampling(case, name):
    """Against PIL's float-mode bicubic (the same filter, no 8-bit rounding) scores agree to fp32 parity.
    Against the real 8-bit PIL pipeline they may differ by what 8-bit rounding moves the reference itself
    (its float vs 8-bit scores): our error must stay within twice that plus fp32 noise."""
    images = ref.sample_images(*RESAMPLED)
    ours = np.asarray(score(case, name, images)[0], np.float64)
    exact = reference_scores(name, case, images, eight_bit=False)
    real = reference_scores(name, case, images, eight_bit=True)
    err_float = np.abs(ours - exact).max() / full_scale(name, case, exact)
    rounding = np.abs(real - exact).max()
    err_real = np.abs(ours - real).max()
    print(f"{name} {RESAMPLED}: max err / full scale vs PIL-float pipeline {err_float:.2e}; |ours - 8-bit pipeline| "
          f"{err_real:.2e}, reference's own 8-bit effect {rounding:.2e} (scores {real})")
    assert err_float <= 1e-5
    assert err_real <= 2 * rounding + 1e-5 * full_scale(name, case, real)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_central_difference(case, name):
    reward = case.rewards[name]
    images = ref.sample_images(*RESAMPLED, seed=3)
    batch = reward.prepare(ref.PROMPTS)
    if name == "clip_score":  # 100 max(cos, 0) is flat for cos < 0: make sure some image is on the live side
        cosine = np.asarray(reward.apply(reward.params, images, batch)[1]["cosine"])
        assert (cosine > 1e-3).any() and (np.abs(cosine) > 1e-3).all(), cosine
    # eps: the O(eps^2) truncation error stays below 1e-4 relative, fp32 rounding of f/eps below 1e-4.
    grad, analytic, numeric = ref.directional_check(reward, images, batch, eps=3e-3)
    rel = abs(analytic - numeric) / abs(numeric)
    print(f"{name}: grad.v {analytic:.6e}, central difference {numeric:.6e}, rel diff {rel:.2e}")
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    assert rel <= 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_call_form_and_logical_specs(case, name):
    """`reward(images, batch)` equals `apply(params, ...)`; specs mirror the params and carry logical names."""
    reward = case.rewards[name]
    images = ref.sample_images(*NATIVE)
    batch = reward.prepare(ref.PROMPTS)
    # eager vs compiled: fp32 reassociation only (cosines here are ~1e-3, so an absolute bound)
    np.testing.assert_allclose(reward(images, batch)[0], score(case, name, images)[0], rtol=1e-5, atol=1e-5)
    specs = reward.logical_specs()
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    assert jax.tree.structure(specs, is_leaf=is_spec) == jax.tree.structure(reward.params)
    names = {axis for spec in jax.tree.leaves(specs, is_leaf=is_spec) for axis in spec}
    assert {"embed", "heads", "mlp"} <= names
    assert reward.differentiable and reward.higher_is_better and reward.range and reward.preprocessing


def test_sharded_params_give_the_same_scores(case):
    """Params placed by their logical names over a 2x2x2 mesh (fsdp and tensor splits) score the same.
    The tiny vocab (99) does not split in two, so 'vocab' stays replicated here (49408 does split)."""
    reward = case.rewards["hpsv2"]
    mesh = mesh_lib.make_mesh((2, 2, 2))
    rules = tuple((name, None if name == "vocab" else axes) for name, axes in mesh_lib.DEFAULT_RULES)
    sharded = mesh_lib.shard_params(reward.params, reward.logical_specs(), mesh, rules)
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(sharded))
    images = ref.sample_images(*RESAMPLED)
    batch = reward.prepare(ref.PROMPTS)
    expected = score(case, "hpsv2", images)[0]
    assert max_rel_err(jax.jit(reward.apply)(sharded, images, batch)[0], expected) <= 1e-5


def test_aesthetic_keeps_only_the_vision_tower(case):
    assert set(case.rewards["aesthetic"].params["clip"]) == {"vision_model", "visual_projection", "logit_scale"}


def test_hpsv2_benchmark_scale_and_hpsv21_name(case):
    images = ref.sample_images(*NATIVE)
    paths = case.paths
    scaled = alignax.rewards.get("hpsv2.1", checkpoint=paths["open_clip"], tokenizer=paths["tokenizer"],
                                 model_config=ref.MODEL_CONFIG, benchmark_scale=True)
    ours = jax.jit(scaled.apply)(scaled.params, images, scaled.prepare(ref.PROMPTS))[0]
    np.testing.assert_allclose(ours, 100 * np.asarray(score(case, "hpsv2", images)[0]), rtol=1e-5, atol=1e-5)


def test_hpsv2_pads_token_ids_with_zeros_like_open_clip(case):
    batch = case.rewards["hpsv2"].prepare(ref.PROMPTS)
    np.testing.assert_array_equal(batch["hpsv2/input_ids"],
                                  ref.open_clip_token_ids(case.tokenizer, ref.PROMPTS, ref.CONTEXT))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_compute_stays_near_fp32(case, name):
    """compute_dtype=bfloat16 (the TPU setting; params stay fp32 masters): the matmuls really run in bf16,
    scores stay within 2% of full scale of fp32 (bf16 keeps 8 mantissa bits, ~0.4% per rounding, over a
    few layers), and the image gradient is finite."""
    import jax.numpy as jnp
    kwargs = {"hpsv2": dict(checkpoint=case.paths["open_clip"], tokenizer=case.paths["tokenizer"],
                            model_config=ref.MODEL_CONFIG),
              "pickscore": dict(checkpoint=case.paths["hf"]), "clip_score": dict(checkpoint=case.paths["hf"]),
              "aesthetic": dict(checkpoint=case.paths["aesthetic"], clip=case.paths["hf"])}[name]
    reward = alignax.rewards.get(name, compute_dtype="bfloat16", **kwargs)
    assert {leaf.dtype for leaf in jax.tree.leaves(reward.params)} == {jnp.dtype(jnp.float32)}
    images = ref.sample_images(*RESAMPLED)
    batch = reward.prepare(ref.PROMPTS)
    program = str(jax.make_jaxpr(reward.apply)(reward.params, images, batch))  # nested jaxprs print inline
    assert "bf16" in program, "compute_dtype=bfloat16 left no bf16 computation in the reward"
    scores = np.asarray(jax.jit(reward.apply)(reward.params, images, batch)[0], np.float32)
    expected = np.asarray(score(case, name, images)[0])
    err = np.abs(scores - expected).max() / full_scale(name, case, expected)
    print(f"{name} bf16: max error {err:.2e} of full scale")
    assert err <= 2e-2
    grad = jax.grad(lambda x: jnp.sum(reward.apply(reward.params, x, batch)[0]))(jnp.asarray(images))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0
