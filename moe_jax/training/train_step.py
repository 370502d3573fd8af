"""The jitted train and eval steps, with gradient accumulation.

Loss normalization: the cross-entropy (+ output z-loss) is summed over the
target tokens of the *global* batch and divided by that batch's number of
non-padding target tokens, so splitting the batch into microbatches gives
exactly the full-batch gradient. The MoE auxiliary losses (weighted by the
loss factors, :func:`moe_jax.models.losses.weighted_moe_losses`) are averaged
over microbatches.

The forward pass runs inside ``schedule.training_step(state.step)`` so that
step-annealed layers (``moe_jax.layers.schedule``) see the step, microbatches
included. With a :class:`~moe_jax.training.distillation.DistillationConfig`
the step also takes the frozen teacher's params and mixes its soft targets
into the token loss (Mixture-of-Students; see that module).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax import partitioning
from moe_jax.layers import moe_metrics
from moe_jax.layers import schedule as step_schedule
from moe_jax.models import losses
from moe_jax.training import distillation as distillation_lib
from moe_jax.training import metrics as metrics_lib
from moe_jax.training import non_trainable
from moe_jax.training import offload as offload_lib
from moe_jax.training import train_state as train_state_lib

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights of the loss terms.

  Attributes:
    z_loss: output (logit) z-loss factor (T5X: 1e-4).
    aux_loss_factor: Switch load-balancing loss factor (ST-MoE: 1e-2).
    router_z_loss_factor: router z-loss factor (default 0, as in Switch; ST-MoE uses 1e-3).
    label_smoothing: cross-entropy label smoothing.
    cluster_loss_factor: MoEC variance-loss factor (1e-2); the term exists
      only when ``MoeConfig.num_expert_clusters > 0``. Logged as
      ``moe_cluster_loss``.
    sequence_aux_loss_factor: DeepSeek-V3's sequence-wise balance loss
      factor (its alpha, 1e-4); the term exists only when a layer has
      ``MoeConfig.sequence_balance_loss``. Logged as ``moe_sequence_aux_loss``.
    cmr_budget_loss_factor: NLLB conditional-routing budget-loss factor
      (paper: 0.1); the term exists only when CMR is on. Logged as
      ``cmr_budget_loss``.
    All MoE losses are SUMMED over MoE layers (see moe_jax/models/losses.py).
  """
  z_loss: float = 1e-4
  aux_loss_factor: float = 1e-2
  router_z_loss_factor: float = 0.0
  label_smoothing: float = 0.0
  # -- MoEC / NLLB CMR loss factors (issue 10) --
  cluster_loss_factor: float = losses.DEFAULT_CLUSTER_LOSS_FACTOR
  cmr_budget_loss_factor: float = losses.DEFAULT_CMR_BUDGET_LOSS_FACTOR
  # -- DeepSeek-V3 sequence-wise balance loss (MoeConfig.sequence_balance_loss) --
  sequence_aux_loss_factor: float = losses.DEFAULT_SEQUENCE_AUX_LOSS_FACTOR



# Metric / sums keys of the weighted MoE loss terms (the metric registry's
# ``loss_key``s, in registry order).
MOE_LOSS_KEYS = tuple(m.loss_key for m in moe_metrics.loss_metrics())


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
            rng: Optional[jax.Array], enable_dropout: bool,
            teacher: Optional["distillation_lib.TeacherForward"] = None
            ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """One forward pass; returns ``(loss_sums, moe_metrics)``.

  ``loss_sums`` holds the token sums of :func:`token_losses`, the weighted MoE
  terms (``moe_aux_loss``, ``moe_router_z_loss`` and, when sown,
  ``moe_cluster_loss`` / ``cmr_budget_loss``) and, with a ``teacher``,
  ``distillation_sum``: ``sum over target tokens of T^2 KL(teacher || student)``.
  """
  rngs = None
  if rng is not None:
    keys = jax.random.split(rng, len(train_state_lib.TRAIN_RNG_STREAMS))
    rngs = dict(zip(train_state_lib.TRAIN_RNG_STREAMS, keys))
  args, kwargs = train_state_lib.model_inputs(batch)
  logits, mutables = model.apply(
      {"params": params}, *args, **kwargs,
      enable_dropout=enable_dropout, rngs=rngs, mutable=["intermediates"])
  inter = mutables.get("intermediates", {})
  weights = _loss_weights(batch)
  sums = token_losses(logits, batch["decoder_target_tokens"], weights, cfg)
  sums.update(losses.weighted_moe_losses(inter, dataclasses.asdict(cfg)))
  if teacher is not None:
    sums["distillation_sum"] = teacher.loss_sum(batch, logits, weights)
  # Non-trainable parameters' steps ride along with the MoE metrics (so
  # microbatches average them); the train step applies and removes them.
  return sums, {**metrics_lib.moe_metrics(inter), **non_trainable.sown_updates(inter)}


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


def _moe_loss_keys(sums: Mapping[str, Any]) -> list[str]:
  return [k for k in MOE_LOSS_KEYS if k in sums]


def loss_and_grads(model: nn.Module, params: Any, batch: Batch, cfg: LossConfig,
                   rng: jax.Array, num_microbatches: int = 1,
                   mesh: Optional[Mesh] = None, enable_dropout: bool = True,
                   teacher: Optional["distillation_lib.TeacherForward"] = None):
  """Gradient of the normalized loss, accumulated over microbatches.

  Without a teacher the loss is ``(CE + z-loss) / tokens + MoE terms``; with
  one, ``((1-w) CE + w T^2 KL + z-loss) / tokens + MoE terms`` (``w`` =
  ``teacher.weight``, :mod:`moe_jax.training.distillation`).

  Returns:
    ``(grads, metrics)``; ``grads`` has ``params``' structure (float32).
  """
  total_tokens = jnp.maximum(jnp.sum(_loss_weights(batch).astype(jnp.float32)), 1.0)
  m = num_microbatches

  def micro_loss(p, mb, mb_rng):
    sums, moe = forward(model, p, mb, cfg, mb_rng, enable_dropout, teacher)
    ce = sums["cross_entropy_sum"]
    if teacher is not None:
      ce = distillation_lib.mix(ce, sums["distillation_sum"], teacher.weight)
    loss = ((ce + sums["z_loss_sum"]) / total_tokens
            + sum(sums[k] for k in _moe_loss_keys(sums)) / m)
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
      # Offloaded layer params give host-memory gradients: sum them on device.
      g = offload_lib.to_device(g)
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
      **{k: sums[k] / m for k in _moe_loss_keys(sums)},
      "num_tokens": sums["num_tokens"],
      **moe,
  }
  if teacher is not None:
    metrics["distillation_kl"] = sums["distillation_sum"] / total_tokens
  return grads, metrics


def _global_norm(tree) -> jax.Array:
  """``optax.global_norm`` from dot products only: no constants, so it also
  traces on host-memory operands (optax's norm adds the zero imaginary
  part, a device constant)."""
  leaves = [x.reshape(-1).astype(jnp.float32) for x in jax.tree_util.tree_leaves(tree)]
  total = functools.reduce(lambda a, b: a + b, (jnp.vdot(x, x) for x in leaves))
  return jnp.sqrt(total)


def make_train_step(model: nn.Module, cfg: LossConfig,
                    schedule: Optional[optax.Schedule] = None,
                    num_microbatches: int = 1, mesh: Optional[Mesh] = None,
                    distillation: Optional[tuple[nn.Module, "distillation_lib.DistillationConfig"]] = None,
                    update_on_host: bool = False) -> Callable[..., tuple]:
  """``train_step(state, batch) -> (new_state, metrics)`` (not yet jitted).

  ``update_on_host``: run the optimizer update on the host CPU, where the
  offloaded optimizer state rests (:func:`moe_jax.training.offload.on_host_cpu`).

  With ``distillation=(teacher_model, DistillationConfig)`` the step is
  ``train_step(state, batch, teacher_params)`` and adds the Mixture-of-Students
  term (:mod:`moe_jax.training.distillation`).
  """

  def step_body(state, batch, teacher):
    rested = state   # where each leaf rests between steps (host or device)
    rng = jax.random.fold_in(state.rng, state.step)
    with step_schedule.training_step(state.step):
      grads, metrics = loss_and_grads(model, offload_lib.params_for_model(state.params),
                                      batch, cfg, rng, num_microbatches, mesh,
                                      teacher=teacher)
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    moves = {k: metrics.pop(k) for k in list(metrics) if non_trainable.is_update(k)}

    def update(state, grads, moves):
      grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
      new_state = state.apply_gradients(grads)
      params, _ = non_trainable.apply_updates(new_state.params, moves)
      return new_state.replace(params=params), (_global_norm(grads), _global_norm(params))

    if update_on_host:
      # The update runs on the host CPU, on the host-resident state
      # (OPTIMIZER_UPDATE_ON_HOST). Gradients of offloaded parameters are
      # already in host memory (they leave each block as it is
      # differentiated) and stay there.
      new_state, norms = offload_lib.on_host_cpu(update, state, grads, moves)
      norms = jax.device_put(norms, jax.memory.Space.Device)
    else:
      # On the device; host leaves stream in here (no-ops for a state that
      # rests on the device).
      state = state.replace(params=offload_lib.to_device(state.params),
                            opt_state=offload_lib.to_device(state.opt_state))
      new_state, norms = update(state, offload_lib.to_device(grads), moves)
    metrics["grad_norm"], metrics["param_norm"] = norms
    # Each leaf goes back where it rests between steps.
    return offload_lib.place_like(new_state, rested), metrics

  if distillation is None:
    def train_step(state: train_state_lib.TrainState, batch: Batch):
      return step_body(state, batch, None)
    return train_step

  teacher_model, distill_cfg = distillation

  def distill_train_step(state: train_state_lib.TrainState, batch: Batch,
                         teacher_params: Any):
    teacher = distillation_lib.TeacherForward(
        teacher_model, teacher_params, distill_cfg.temperature, distill_cfg.weight)
    return step_body(state, batch, teacher)

  return distill_train_step


def make_eval_step(model: nn.Module, cfg: LossConfig) -> Callable[[Any, Batch], dict]:
  """``eval_step(params, batch) -> metric sums`` (teacher-forced, no dropout)."""

  def eval_step(params, batch: Batch):
    params = offload_lib.params_for_model(params)  # host offload (OFFLOAD_PARAMS)
    sums, moe = forward(model, params, batch, cfg, None, enable_dropout=False)
    return {**sums, **{k: v for k, v in moe.items() if k.startswith("moe/mean/")}}

  return eval_step


def jit_train_step(train_step, state_shardings, batch_sharding,
                   teacher_shardings: Any = None):
  """Jits with in/out shardings and the state donated.

  ``teacher_shardings`` (the teacher params' shardings) is for a distillation
  step, whose third argument is the teacher's params (not donated).
  """
  in_shardings = (state_shardings, batch_sharding)
  if teacher_shardings is not None:
    in_shardings += (teacher_shardings,)
  return jax.jit(train_step,
                 in_shardings=in_shardings,
                 out_shardings=(state_shardings, None),
                 donate_argnums=(0,))


def jitted_train_step(layout: train_state_lib.StateLayout, cfg: LossConfig,
                      schedule: Optional[optax.Schedule] = None,
                      num_microbatches: int = 1,
                      teacher: Optional["distillation_lib.Teacher"] = None):
  """The sharded, jitted train step of ``layout``'s model and optimizer.

  ``step(state, batch) -> (state, metrics)``, or with a loaded distillation
  ``teacher`` ``step(state, batch, teacher.params)``. The state is donated.
  ``moe-train``'s loop and ``Experiment.lower_step`` (``moe-compile``) both
  build their step here, so they compile the same program.
  """
  distill = None if teacher is None else (teacher.model, teacher.config)
  fn = make_train_step(layout.model, cfg, schedule, num_microbatches, layout.mesh,
                       distillation=distill, update_on_host=layout.offload.update_on_host)
  return jit_train_step(fn, layout.shardings, layout.batch_sharding,
                        None if teacher is None else teacher.shardings)

