"""The train state, its layout on the mesh, and its sharded initialization.

:class:`StateLayout` is derived once per run from the model, the optimizer
and a :class:`~moe_jax.partitioning.Partitioner`: the abstract state
(``jax.eval_shape`` of the init), its ``NamedSharding`` tree and the
parameters' logical axes. The state is created *directly sharded*
(``jax.jit(init, out_shardings=...)``), so no parameter is ever materialized
whole on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from moe_jax import partitioning
from moe_jax.training import non_trainable
from moe_jax.training import offload as offload_lib
from moe_jax.training import optimizers

# RNG streams the model consumes when training.
TRAIN_RNG_STREAMS = ("dropout", "jitter", "routing")


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  Attributes:
    step: ``<int32>[]`` number of optimizer updates applied.
    params: the model parameters (unboxed flax ``params`` collection).
    opt_state: the optax state.
    rng: ``<uint32>[2]`` base key; step ``s`` uses ``fold_in(rng, s)``.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False,
                                                       default=None)

  def apply_gradients(self, grads) -> "TrainState":
    updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params)
    new_params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=new_params,
                        opt_state=new_opt_state)


def dummy_batch(batch_size: int, feature_lengths: Mapping[str, int]) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of an encoder-decoder training batch (for init / eval_shape).

  Args:
    batch_size: global batch size.
    feature_lengths: ``{"inputs": L_in, "targets": L_out}`` (seqio names).
  """
  enc = feature_lengths.get("inputs")
  dec = feature_lengths["targets"]
  shapes = {"decoder_input_tokens": (batch_size, dec),
            "decoder_target_tokens": (batch_size, dec),
            "decoder_loss_weights": (batch_size, dec)}
  if enc:
    shapes["encoder_input_tokens"] = (batch_size, enc)
  return {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in shapes.items()}


_OPTIONAL_MODEL_FEATURES = ("encoder_segment_ids", "decoder_segment_ids",
                            "encoder_positions", "decoder_positions",
                            "decoder_causal_attention",
                            # Task-level MoE routing (layers/task_routing.py).
                            "encoder_route_ids", "decoder_route_ids")


def model_inputs(batch: Mapping[str, Any]) -> tuple[tuple, dict]:
  """``(args, kwargs)`` for the model from a batch dict (T5X feature names).

  Encoder-decoder batches (with ``encoder_input_tokens``) give
  ``(encoder_input_tokens, decoder_input_tokens, decoder_target_tokens)``;
  decoder-only batches ``(decoder_input_tokens, decoder_target_tokens)``.
  Packing features (segment ids, positions) and route ids go by keyword.
  """
  args = []
  if "encoder_input_tokens" in batch:
    args.append(batch["encoder_input_tokens"])
  args += [batch["decoder_input_tokens"], batch["decoder_target_tokens"]]
  kwargs = {k: batch[k] for k in _OPTIONAL_MODEL_FEATURES if k in batch}
  return tuple(args), kwargs


def _param_init_fn(model: nn.Module, batch_shapes) -> Callable[[jax.Array], Any]:
  def init(rng):
    zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_shapes.items()}
    keys = jax.random.split(rng, 1 + len(TRAIN_RNG_STREAMS))
    rngs = {"params": keys[0]}
    rngs.update(zip(TRAIN_RNG_STREAMS, keys[1:]))
    args, kwargs = model_inputs(zeros)
    variables = model.init(rngs, *args, **kwargs, enable_dropout=False)
    return variables["params"]
  return init


def _unboxed(boxed: Any) -> Any:
  """The abstract leaves of a boxed tree, without sharding constraints (the
  caller may run under a mesh, where ``nn.unbox`` would add them)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  return jax.tree_util.tree_map(
      lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, boxed,
      is_leaf=is_box)


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """The train state of one (model, optimizer) on one mesh, derived once.

  Attributes:
    partitioner: the mesh and logical-axis rules.
    model, tx: the flax module and the optimizer.
    batch_shapes: global batch shapes used to trace the init
      (:func:`dummy_batch`; parameter shapes do not depend on them).
    abstract: ``TrainState`` of ``jax.ShapeDtypeStruct`` leaves (use it for
      checkpoint restore and lowering).
    shardings: ``TrainState`` of ``NamedSharding`` leaves: where the state
      rests between steps (memory kind ``pinned_host`` for the trees
      ``offload`` names, :mod:`moe_jax.training.offload`).
    param_axes: the params' logical axis names (``PartitionSpec`` of logical
      names per leaf, ``None`` for unannotated leaves).
    offload: which trees rest in host memory.
  """
  partitioner: partitioning.Partitioner
  model: nn.Module
  tx: optax.GradientTransformation
  batch_shapes: Mapping[str, jax.ShapeDtypeStruct]
  abstract: TrainState
  shardings: TrainState
  param_axes: Any
  offload: offload_lib.OffloadConfig = offload_lib.OffloadConfig()

  @classmethod
  def create(cls, model: nn.Module, tx: optax.GradientTransformation,
             partitioner: partitioning.Partitioner,
             batch_shapes: Mapping[str, jax.ShapeDtypeStruct],
             offload: Optional[offload_lib.OffloadConfig] = None) -> "StateLayout":
    """Traces the model's init (no arrays are allocated) and derives the shardings.

    Raises:
      ValueError: ``offload`` asks for host memory the devices do not have.
    """
    offload = offload or offload_lib.OffloadConfig()
    offload_lib.check_supported(offload, list(partitioner.mesh.devices.flat))
    init = _param_init_fn(model, batch_shapes)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with partitioner.activate():
      boxed = jax.eval_shape(init, key)
    param_sh = partitioner.params_shardings(boxed)
    params = _unboxed(boxed)
    # Non-trainable parameters (e.g. the aux-loss-free bias) get no optimizer
    # state and no updates from it (training/non_trainable.py).
    tx = non_trainable.exclude_from_optimizer(tx, params)
    opt = jax.eval_shape(tx.init, params)
    shardings = TrainState(
        step=partitioner.replicated, params=param_sh,
        opt_state=optimizers.opt_state_shardings(opt, params, param_sh,
                                                 partitioner.mesh),
        rng=partitioner.replicated, tx=tx)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                          params=params, opt_state=opt, rng=key, tx=tx)
    if offload.params:
      shardings = shardings.replace(
          params=offload_lib.host_shardings(params, shardings.params))
    if offload.optimizer_state:
      shardings = shardings.replace(
          opt_state=offload_lib.host_shardings(opt, shardings.opt_state))
    return cls(partitioner=partitioner, model=model, tx=tx,
               batch_shapes=dict(batch_shapes), abstract=abstract,
               shardings=shardings, param_axes=nn.get_partition_spec(boxed),
               offload=offload)

  @property
  def mesh(self):
    return self.partitioner.mesh

  @property
  def device_shardings(self) -> TrainState:
    """``shardings`` with every leaf in device memory (where the step computes)."""
    return offload_lib.device_shardings(self.shardings)

  def placed_abstract(self) -> TrainState:
    """``abstract`` with each leaf's resting sharding attached (lowering from
    it traces host-memory leaves as host arrays, as the real state is)."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract, self.shardings)

  @property
  def batch_sharding(self):
    return self.partitioner.batch_sharding

  def init(self, seed: int = 0) -> TrainState:
    """A fresh state (params and training RNG from ``seed``), created sharded."""
    init = _param_init_fn(self.model, self.batch_shapes)
    tx = self.tx

    def create():
      init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
      params = nn.unbox(init(init_key))
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=tx.init(params), rng=train_key, tx=tx)

    with self.partitioner.activate():
      return jax.jit(create, out_shardings=self.shardings)()


def init_train_state(model: nn.Module, tx: optax.GradientTransformation,
                     partitioner: partitioning.Partitioner, batch_shapes,
                     seed: int = 0) -> tuple[TrainState, StateLayout]:
  """``(state, layout)``: a fresh sharded state and its :class:`StateLayout`.

  Args:
    model: flax module with T5X's ``__call__`` signature.
    tx: optimizer.
    partitioner: the mesh and logical-axis rules.
    batch_shapes: from :func:`dummy_batch` (the global batch size does not
      change parameter shapes; any size that fits the mesh works).
    seed: parameter and training RNG seed.
  """
  layout = StateLayout.create(model, tx, partitioner, batch_shapes)
  return layout.init(seed), layout

