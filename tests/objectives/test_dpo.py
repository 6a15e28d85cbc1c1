"""Diffusion-DPO for flow matching: closed form, θ = ref, symmetry, learning, online reference, sharded resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.errors import DataError
from alignax.objectives import dpo
from tests.training.conftest import assert_trees_equal, pretrained_root, tiny_world  # noqa: F401  (fixtures)
from tests.training.test_trainer import make_trainer

BETA = 100.0
DPO = {"objective.name": "dpo", "objective.beta": BETA}


def closed_form(model_w, model_l, ref_w, ref_l, beta):
    """−log σ(−β/2·[(e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)]) in float64."""
    x = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))
    return np.log1p(np.exp(-x)), x


def perturbed(trainable, scale=0.02, seed=1):
    """θ ≠ ref everywhere (the tiny model's adaLN-zero init would hide most params otherwise)."""
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_world):  # noqa: F811
    trainer = make_trainer(tmp_path_factory.mktemp("dpo"), tiny_world, name="dpo", **DPO)
    batch = trainer.device_batch(trainer.make_loader().batch_at(0))
    return trainer, batch


def test_loss_equals_closed_form_on_crafted_errors():
    rng = np.random.default_rng(0)
    errors = [rng.uniform(0.5, 2.0, 16).astype(np.float32) for _ in range(4)]
    loss, logit = dpo.dpo_loss(*map(jnp.asarray, errors), beta=7.0)
    expected_loss, expected_logit = closed_form(*[e.astype(np.float64) for e in errors], 7.0)
    np.testing.assert_allclose(np.asarray(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logit), expected_logit, rtol=1e-5, atol=1e-6)
    # Lower error on the winner than the reference (and higher on the loser) → positive margin, loss < log 2.
    loss, logit = dpo.dpo_loss(jnp.array([1.0]), jnp.array([1.0]), jnp.array([1.1]), jnp.array([0.9]), beta=10.0)
    assert float(logit[0]) == pytest.approx(1.0) and float(loss[0]) < np.log(2)


def test_full_objective_equals_closed_form_on_its_errors(setup):
    """The four errors recomputed by hand (same noise and t for winner and loser), one tie masked."""
    trainer, batch = setup
    models, frozen = trainer.models, trainer.frozen
    batch = {**batch, "label_0": batch["label_0"].at[3].set(0.5)}
    trainable = perturbed(jax.device_get(trainer.initial_state()["trainable"]))
    rng = jax.random.key(7)
    loss, (metrics, _) = jax.jit(trainer.objective.loss)(trainable, frozen, {}, batch, rng)

    _, flow_rng = jax.random.split(rng)
    noise_rng, t_rng = jax.random.split(flow_rng)
    label = np.asarray(batch["label_0"])
    zero_wins = (label > 0.5)[:, None, None, None]
    x0_0 = models.encode(frozen, batch["image_0"].astype(jnp.float32) / 255.0)
    x0_1 = models.encode(frozen, batch["image_1"].astype(jnp.float32) / 255.0)
    x0_w, x0_l = jnp.where(zero_wins, x0_0, x0_1), jnp.where(zero_wins, x0_1, x0_0)
    t = jax.nn.sigmoid(jax.random.normal(t_rng, (label.shape[0],)))
    noise = jax.random.normal(noise_rng, x0_w.shape)

    def error(params, x0):
        tb = t[:, None, None, None]
        v = models.velocity(params, (1 - tb) * x0 + tb * noise, t * 1000.0, batch["encoder_hidden_states"],
                            batch["pooled_projections"])
        return np.asarray(jnp.mean((v - (noise - x0)) ** 2, axis=(1, 2, 3)), np.float64)

    model, ref = trainable["transformer"], frozen["reference"]
    per_pair, margin = closed_form(error(model, x0_w), error(model, x0_l), error(ref, x0_w), error(ref, x0_l), BETA)
    keep = label != 0.5
    assert keep.sum() == len(label) - 1
    assert abs(float(loss) - per_pair[keep].mean()) <= 1e-5 * per_pair[keep].mean()
    assert abs(float(metrics["reward_margin"]) - margin[keep].mean()) <= 1e-4 * np.abs(margin[keep]).mean()
    assert float(metrics["implicit_accuracy"]) == pytest.approx((margin[keep] > 0).mean())
    assert float(metrics["preference_fraction"]) == pytest.approx(keep.mean())


def test_loss_is_log2_at_the_reference(setup):
    trainer, batch = setup
    state = trainer.initial_state()
    loss, (metrics, _) = jax.jit(trainer.objective.loss)(state["trainable"], trainer.frozen, {}, batch,
                                                          jax.random.key(3))
    assert float(loss) == np.float32(np.log(2.0))
    assert float(metrics["reward_margin"]) == 0.0


def test_swapping_winner_and_loser_mirrors_the_margin(setup):
    trainer, batch = setup
    trainable = perturbed(jax.device_get(trainer.initial_state()["trainable"]))
    swapped = {**batch, "image_0": batch["image_1"], "image_1": batch["image_0"]}  # labels kept: roles swap
    loss_fn = jax.jit(trainer.objective.loss)
    _, (metrics, _) = loss_fn(trainable, trainer.frozen, {}, batch, jax.random.key(5))
    _, (mirrored, _) = loss_fn(trainable, trainer.frozen, {}, swapped, jax.random.key(5))
    margin = float(metrics["reward_margin"])
    assert abs(margin) > 1e-3
    assert float(mirrored["reward_margin"]) == pytest.approx(-margin, rel=1e-5)
    assert float(mirrored["implicit_accuracy"]) == pytest.approx(1.0 - float(metrics["implicit_accuracy"]))


def test_a_few_steps_raise_the_implicit_accuracy(setup):
    trainer, batch = setup
    step = trainer.compile(batch)
    state = trainer.initial_state()

    @jax.jit
    def evaluate(trainable):  # fixed draws of noise and t
        outs = [trainer.objective.loss(trainable, trainer.frozen, {}, batch, r)[1][0]
                for r in jax.random.split(jax.random.key(99), 8)]
        return {k: jnp.mean(jnp.stack([o[k] for o in outs])) for k in ("implicit_accuracy", "reward_margin", "loss")}

    before = jax.device_get(evaluate(state["trainable"]))
    for _ in range(15):
        state, _ = step(state, trainer.frozen, batch)
    after = jax.device_get(evaluate(state["trainable"]))
    assert before["implicit_accuracy"] == 0.0 and before["reward_margin"] == 0.0  # θ = ref: no margin yet
    assert after["implicit_accuracy"] >= 0.75, after
    assert after["reward_margin"] > 0.0 and after["loss"] < np.log(2.0), after


def test_online_refresh_replaces_the_reference(tmp_path, tiny_world):  # noqa: F811
    trainer = make_trainer(tmp_path, tiny_world, name="online", **DPO,
                           **{"objective.reference_refresh_every": 2, "optim.warmup_steps": 0})
    assert "reference" not in trainer.frozen  # the online copy replaces the frozen one
    batch = trainer.device_batch(trainer.make_loader().batch_at(0))
    step = trainer.compile(batch)
    state = trainer.initial_state()
    start = jax.device_get(state["trainable"]["transformer"])
    history, losses = [], []
    for _ in range(3):
        history.append(jax.device_get(state["trainable"]["transformer"]))
        state, metrics = step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    # Calls 0 and 1 use the start params; call 2 first copies the params it is given (those after step 2).
    assert int(state["objective"]["refreshes"]) == 1 and int(state["objective"]["count"]) == 3
    assert_trees_equal(state["objective"]["reference"]["transformer"], history[2])
    moved = max(float(np.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(history[2]), jax.tree.leaves(start), strict=True))
    assert moved > 0
    assert losses[0] == np.float32(np.log(2.0)) and losses[1] != losses[0]
    assert losses[2] == np.float32(np.log(2.0))  # θ = the fresh reference again


def test_dpo_runs_sharded_and_resumes_exactly(tmp_path, tiny_world):  # noqa: F811
    overrides = dict(total_steps=4, **DPO, **{"objective.reference_refresh_every": 2})
    straight = make_trainer(tmp_path, tiny_world, (2, 2, 2), name="straight", **overrides).run()
    first = make_trainer(tmp_path, tiny_world, (2, 2, 2), name="resumed", **overrides).run(stop_after=3)
    assert first.final_step == 3
    resumed = make_trainer(tmp_path, tiny_world, (2, 2, 2), name="resumed", **overrides).run()
    assert resumed.final_step == 4
    for part in ("trainable", "opt_state", "objective", "rng", "step"):
        assert_trees_equal(resumed.state[part], straight.state[part])
    assert int(resumed.state["objective"]["refreshes"]) == 1  # the refresh at call 2 happened before the save
    reference = resumed.state["objective"]["reference"]["transformer"]["transformer_blocks.0"]["attn"]["to_q"]
    reference = reference["kernel"]
    assert reference.sharding.shard_shape(reference.shape) != reference.shape  # sharded like the params


def test_pre_encoded_latents_give_the_image_path_loss(setup, tmp_path):
    """A preference-pairs dataset that carries latents_0/1 (the VAE means of its images) is accepted by the
    schema, skips the encoder, and gives the loss of the image path (sample_posterior=False)."""
    from alignax import data
    trainer, _ = setup
    source = data.open_dataset(f"{trainer.config.data.path}/preference_pairs", "train")
    examples = [source[i] for i in range(len(source))]
    encode = jax.jit(lambda images: trainer.models.encode(trainer.frozen, images.astype(jnp.float32) / 255.0, None))
    for side in ("0", "1"):
        latents = np.asarray(encode(jnp.stack([e[f"image_{side}"] for e in examples])))
        for example, latent in zip(examples, latents, strict=True):
            example[f"latents_{side}"] = latent
    data.write_preference_pairs(tmp_path / "pairs", examples)
    with_latents = data.open_dataset(str(tmp_path / "pairs"), "train")
    loader = data.Loader(with_latents, global_batch_size=trainer.config.batch_size, seed=trainer.config.seed)
    batch = trainer.device_batch(loader.batch_at(0))
    assert {"latents_0", "latents_1"} <= set(batch)
    images_only = {k: v for k, v in batch.items() if not k.startswith("latents_")}
    trainable = perturbed(jax.device_get(trainer.initial_state()["trainable"]))
    loss = jax.jit(trainer.objective.loss)
    from_latents, _ = loss(trainable, trainer.frozen, {}, batch, jax.random.key(3))
    from_images, _ = loss(trainable, trainer.frozen, {}, images_only, jax.random.key(3))
    np.testing.assert_allclose(float(from_latents), float(from_images), rtol=1e-5)

    one_side = {k: v for k, v in batch.items() if k != "latents_1"}
    with pytest.raises(DataError, match="latents_0/latents_1"):
        loss(trainable, trainer.frozen, {}, one_side, jax.random.key(3))


def test_lora_reference_is_the_base_with_lora_off(tmp_path, tiny_world, pretrained_root):  # noqa: F811
    """With LoRA the reference is the frozen base with LoRA off, not a copy in `frozen`: log 2 at the start
    (lora_B = 0), and after a few steps the loss leaves log 2, so the reference did not move with the adapter."""
    trainer = make_trainer(tmp_path, tiny_world, name="dpo_lora", total_steps=3, **DPO, **{
        "lora.enabled": True, "lora.rank": 2, "lora.alpha": 2.0, "optim.warmup_steps": 0,
        "optim.learning_rate": 1e-2, "model.pretrained": pretrained_root})
    assert "reference" not in trainer.frozen and "transformer_base" in trainer.frozen
    batch = trainer.device_batch(trainer.make_loader().batch_at(0))
    loss_fn = jax.jit(trainer.objective.loss)
    start = trainer.initial_state()
    loss, (metrics, _) = loss_fn(start["trainable"], trainer.frozen, {}, batch, jax.random.key(3))
    assert float(loss) == np.float32(np.log(2.0)) and float(metrics["reward_margin"]) == 0.0
    trained = trainer.run().state
    loss, (metrics, _) = loss_fn(trained["trainable"], trainer.frozen, {}, batch, jax.random.key(3))
    assert float(loss) != np.float32(np.log(2.0))  # the reference did not follow the trained adapter
