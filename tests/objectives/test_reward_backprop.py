"""reward_backprop: gradients against finite differences and hand-written stop_gradient references,
model calls counted in the backward pass, compiled memory flat in the steps, the weight vector
steering training, and exact kill-and-resume on the 8-device mesh."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alignax import config as config_lib
from alignax import mesh as mesh_lib
from alignax import objectives, sampling
from alignax.errors import ConfigError
from alignax.models import init_params
from alignax.models import setup as model_setup
from alignax.objectives import reward_backprop
from alignax.rewards import setup as reward_setup
from tests.parity import max_rel_err as array_rel_err
from tests.training.conftest import assert_trees_equal, pretrained_root, tiny_world  # noqa: F401  (fixtures)

NUM_STEPS = 4
BATCH = 2
RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


# ---- a tiny world built directly (no Trainer): modules, active random params, a batch ---------------

FAST_COMPILE = model_setup.run_once_compiler_options()  # tiny programs: compile time dominates on CPU


def fast_jit(fn):
    """`jax.jit(fn)` compiled without LLVM optimisation: numerics unchanged, compiles several times faster."""
    def call(*args):
        return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)
    return call


_RUN_SETTINGS: dict[int, objectives.RunSettings] = {}  # id(models) -> the settings make_models configured


def make_models(num_steps=NUM_STEPS, weights=None, rewards=None, models_cls=objectives.Models, **sample):
    c = config_lib.base_config()
    c.sample.num_steps = num_steps
    c.sample.update(sample)
    c.rewards = ml_collections.ConfigDict(rewards or dict(red=dict(kind="channel_mean", channel=0),
                                                          blue=dict(kind="channel_mean", channel=2)))
    c.pareto.weights = ml_collections.ConfigDict(weights or dict(red=1.0, blue=0.0))
    _, transformer, _, vae = model_setup.build_modules(c.model)
    scale, shift = model_setup.vae_scaling(vae)
    models = models_cls(transformer, vae, scale, shift, rewards=reward_setup.build(c.rewards))
    _RUN_SETTINGS[id(models)] = objectives.RunSettings.from_config(c)
    return models


@pytest.fixture(scope="module")
def world():
    c = config_lib.base_config()
    t_src, transformer, v_src, vae = model_setup.build_modules(c.model)
    params = fast_jit(lambda key: init_params(t_src.architecture, transformer, key))(jax.random.key(1))
    pos_embed = params["pos_embed"]
    # adaLN-Zero leaves the random net's output exactly 0; perturb every weight so each block matters.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys,
                                                                                               strict=True)])
    params["pos_embed"] = pos_embed  # a fixed sin-cos table, not a weight
    vae_params = fast_jit(lambda key: init_params(v_src.architecture, vae, key))(jax.random.key(2))
    batch = {"encoder_hidden_states": jax.random.normal(jax.random.key(3), (BATCH, 5, 16)),
             "pooled_projections": jax.random.normal(jax.random.key(4), (BATCH, 16))}
    frozen = {"vae": vae_params, "rewards": {"red": {}, "blue": {}, "brightness": {}}}
    return {"params": params, "frozen": frozen, "batch": batch}


def max_rel_err(actual_leaves, expected_leaves) -> float:
    """The parity measure (tests/parity.py), leaf by leaf, worst leaf."""
    return max(array_rel_err(a, e) for a, e in zip(actual_leaves, expected_leaves, strict=True))


def objective(models, **fields):
    cfg = ml_collections.ConfigDict(dict(name="reward_backprop", **fields))
    objectives.validate_config(cfg)
    return objectives.build(cfg, models, _RUN_SETTINGS[id(models)])


def objective_grad(obj, world, rng):
    def loss(params):
        return obj.loss({"transformer": params}, world["frozen"], obj.init_state({}, {}), world["batch"], rng)[0]
    return fast_jit(jax.grad(loss))(world["params"])


# ---- the hand-written reference: a plain Python loop over the Euler steps ----------------------------

def reference_sample(models, params, noise, batch, boundary, num_steps=NUM_STEPS, shift=3.0, stop_after=None):
    """Euler sampling where the latents entering step `boundary` (traced) are stop_gradient'ed;
    `stop_after` ends the loop early (the latents after that many steps)."""
    _, sigmas = sampling.flow_match_sigmas(num_steps, shift)
    x = noise
    for i in range(num_steps if stop_after is None else stop_after):
        x = jnp.where(i == boundary, jax.lax.stop_gradient(x), x)
        v = models.velocity(params, x, jnp.full((x.shape[0],), sigmas[i] * 1000.0), batch["encoder_hidden_states"],
                            batch["pooled_projections"])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def channel_score(models, frozen, latents, channel_weights):
    """Σ_c w_c · mean over pixels of channel c of the decoded image (red, blue, luma), per sample."""
    images = models.decode(frozen, latents)
    return jnp.einsum("bhwc,c->b", images, channel_weights) / (images.shape[1] * images.shape[2])


def noise_of(models, rng):
    """The objective's documented RNG protocol: noise from the first half of split(rng)."""
    return jax.random.normal(jax.random.split(rng)[0], models.latent_shape(BATCH), jnp.float32)


@pytest.fixture(scope="module")
def draft_reference_grad():
    models = make_models()

    @fast_jit
    def grad(params, frozen, batch, rng, boundary, channel_weights):
        def loss(p):
            x = reference_sample(models, p, noise_of(models, rng), batch, boundary)
            return -jnp.mean(channel_score(models, frozen, x, channel_weights))
        return jax.grad(loss)(params)
    return grad


# ---- counting model calls: forward without gradient, and backward passes -----------------------------

CALLS = {"primal": 0, "backward": 0}


def _bump(kind):
    def callback():
        CALLS[kind] += 1
    return callback


def _primal(apply, params, x, t, c, p):
    jax.debug.callback(_bump("primal"))
    return apply(params, x, t, c, p)


def _fwd(apply, params, x, t, c, p):
    return apply(params, x, t, c, p), (params, x, t, c, p)


def _bwd(apply, residuals, cotangent):
    jax.debug.callback(_bump("backward"))
    _, vjp = jax.vjp(lambda *a: apply(*a), *residuals)
    return vjp(cotangent)


# `apply` is a Python callable, so it is a non-differentiable argument. Without any tangent
# (a gradient-cut step) JAX runs `_primal`; a differentiated call runs `_fwd`, then `_bwd`.
counted_velocity = jax.custom_vjp(_primal, nondiff_argnums=(0,))
counted_velocity.defvjp(_fwd, _bwd)


@dataclasses.dataclass(frozen=True)
class CountingModels(objectives.Models):
    """Models whose velocity counts, at run time, calls without gradient and backward passes."""

    def velocity(self, params, x, timestep, context, pooled, **kwargs):
        apply = lambda *a: objectives.Models.velocity(self, *a)  # noqa: E731
        return counted_velocity(apply, params, x, timestep, context, pooled)


def counted(fn):
    CALLS.update(primal=0, backward=0)
    out = jax.block_until_ready(fn())
    jax.effects_barrier()
    return out, dict(CALLS)


# ---- tests ---------------------------------------------------------------------------------------------

def test_full_gradient_matches_finite_difference(world):
    models = make_models(num_steps=3, rewards=dict(brightness={}), weights=dict(brightness=1.0))
    obj = objective(models, mode="full")
    rng = jax.random.key(11)

    def loss_fn(params):
        return obj.loss({"transformer": params}, world["frozen"], obj.init_state({}, {}), world["batch"], rng)[0]

    loss = fast_jit(loss_fn)
    grads = fast_jit(jax.grad(loss_fn))(world["params"])
    leaves = jax.tree.leaves(grads)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    direction = jax.tree.unflatten(jax.tree.structure(grads), [jax.random.normal(k, g.shape)
                                                               for k, g in zip(keys, leaves, strict=True)])
    direction["pos_embed"] = jax.tree.map(jnp.zeros_like, direction["pos_embed"])  # a fixed buffer
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(leaves, jax.tree.leaves(direction), strict=True))
    eps = 1e-3
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, world["params"], direction)  # noqa: E731
    numeric = (float(loss(shifted(1.0))) - float(loss(shifted(-1.0)))) / (2 * eps)
    assert abs(numeric) > 1e-4
    assert abs(analytic - numeric) <= 1e-2 * abs(numeric), (analytic, numeric)


def test_draft_k_equals_stop_gradient_reference_and_weights_pick_the_reward(world, draft_reference_grad):
    """DRaFT-K = the hand-written loop with the latents entering step N−K stop_gradient'ed; the
    backward runs exactly K model calls; weights (1,0) vs (0,1) follow red's vs blue's gradient."""
    rng, k = jax.random.key(5), 2
    grads = {}
    for name, weights, channels in (("red", dict(red=1.0, blue=0.0), RED), ("blue", dict(red=0.0, blue=1.0), BLUE)):
        obj = objective(make_models(weights=weights, models_cls=CountingModels), mode="draft_k", k=k)
        grads[name], calls = counted(lambda obj=obj: objective_grad(obj, world, rng))
        expected = draft_reference_grad(world["params"], world["frozen"], world["batch"], rng, NUM_STEPS - k,
                                        jnp.asarray(channels))
        assert max_rel_err(jax.tree.leaves(grads[name]), jax.tree.leaves(expected)) <= 1e-5
        assert calls["backward"] == k, calls
    full = draft_reference_grad(world["params"], world["frozen"], world["batch"], rng, -1, jnp.asarray(RED))
    assert max_rel_err(jax.tree.leaves(grads["red"]), jax.tree.leaves(full)) > 1e-2  # truncation matters
    assert max_rel_err(jax.tree.leaves(grads["red"]), jax.tree.leaves(grads["blue"])) > 1e-1


def test_random_k_draws_k_per_batch_and_equals_reference(world, draft_reference_grad):
    k_max = 3
    obj = objective(make_models(models_cls=CountingModels), mode="random_k", k_max=k_max)
    seen = {}
    for seed in range(40):
        rng = jax.random.key(seed)
        k = int(reward_backprop.draw_k(jax.random.split(rng)[1], k_max))
        seen.setdefault(k, rng)
    assert sorted(seen) == [1, 2, 3]
    for k in (1, 3):
        grads, calls = counted(lambda k=k: objective_grad(obj, world, seen[k]))
        expected = draft_reference_grad(world["params"], world["frozen"], world["batch"], seen[k], NUM_STEPS - k,
                                        jnp.asarray(RED))
        assert max_rel_err(jax.tree.leaves(grads), jax.tree.leaves(expected)) <= 1e-5, k
        assert calls["backward"] == k, (k, calls)  # frozen steps cost no backward


def test_refl_is_differentiable_through_exactly_one_model_call(world):
    models = make_models(models_cls=CountingModels, num_steps=NUM_STEPS)
    obj = objective(models, mode="refl", refl_range=(1, 2))
    rng = jax.random.key(3)
    grads, calls = counted(lambda: objective_grad(obj, world, rng))
    step = int(reward_backprop.draw_refl_step(jax.random.split(rng)[1], 1, 2))
    # ReFL sampled `step` Euler steps without gradients, then made one differentiable call.
    assert calls == {"primal": step, "backward": 1}, (step, calls)

    _, sigmas = sampling.flow_match_sigmas(NUM_STEPS, 3.0)

    def reference_loss(params):
        x = reference_sample(models, params, noise_of(models, rng), world["batch"], -1, stop_after=step)
        x = jax.lax.stop_gradient(x)
        t = jnp.full((BATCH,), sigmas[step] * 1000.0)
        x0 = x - sigmas[step] * objectives.Models.velocity(models, params, x, t,
                                                           world["batch"]["encoder_hidden_states"],
                                                           world["batch"]["pooled_projections"])
        return -jnp.mean(channel_score(models, world["frozen"], x0, jnp.asarray(RED)))

    expected = fast_jit(jax.grad(reference_loss))(world["params"])
    assert max_rel_err(jax.tree.leaves(grads), jax.tree.leaves(expected)) <= 1e-5


def test_draft_lv_averages_renoised_copies_and_kl_penalty_is_zero_at_reference(world):
    models = make_models(models_cls=CountingModels)
    obj = objective(models, mode="draft_lv", lv_n=3, kl_weight=0.5)
    assert obj.needs_reference
    frozen = {**world["frozen"], "reference": world["params"]}
    state = obj.init_state({}, {})

    def loss(params):
        return obj.loss({"transformer": params}, frozen, state, world["batch"], jax.random.key(2))

    value_and_grad = fast_jit(jax.value_and_grad(loss, has_aux=True))
    ((value, (metrics, _)), _), calls = counted(lambda: value_and_grad(world["params"]))
    # One batched differentiable call for the 3 copies (plus the reference call, never differentiated).
    assert calls["backward"] == 1, calls
    assert float(metrics["kl_drift"]) < 1e-10  # zero up to rounding (the two calls compile differently)
    assert float(value) == pytest.approx(-float(metrics["reward/red/raw"]), rel=1e-6)
    moved = jax.tree.map(lambda p: p * 1.05, world["params"])
    _, (moved_metrics, _) = fast_jit(loss)(moved)
    assert float(moved_metrics["kl_drift"]) > 1e-6


@pytest.mark.parametrize("field, value, mode", [("mode", "drafty", "full"), ("k", 0, "draft_k"),
                                                ("k", NUM_STEPS + 1, "draft_k"), ("k_max", 9, "random_k"),
                                                ("refl_range", (2, NUM_STEPS), "refl"), ("lv_n", 0, "draft_lv"),
                                                ("kl_weight", -1.0, "full"), ("remat", "some", "full")])
def test_bad_fields_raise_config_error_naming_them(field, value, mode):
    fields = {"mode": mode, field: value}
    with pytest.raises(ConfigError, match=rf"config\.objective\.{field}"):
        objective(make_models(), **fields)


def compiled_temp_bytes(world, num_steps, remat):
    models = make_models(num_steps=num_steps)
    obj = objective(models, mode="full", remat=remat)

    def grad_fn(params):
        return jax.grad(lambda p: obj.loss({"transformer": p}, world["frozen"], obj.init_state({}, {}),
                                           world["batch"], jax.random.key(0))[0])(params)

    compiled = jax.jit(grad_fn).lower(world["params"]).compile(
        compiler_options=model_setup.run_once_compiler_options())
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_is_flat_in_steps_with_per_step_remat(world):
    two, twenty = compiled_temp_bytes(world, 2, "full"), compiled_temp_bytes(world, 20, "full")
    no_remat = compiled_temp_bytes(world, 20, "none")
    print(f"temp bytes: remat 2 steps {two}, 20 steps {twenty} (ratio {twenty / two:.3f}); "
          f"no remat 20 steps {no_remat} ({no_remat / two:.2f}x)")
    assert twenty <= 1.5 * two, (two, twenty)
    assert no_remat > twenty  # the contrast: without remat every step's activations are kept


# ---- through the Trainer ---------------------------------------------------------------------------------

def trainer_for(tmp_path, world_root, name, mesh_shape=(1, 1, 1), arg="random_k,running", **overrides):
    from alignax.training.trainer import Trainer
    from experiments.configs import reward_backprop_tiny
    c = reward_backprop_tiny.get_config(arg)
    c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 4, 1, 2, 0
    c.data.generate, c.data.path = "", world_root
    c.mesh.shape = mesh_shape
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    num = int(np.prod(mesh_shape))
    mesh = mesh_lib.make_mesh(mesh_shape, c.mesh.axes, devices=jax.devices()[:num])
    return Trainer(c, tmp_path / name, mesh=mesh, async_checkpoints=False)


# slow: ~4 min of CPU on 8 fake devices; exact sharded resume is also covered by dpo, feature_align, trainer tests
@pytest.mark.slow
def test_sharded_kill_and_resume_is_exact_with_running_normalisation(tmp_path, tiny_world):  # noqa: F811
    """On the (2,2,2) mesh: 4 straight steps == 2 steps, a new process-like Trainer, 2 more; the
    running reward statistics (objective state) included, bit-exact."""
    straight = trainer_for(tmp_path, tiny_world, "straight", (2, 2, 2)).run()
    first = trainer_for(tmp_path, tiny_world, "resumed", (2, 2, 2)).run(stop_after=2)
    assert first.final_step == 2
    assert int(first.state["objective"]["red"]["count"]) == 2 * 8
    resumed = trainer_for(tmp_path, tiny_world, "resumed", (2, 2, 2)).run()
    assert resumed.final_step == 4
    assert int(resumed.state["objective"]["red"]["count"]) == 4 * 8
    for part in ("objective", "trainable", "opt_state", "step"):
        assert_trees_equal(resumed.state[part], straight.state[part])
    kernel = resumed.state["trainable"]["transformer"]["transformer_blocks.0"]["attn"]["to_q"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape  # really sharded


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "draft_k", "draft_lv", "refl"])
def test_every_mode_resumes_exactly_on_the_mesh(tmp_path, tiny_world, mode):  # noqa: F811
    """The other modes, on the (2,2,2) mesh: 2 straight steps == 1 step, a new Trainer, 1 more (bit-exact).
    Slow (about a minute per mode); random_k with running normalisation runs by default above."""
    straight = trainer_for(tmp_path, tiny_world, f"{mode}_straight", (2, 2, 2), arg=mode, total_steps=2).run()
    first = trainer_for(tmp_path, tiny_world, f"{mode}_resumed", (2, 2, 2), arg=mode, total_steps=2,
                        checkpoint_every=1)
    assert first.run(stop_after=1).final_step == 1 and first.checkpointer.latest_step() == 1
    resumed = trainer_for(tmp_path, tiny_world, f"{mode}_resumed", (2, 2, 2), arg=mode, total_steps=2).run()
    assert resumed.final_step == 2
    for part in ("trainable", "opt_state", "step"):
        assert_trees_equal(resumed.state[part], straight.state[part])


def held_out_scores(trainer, trainable):
    """Mean score of each configured reward on images sampled from fixed held-out noise and eval prompts."""
    loader = trainer.make_loader(split=trainer.config.data.eval_split)
    batch = trainer.device_batch(loader.batch_at(0))
    models, frozen = trainer.models, trainer.frozen

    @jax.jit
    def scores(trainable):
        params = models.transformer_params(trainable, frozen)
        noise = jax.random.normal(jax.random.key(987), models.latent_shape(batch["pooled_projections"].shape[0]))
        _, sigmas = sampling.flow_match_sigmas(trainer.config.sample.num_steps, trainer.config.sample.shift)
        x = sampling.denoise(models.velocity_fn(params), noise, sigmas, batch["encoder_hidden_states"],
                             batch["pooled_projections"])
        images = models.decode(frozen, x)
        return {name: jnp.mean(reward.apply(frozen["rewards"][name], images, batch)[0])
                for name, reward in models.rewards.items()}

    return {name: float(v) for name, v in scores(trainable).items()}


@pytest.fixture(scope="module")
def sft_pretrained(tmp_path_factory, tiny_world):  # noqa: F811
    """A tiny MM-DiT pre-trained briefly with `sft` on the tiny world and exported, with its VAE, as diffusers
    directories: the start of the end-to-end trade-off, loaded back through `config.model.pretrained`."""
    from alignax import export
    from alignax.models import Pretrained, save_diffusers
    from alignax.training.trainer import Trainer
    from tests.training.conftest import tiny_config
    root = tmp_path_factory.mktemp("sft_pretrained")
    c = tiny_config(total_steps=40, log_every=20, checkpoint_every=40)
    c.data.path = tiny_world
    trainer = Trainer(c, root / "run", mesh=mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                      async_checkpoints=False)
    trainer.run()
    export.export(root / "run", root / "transformer")
    v_src = model_setup.vae_source(c.model)
    save_diffusers(Pretrained(trainer.models.vae, jax.device_get(trainer.frozen["vae"]), v_src.config,
                              v_src.architecture), root / "vae")
    return root


# slow: trains an SFT base and two reward runs (~5 min of CPU); the tiny study (tests/study) shows the steering too
@pytest.mark.slow
def test_weight_vectors_steer_the_trade_off_end_to_end(tmp_path, tiny_world, sft_pretrained):  # noqa: F811
    """From the SFT-pre-trained model, red share against blue share (a real conflict: no image maximises
    both): weights (1, 0) and (0, 1) each raise their own reward on held-out seeds more than the other
    run does. Both rewards are logged, raw and normalised, at every step."""
    import json
    runs = {}
    for name, weights in (("red", (1.0, 0.0)), ("blue", (0.0, 1.0))):
        trainer = trainer_for(tmp_path, tiny_world, name, arg="full", total_steps=15,
                              **{"pareto.weights.red": weights[0], "pareto.weights.blue": weights[1],
                                 "model.pretrained": str(sft_pretrained / "transformer"),
                                 "model.vae_pretrained": str(sft_pretrained / "vae"),
                                 "optim.learning_rate": 3e-3, "checkpoint_every": 100, "log_every": 5})
        assert {r.kind for r in trainer.config.rewards.values()} == {"channel_share"}
        before = held_out_scores(trainer, trainer.initial_state()["trainable"])
        after = held_out_scores(trainer, trainer.run().state["trainable"])
        runs[name] = {reward: after[reward] - before[reward] for reward in after}
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        logged = [r["step"] for r in rows if "reward/red/raw" in r and "reward/blue/normalized" in r]
        assert logged == list(range(1, 16))
    print("held-out gains:", runs)
    assert runs["red"]["red"] > runs["blue"]["red"]
    assert runs["blue"]["blue"] > runs["red"]["blue"]
    assert runs["red"]["red"] > 0 and runs["blue"]["blue"] > 0


def test_lora_with_cfg_trains_through_the_sampler(tmp_path, tiny_world, pretrained_root):  # noqa: F811
    """draft_k with classifier-free guidance inside the graph and LoRA adapters on a pretrained base: the
    reward gradient reaches lora_B (exactly 0 at init) and the base stays bit-identical."""
    trainer = trainer_for(tmp_path, tiny_world, "lora_cfg", arg="draft_k,lora", total_steps=2,
                          **{"model.pretrained": pretrained_root, "sample.guidance_scale": 3.0,
                             "optim.warmup_steps": 0, "optim.learning_rate": 1e-2})
    base = jax.device_get(trainer.frozen["transformer_base"])
    state = trainer.run().state
    assert_trees_equal(trainer.frozen["transformer_base"], base)
    lora_b = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state["trainable"]))
              if "lora_B" in str(path[-1])]
    assert lora_b and sum(np.abs(leaf).max() > 0 for leaf in lora_b) > len(lora_b) // 2
    # The frozen sampler steps run in a loop that XLA's cost analysis counts once; the logged matmul FLOPs
    # count every trip (alignax.compiled_costs), so a study's cost axis sees the whole sampler.
    stats = trainer.compiled_stats
    assert stats["matmul_flops"] > stats["flops"], stats
