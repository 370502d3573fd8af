"""Optimizers and learning-rate schedules, built from optax pieces.

* ``adafactor`` follows T5 / T5X's Adafactor: factored second moments, update
  clipping at RMS 1, step size scaled by the parameter's RMS, decay
  ``1 - (step + 1) ** -0.8``, no momentum. Unlike ``optax.adafactor`` (which
  factors the two *largest* dimensions), only the **last two** dimensions are
  ever factored, so the leading ``expert`` dimension of an expert weight
  ``<float>[expert, embed, mlp]`` keeps one second-moment statistic per
  expert: experts never share a row/column estimate.
* ``adamw`` is ``optax.adamw``.
* Both chain ``optax.clip_by_global_norm`` first when ``max_grad_norm`` is set.

Schedules: ``constant``, ``rsqrt`` (T5: ``base / sqrt(max(step, warmup))``),
``linear`` and ``cosine`` decay, and ``wsd`` (warmup-stable-decay: flat at the
peak, then a linear cool-down over the last part), each with an optional
linear warmup.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

logger = logging.getLogger(__name__)

SCHEDULES = ("constant", "rsqrt", "linear", "cosine", "wsd")
OPTIMIZERS = ("adafactor", "adamw")


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------
def make_schedule(name: str = "rsqrt",
                  base_learning_rate: float = 1.0,
                  warmup_steps: int = 10_000,
                  decay_steps: int = 100_000,
                  end_learning_rate: float = 0.0,
                  linear_warmup: bool = False,
                  total_steps: Optional[int] = None,
                  cooldown_fraction: float = 0.2) -> optax.Schedule:
  """Learning rate as a function of the (0-based) step.

  Args:
    name: ``"constant"``, ``"rsqrt"``, ``"linear"``, ``"cosine"`` or ``"wsd"``.
    base_learning_rate: peak value. For ``rsqrt`` (T5's schedule) the rate is
      ``base / sqrt(max(step, warmup_steps))``: flat at
      ``base / sqrt(warmup_steps)`` during warmup, then inverse square root.
      T5 uses ``base=1.0, warmup_steps=10000`` (0.01 for 10k steps).
    warmup_steps: warmup length. For ``constant``/``linear``/``cosine`` a
      linear ramp from 0 to ``base``; for ``rsqrt`` the flat part (a linear
      ramp up to the flat value instead when ``linear_warmup``).
    decay_steps: for ``linear``/``cosine``/``wsd``, steps after warmup over
      which the rate falls to ``end_learning_rate`` (``wsd``: holds the peak,
      then falls over the last ``cooldown_fraction`` of them).
    end_learning_rate: final value of ``linear``/``cosine``/``wsd``.
    linear_warmup: ``rsqrt`` only; ramp linearly over ``warmup_steps``.
    total_steps: when set, the decay ends at this step, whatever the warmup:
      ``decay_steps = total_steps - warmup_steps`` (``decay_steps`` is then
      ignored). Bind it to the run's ``TRAIN_STEPS`` so that the rate reaches
      ``end_learning_rate`` at the last step. A run shorter than the warm-up
      (a smoke test of a long recipe) warms up for a tenth of its steps
      instead, with a warning.
    cooldown_fraction: ``wsd`` only; the fraction of the decay steps, at their
      end, over which the rate falls linearly from the peak to
      ``end_learning_rate`` (0.2: the usual 20% cool-down).
  """
  if name not in SCHEDULES:
    raise ValueError(
        f"Unknown learning-rate schedule {name!r}; use one of {SCHEDULES} "
        "(e.g. --gin.make_schedule.name=\"'rsqrt'\").")
  if warmup_steps < 0 or decay_steps < 0:
    raise ValueError(
        f"warmup_steps={warmup_steps} and decay_steps={decay_steps} must be >= 0.")
  warmup_steps = int(warmup_steps)
  if total_steps is not None:
    if total_steps < 1:
      raise ValueError(f"total_steps={total_steps} must be at least 1.")
    if total_steps <= warmup_steps:  # a smoke run of a long recipe: keep the shape
      shortened = int(total_steps) // 10
      logger.warning(
          "make_schedule: warmup_steps=%d does not fit in total_steps=%d; warming up "
          "for %d steps (a tenth of the run) so that the rate still reaches "
          "end_learning_rate at the last step. Bind make_schedule.warmup_steps to "
          "choose.", warmup_steps, total_steps, shortened)
      warmup_steps = shortened
    decay_steps = int(total_steps) - warmup_steps
  if not 0.0 < cooldown_fraction <= 1.0:
    raise ValueError(f"cooldown_fraction={cooldown_fraction} must be in (0, 1].")

  if name == "rsqrt":
    floor = max(warmup_steps, 1)

    def rsqrt(step):
      step = jnp.asarray(step, jnp.float32)
      lr = base_learning_rate * jax.lax.rsqrt(jnp.maximum(step, floor))
      if linear_warmup and warmup_steps > 0:
        lr = lr * jnp.minimum(1.0, (step + 1.0) / warmup_steps)
      return lr
    return rsqrt

  if name == "constant":
    main = optax.constant_schedule(base_learning_rate)
  elif name == "linear":
    main = optax.linear_schedule(base_learning_rate, end_learning_rate,
                                 max(int(decay_steps), 1))
  elif name == "wsd":
    cooldown = max(int(round(cooldown_fraction * decay_steps)), 1)
    stable = max(int(decay_steps) - cooldown, 0)
    main = optax.join_schedules(
        [optax.constant_schedule(base_learning_rate),
         optax.linear_schedule(base_learning_rate, end_learning_rate, cooldown)], [stable])
  else:
    alpha = end_learning_rate / base_learning_rate if base_learning_rate else 0.0
    main = optax.cosine_decay_schedule(base_learning_rate,
                                       max(int(decay_steps), 1), alpha=alpha)
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, base_learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


# ----------------------------------------------------------------------------
# Adafactor with "last two dims" factoring
# ----------------------------------------------------------------------------
def factored_dims(shape, min_dim_size_to_factor: int = 128) -> Optional[tuple[int, int]]:
  """The (row, col) dims whose second moments are factored, or ``None``.

  Only the last two dimensions are candidates, and both must be at least
  ``min_dim_size_to_factor``. Leading dimensions (an expert weight's
  ``expert`` dim, a scanned layer dim) are kept whole.
  """
  if len(shape) < 2:
    return None
  if shape[-2] < min_dim_size_to_factor or shape[-1] < min_dim_size_to_factor:
    return None
  return len(shape) - 2, len(shape) - 1


class FactoredRmsState(NamedTuple):
  """Second-moment statistics; each field mirrors the params tree.

  For a factored ``<float>[..., r, c]`` parameter: ``v_row`` is ``[..., r]``,
  ``v_col`` is ``[..., c]`` and ``v`` is ``[1]``. Otherwise ``v`` has the
  parameter's shape and ``v_row``/``v_col`` are ``[1]``.
  """
  count: jax.Array
  v_row: Any
  v_col: Any
  v: Any


def scale_by_factored_rms_last_two(
    decay_rate: float = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30,
) -> optax.GradientTransformation:
  """Adafactor's RMS scaling, factoring only the last two dimensions."""

  def init_fn(params):
    def init_one(p, which):
      dims = factored_dims(p.shape, min_dim_size_to_factor)
      if dims is None:
        shape = p.shape if which == "v" else (1,)
      elif which == "v_row":
        shape = p.shape[:-1]
      elif which == "v_col":
        shape = p.shape[:-2] + p.shape[-1:]
      else:
        shape = (1,)
      return jnp.zeros(shape, jnp.float32)
    return FactoredRmsState(
        count=jnp.zeros([], jnp.int32),
        v_row=jax.tree_util.tree_map(lambda p: init_one(p, "v_row"), params),
        v_col=jax.tree_util.tree_map(lambda p: init_one(p, "v_col"), params),
        v=jax.tree_util.tree_map(lambda p: init_one(p, "v"), params))

  def update_fn(updates, state, params=None):
    del params
    step = state.count.astype(jnp.float32) + 1.0 - step_offset
    decay = 1.0 - jnp.power(jnp.maximum(step, 1.0), -decay_rate)

    def update_one(g, v_row, v_col, v):
      g = g.astype(jnp.float32)
      g2 = g * g + epsilon
      if factored_dims(g.shape, min_dim_size_to_factor) is None:
        new_v = decay * v + (1.0 - decay) * g2
        return g * jax.lax.rsqrt(new_v), v_row, v_col, new_v
      new_row = decay * v_row + (1.0 - decay) * jnp.mean(g2, axis=-1)
      new_col = decay * v_col + (1.0 - decay) * jnp.mean(g2, axis=-2)
      row_norm = jnp.mean(new_row, axis=-1, keepdims=True)
      row_factor = jax.lax.rsqrt(new_row / row_norm)[..., :, None]
      col_factor = jax.lax.rsqrt(new_col)[..., None, :]
      return g * row_factor * col_factor, new_row, new_col, v

    treedef = jax.tree_util.tree_structure(updates)
    outs = [update_one(*xs) for xs in zip(
        treedef.flatten_up_to(updates), treedef.flatten_up_to(state.v_row),
        treedef.flatten_up_to(state.v_col), treedef.flatten_up_to(state.v))]
    new = [treedef.unflatten([o[i] for o in outs]) for i in range(4)]
    return new[0], FactoredRmsState(
        count=optax.safe_increment(state.count),
        v_row=new[1], v_col=new[2], v=new[3])

  return optax.GradientTransformation(init_fn, update_fn)


def adafactor(learning_rate: optax.ScalarOrSchedule,
              decay_rate: float = 0.8,
              step_offset: int = 0,
              min_dim_size_to_factor: int = 128,
              clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True,
              epsilon1: float = 1e-30,
              epsilon2: float = 1e-3,
              weight_decay_rate: Optional[float] = None) -> optax.GradientTransformation:
  """T5's Adafactor (no momentum) with expert-safe factoring."""
  parts = [scale_by_factored_rms_last_two(
      decay_rate, step_offset, min_dim_size_to_factor, epsilon1)]
  if clipping_threshold is not None:
    parts.append(optax.clip_by_block_rms(clipping_threshold))
  if multiply_by_parameter_scale:
    parts.append(optax.scale_by_param_block_rms(epsilon2))
  if weight_decay_rate:
    parts.append(optax.add_decayed_weights(weight_decay_rate))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def make_optimizer(name: str = "adafactor",
                   schedule: Optional[optax.Schedule] = None,
                   max_grad_norm: Optional[float] = None,
                   weight_decay: float = 0.0,
                   b1: float = 0.9,
                   b2: float = 0.999,
                   eps: float = 1e-8,
                   **adafactor_kwargs) -> optax.GradientTransformation:
  """The training optimizer.

  Args:
    name: ``"adafactor"`` (T5) or ``"adamw"``.
    schedule: learning-rate schedule (default: T5's ``rsqrt``).
    max_grad_norm: clip gradients to this global norm first (``None``: off).
    weight_decay: decoupled weight decay (AdamW); for Adafactor, passed as
      ``weight_decay_rate``.
    b1, b2, eps: AdamW moments.
    **adafactor_kwargs: forwarded to :func:`adafactor`.
  """
  if name not in OPTIMIZERS:
    raise ValueError(
        f"Unknown optimizer {name!r}; use one of {OPTIMIZERS} "
        "(e.g. --gin.make_optimizer.name=\"'adamw'\").")
  if schedule is None:
    schedule = make_schedule("rsqrt")
  if name == "adafactor":
    if weight_decay:
      adafactor_kwargs.setdefault("weight_decay_rate", weight_decay)
    tx = adafactor(schedule, **adafactor_kwargs)
  else:
    if adafactor_kwargs:
      raise ValueError(
          f"Options {sorted(adafactor_kwargs)} apply to adafactor only; remove "
          "them or set make_optimizer.name='adafactor'.")
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if max_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
  return tx


# ----------------------------------------------------------------------------
# Optimizer-state shardings
# ----------------------------------------------------------------------------
def _names(path) -> tuple[str, ...]:
  return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any,
                        param_shardings: Any, mesh) -> Any:
  """``NamedSharding``s for an optax state whose subtrees mirror the params.

  A state leaf is matched to the parameter whose tree path is a suffix of the
  leaf's path. It takes the parameter's spec when it has the parameter's
  shape; a factored statistic (``v_row`` ``[..., r]``, ``v_col`` ``[..., c]``)
  takes the spec with the reduced dimension removed; anything else (counts,
  ``[1]`` placeholders) is replicated.
  """
  replicated = NamedSharding(mesh, P())
  param_leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  shard_leaves = jax.tree_util.tree_leaves(
      param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  by_path = {}
  for (path, leaf), sharding in zip(param_leaves, shard_leaves):
    names = _names(path)
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    by_path[names] = (tuple(leaf.shape), spec)
  max_len = max((len(k) for k in by_path), default=0)

  def for_leaf(path, leaf):
    shape = tuple(leaf.shape)
    names = _names(path)
    for n in range(min(len(names), max_len), 0, -1):
      hit = by_path.get(names[-n:])
      if hit is None:
        continue
      p_shape, spec = hit
      field = names[-n - 1] if len(names) > n else ""
      if shape == p_shape and field not in ("v_row", "v_col"):
        return NamedSharding(mesh, P(*spec))
      if field == "v_row" and shape == p_shape[:-1]:
        return NamedSharding(mesh, P(*spec[:-1]))
      if field == "v_col" and shape == p_shape[:-2] + p_shape[-1:]:
        return NamedSharding(mesh, P(*(spec[:-2] + spec[-1:])))
      return replicated
    return replicated

  return jax.tree_util.tree_map_with_path(for_leaf, abstract_opt_state)
