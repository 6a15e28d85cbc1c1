"""Gradient-balanced scalarisation (`config.pareto.scalarization='mgda'`): MGDA's min-norm combination of
the per-reward gradients, steered by the weight vector.

A weighted sum follows Σ_i w_i·g_i, and when the rewards conflict one reward's gradient can point against
that update (MARBLE measured this in 80% of mini-batches for reward-weighted diffusion fine-tuning;
`/work/shared/references/peers.md`). MGDA (Désidéri, "Multiple-gradient descent algorithm", 2012; as a
deep-learning optimiser with a Frank–Wolfe solver: Sener & Koltun, "Multi-Task Learning as Multi-Objective
Optimization", NeurIPS 2018) instead takes the minimum-norm point d of the convex hull of the per-reward
ascent directions. Its optimality conditions give every direction in the hull a non-negative inner product
with d, so no reward's gradient opposes the update; d = 0 means the batch is Pareto-stationary.

**Preference.** Plain MGDA ignores the weights and favours the reward with the *smaller* gradient. Here the
hull is taken over v_i = g_i / w_i (rewards with w_i = 0 are left out): at the min-norm point d every reward
with α_i > 0 gains d·g_i = w_i·‖d‖² to first order, and every other weighted reward gains at least that,
so the first-order gains are in proportion to the weights (scaling by w_i instead would make them
proportional to 1/w_i: the opposite of the preference). Rewards with weight 0 are not balanced, so their
gradient may oppose d. The update is d = Σ_i c_i·g_i with c_i = α_i / w_i.

**Solver.** k = 2: the closed form α_1 = clip((v_2 − v_1)·v_2 / ‖v_1 − v_2‖², 0, 1). k ≥ 3: Frank–Wolfe from
the uniform α with the exact line search, `iterations` steps (the Gram matrix is k×k, so this is free next
to the gradients). Everything is computed from the Gram matrix G_ij = g_i·g_j.

**Cost** (see `balanced_loss`): one forward pass and k backward passes through the sampler, decoder and
rewards (the weighted sum: one and one), k parameter-sized gradient trees held at once, and a k×k Gram.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignax.errors import ConfigError

PyTree = Any
METHODS = ("mgda",)  # scalarisations that act on gradients, not on reward values


def min_norm_weights(gram: jax.Array, iterations: int = 25) -> jax.Array:
    """α on the simplex minimising αᵀ·G·α, the squared norm of Σ α_i v_i for G_ij = v_i·v_j (k×k)."""
    gram = jnp.asarray(gram, jnp.float32)
    k = gram.shape[0]
    if k == 1:
        return jnp.ones((1,), jnp.float32)
    if k == 2:
        denom = gram[0, 0] + gram[1, 1] - 2.0 * gram[0, 1]
        a = jnp.where(denom > 0, (gram[1, 1] - gram[0, 1]) / jnp.where(denom > 0, denom, 1.0), 0.5)
        a = jnp.clip(a, 0.0, 1.0)
        return jnp.stack([a, 1.0 - a])

    def step(_, alpha):
        g_alpha = gram @ alpha
        t = jnp.argmin(g_alpha)                   # the vertex most opposed to the current point
        vv, vt, tt = alpha @ g_alpha, g_alpha[t], gram[t, t]
        denom = vv - 2.0 * vt + tt                # ‖v − v_t‖²
        gamma = jnp.clip(jnp.where(denom > 0, (vv - vt) / jnp.where(denom > 0, denom, 1.0), 0.0), 0.0, 1.0)
        return (1.0 - gamma) * alpha + gamma * jax.nn.one_hot(t, k, dtype=alpha.dtype)

    return jax.lax.fori_loop(0, iterations, step, jnp.full((k,), 1.0 / k, jnp.float32))


def coefficients(gram: jax.Array, weights: Sequence[float], iterations: int = 25) -> jax.Array:
    """c (k,) with the update d = Σ c_i g_i: the min-norm point of the hull of g_i / w_i (module docstring).

    `gram` is the Gram matrix of the per-reward gradients g_i; `weights` are static floats >= 0."""
    w = np.asarray(weights, np.float64)
    active = np.flatnonzero(w > 0)
    scale = jnp.asarray(1.0 / w[active], jnp.float32)
    sub = jnp.asarray(gram, jnp.float32)[np.ix_(active, active)] * scale[:, None] * scale[None, :]
    alpha = min_norm_weights(sub, iterations)
    return jnp.zeros((len(w),), jnp.float32).at[active].set(alpha * scale)


def tree_gram(trees: Sequence[PyTree]) -> jax.Array:
    """G_ij = Σ_leaves g_i·g_j of k gradient trees of one structure (fp32, full precision)."""
    k = len(trees)
    per_tree = [jax.tree.leaves(t) for t in trees]
    gram = jnp.zeros((k, k), jnp.float32)
    for i in range(k):
        for j in range(i, k):
            dot = sum(jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
                      for a, b in zip(per_tree[i], per_tree[j], strict=True))
            gram = gram.at[i, j].set(dot).at[j, i].set(dot)
    return gram


def _zero_cotangent(x: Any) -> Any:
    x_dtype = getattr(x, "dtype", None)
    if x_dtype is not None and jnp.issubdtype(x_dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), jax.dtypes.float0)


def balanced_loss(parts: Callable[..., tuple[tuple[jax.Array, jax.Array], Any]], names: Sequence[str],
                  weights: Sequence[float], extra_weight: float = 0.0, iterations: int = 25) -> Callable:
    """A loss `f(params, *rest) -> (value, aux)` whose gradient in `params` is the balanced update.

    `parts(params, *rest) -> ((losses (k,), extra ()), aux)`: the per-reward losses to minimise (−reward),
    an extra term added with `extra_weight` outside the balancing (the drift penalty) and aux outputs.
    The trainer differentiates `f` as any loss (`jax.value_and_grad(f, has_aux=True)`); a custom VJP
    makes that gradient d + extra_weight·∇extra, where d = Σ c_i ∇losses_i is MGDA's update for the
    per-reward gradients −∇losses_i (ascent directions) steered by `weights`, and `value` = c·losses
    + extra_weight·extra (a surrogate whose gradient at this point is that update).

    Cost: `parts` runs forward once (`jax.vjp`: its residuals, the sampler trajectory included, are
    kept), then one VJP per reward with a positive weight, with the unit cotangents through those
    residuals (unrolled, so the logged compile/flops count them all; XLA may overlap them, and the k
    gradient trees are held at once), plus one for `extra` when `extra_weight` > 0. aux gains
    `pareto/<name>/mgda_coefficient` (0 for a zero weight), and for weighted rewards
    `pareto/<name>/grad_norm` and `pareto/<name>/update_cosine` (cosine between the update and that
    reward's ascent direction: >= 0).
    """
    names, weights = list(names), [float(w) for w in weights]
    active = [i for i, w in enumerate(weights) if w > 0]
    if not active:
        raise ConfigError(f"config.pareto.weights: all zero {dict(zip(names, weights, strict=True))}; mgda "
                          "balances the rewards with a positive weight")

    def compute(params, *rest):
        (losses, extra), vjp, aux = jax.vjp(lambda p: parts(p, *rest), params, has_aux=True)
        zero_extra, eye = jnp.zeros_like(extra), jnp.eye(len(names), dtype=losses.dtype)
        # One VJP per weighted reward (a zero weight gets no backward), unrolled (k is small and static):
        # XLA's cost analysis counts a loop body once, so a `lax.map` would hide backward passes from
        # the logged compile/flops.
        grads = [vjp((eye[i], zero_extra))[0] for i in active]
        gram = tree_gram(grads)
        c = coefficients(gram, [weights[i] for i in active], iterations)
        direction = jax.tree.map(lambda *g: sum(c[j].astype(x.dtype) * x for j, x in enumerate(g)), *grads)
        value = jnp.dot(c, losses[np.asarray(active)].astype(jnp.float32))
        # Metrics: the update is u = −d (descent on the losses); reward i improves along u·(−∇L_i) = d·∇L_i.
        d_dot_g = gram @ c                    # (∇L_i · d) for every weighted i
        d_norm = jnp.sqrt(jnp.maximum(c @ d_dot_g, 0.0))
        g_norm = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
        cosine = d_dot_g / jnp.maximum(d_norm * g_norm, 1e-30)
        info = {f"pareto/{name}/mgda_coefficient": jnp.zeros((), jnp.float32) for name in names}
        for j, i in enumerate(active):
            info[f"pareto/{names[i]}/mgda_coefficient"] = c[j]
            info[f"pareto/{names[i]}/grad_norm"] = g_norm[j]
            info[f"pareto/{names[i]}/update_cosine"] = cosine[j]
        info["pareto/mgda/update_norm"] = d_norm
        if extra_weight > 0:
            extra_grad = vjp((jnp.zeros_like(losses), jnp.ones_like(extra)))[0]
            direction = jax.tree.map(lambda d, g: d + extra_weight * g, direction, extra_grad)
            value = value + extra_weight * extra
        return value, direction, aux, info

    @jax.custom_vjp
    def loss(params, *rest):
        value, _, aux, info = compute(params, *rest)
        return value, _with_info(aux, info)

    def fwd(params, *rest):
        value, direction, aux, info = compute(params, *rest)
        return (value, _with_info(aux, info)), (direction, rest)

    def bwd(residuals, cotangent):
        direction, rest = residuals
        scale = cotangent[0]
        return (jax.tree.map(lambda d: (scale * d).astype(d.dtype), direction),
                *jax.tree.map(_zero_cotangent, rest))

    loss.defvjp(fwd, bwd)
    return loss


def _with_info(aux: Any, info: dict) -> Any:
    """aux = (metrics, state) gains the balancing metrics in its metrics dict; another aux is paired."""
    if isinstance(aux, tuple) and len(aux) == 2 and isinstance(aux[0], dict):
        return {**aux[0], **info}, aux[1]
    return aux, info
