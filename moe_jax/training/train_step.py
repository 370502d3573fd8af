"""The jitted train and eval steps, with gradient accumulation.

Loss normalization: the cross-entropy (+ output z-loss) is summed over the
target tokens of the *global* batch and divided by that batch's number of
non-padding target tokens, so splitting the batch into microbatches gives
exactly the full-batch gradient. The MoE auxiliary losses (already weighted
by the model's loss factors) are averaged over microbatches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax import partitioning
from moe_jax.models import losses
from moe_jax.training import metrics as metrics_lib
from moe_jax.training import train_state as train_state_lib

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights of the loss terms.

  Attributes:
    z_loss: output (logit) z-loss factor (T5X: 1e-4).
    aux_loss_factor: Switch load-balancing loss factor (ST-MoE: 1e-2).
    router_z_loss_factor: router z-loss factor (default 0, as in Switch; ST-MoE uses 1e-3).
      Both MoE losses are SUMMED over MoE layers (see moe_jax/models/losses.py).
    label_smoothing: cross-entropy label smoothing.
  """
  z_loss: float = 1e-4
  aux_loss_factor: float = 1e-2
  router_z_loss_factor: float = 0.0
  label_smoothing: float = 0.0


def _sum_sown(intermediates: Any, name: str) -> jax.Array:
  """Sum over MoE layers of a sown per-layer scalar.

  A layer's value is a scalar; under ``nn.scan`` it is stacked to
  ``[num_blocks]``, which is summed too, so scanned and unrolled stacks give
  the same total.
  """
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    last = path[-2] if len(path) >= 2 and not hasattr(path[-1], "key") else path[-1]
    if getattr(last, "key", None) == name:
      total = total + jnp.sum(jnp.asarray(leaf, jnp.float32))
  return total


def token_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                 cfg: LossConfig) -> dict[str, jax.Array]:
  """Weighted *sums* of per-token losses.

  Args:
    logits: ``<float>[batch, length, vocab]``.
    targets: ``<int>[batch, length]``.
    weights: ``<float>[batch, length]`` (0 on padding).

  Returns:
    ``cross_entropy_sum``, ``z_loss_sum``, ``correct_sum``, ``num_tokens``.
  """
  per_token, z_term = losses.token_cross_entropy(
      logits, targets, cfg.label_smoothing, cfg.z_loss)
  ce = per_token - z_term
  weights = weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {
      "cross_entropy_sum": jnp.sum(ce * weights),
      "z_loss_sum": jnp.sum(z_term * weights),
      "correct_sum": jnp.sum(correct * weights),
      "num_tokens": jnp.sum(weights),
  }


def _loss_weights(batch: Batch) -> jax.Array:
  if "decoder_loss_weights" in batch:
    return batch["decoder_loss_weights"]
  return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


def forward(model: nn.Module, params: Any, batch: Batch, cfg: LossConfig,
            rng: Optional[jax.Array], enable_dropout: bool
            ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """One forward pass; returns ``(loss_sums, moe_metrics)``."""
  rngs = None
  if rng is not None:
    keys = jax.random.split(rng, len(train_state_lib.TRAIN_RNG_STREAMS))
    rngs = dict(zip(train_state_lib.TRAIN_RNG_STREAMS, keys))
  args, kwargs = train_state_lib.model_inputs(batch)
  logits, mutables = model.apply(
      {"params": params}, *args, **kwargs,
      enable_dropout=enable_dropout, rngs=rngs, mutable=["intermediates"])
  inter = mutables.get("intermediates", {})
  sums = token_losses(logits, batch["decoder_target_tokens"],
                      _loss_weights(batch), cfg)
  sums["moe_aux_loss"] = cfg.aux_loss_factor * _sum_sown(inter, "aux_loss")
  sums["moe_router_z_loss"] = cfg.router_z_loss_factor * _sum_sown(inter, "z_loss")
  return sums, metrics_lib.moe_metrics(inter)


def _split_microbatches(batch: Batch, num_microbatches: int, mesh: Optional[Mesh]):
  """``[B, ...]`` -> ``[M, B/M, ...]`` with example ``i*M + j`` in microbatch j.

  Keeping the strided split (reshape to ``[B/M, M]`` then swap) leaves each
  device's contiguous batch shard local; no data moves between devices.
  """
  def split(x):
    b = x.shape[0]
    y = x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:])
    y = jnp.swapaxes(y, 0, 1)
    if mesh is not None:
      spec = P(None, partitioning.BATCH_MESH_AXES)
      y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
    return y
  return {k: split(v) for k, v in batch.items()}


def loss_and_grads(model: nn.Module, params: Any, batch: Batch, cfg: LossConfig,
                   rng: jax.Array, num_microbatches: int = 1,
                   mesh: Optional[Mesh] = None, enable_dropout: bool = True):
  """Gradient of the normalized loss, accumulated over microbatches.

  Returns:
    ``(grads, metrics)``; ``grads`` has ``params``' structure (float32).
  """
  total_tokens = jnp.maximum(jnp.sum(_loss_weights(batch).astype(jnp.float32)), 1.0)
  m = num_microbatches

  def micro_loss(p, mb, mb_rng):
    sums, moe = forward(model, p, mb, cfg, mb_rng, enable_dropout)
    loss = ((sums["cross_entropy_sum"] + sums["z_loss_sum"]) / total_tokens
            + (sums["moe_aux_loss"] + sums["moe_router_z_loss"]) / m)
    return loss, (sums, moe)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if m == 1:
    (loss, (sums, moe)), grads = grad_fn(params, batch, rng)
  else:
    b = next(iter(batch.values())).shape[0]
    if b % m:
      raise ValueError(
          f"Batch size {b} is not divisible by num_microbatches={m}; change "
          "BATCH_SIZE or train.num_microbatches.")
    micro = _split_microbatches(batch, m, mesh)
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def body(carry, xs):
      acc, loss_acc, sums_acc, moe_acc = carry
      mb, i = xs
      (l, (s, mo)), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
      acc = jax.tree_util.tree_map(lambda a, x: a + x.astype(jnp.float32), acc, g)
      add = lambda a, x: a + x
      return (acc, loss_acc + l, jax.tree_util.tree_map(add, sums_acc, s),
              jax.tree_util.tree_map(lambda a, x: a + x / m, moe_acc, mo)), None

    abstract = jax.eval_shape(lambda: micro_loss(
        params, jax.tree_util.tree_map(lambda x: x[0], micro), rng)[1])
    zero_like = lambda t: jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), t)
    init = (zeros, jnp.zeros((), jnp.float32), zero_like(abstract[0]),
            zero_like(abstract[1]))
    (grads, loss, sums, moe), _ = jax.lax.scan(body, init, (micro, jnp.arange(m)))
  metrics = {
      "loss": loss,
      "cross_entropy": sums["cross_entropy_sum"] / total_tokens,
      "z_loss": sums["z_loss_sum"] / total_tokens,
      "accuracy": sums["correct_sum"] / total_tokens,
      "moe_aux_loss": sums["moe_aux_loss"] / m,
      "moe_router_z_loss": sums["moe_router_z_loss"] / m,
      "num_tokens": sums["num_tokens"],
      **moe,
  }
  return grads, metrics


def make_train_step(model: nn.Module, cfg: LossConfig,
                    schedule: Optional[optax.Schedule] = None,
                    num_microbatches: int = 1, mesh: Optional[Mesh] = None
                    ) -> Callable[[train_state_lib.TrainState, Batch], tuple]:
  """``train_step(state, batch) -> (new_state, metrics)`` (not yet jitted)."""

  def train_step(state: train_state_lib.TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, metrics = loss_and_grads(model, state.params, batch, cfg, rng,
                                    num_microbatches, mesh)
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
    metrics["grad_norm"] = optax.global_norm(grads)
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.apply_gradients(grads)
    metrics["param_norm"] = optax.global_norm(new_state.params)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, cfg: LossConfig) -> Callable[[Any, Batch], dict]:
  """``eval_step(params, batch) -> metric sums`` (teacher-forced, no dropout)."""

  def eval_step(params, batch: Batch):
    sums, moe = forward(model, params, batch, cfg, None, enable_dropout=False)
    return {**sums, **{k: v for k, v in moe.items() if k.startswith("moe/mean/")}}

  return eval_step


def jit_train_step(train_step, state_shardings, batch_sharding):
  """Jits with in/out shardings and the state donated."""
  return jax.jit(train_step,
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None),
                 donate_argnums=(0,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dim over ``('data', 'fsdp', 'expert')``; the rest replicated."""
  return NamedSharding(mesh, P(partitioning.BATCH_MESH_AXES))
