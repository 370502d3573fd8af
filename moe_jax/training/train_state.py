"""The train state and its sharded initialization.

The state is created *directly sharded*: ``jax.jit(init, out_shardings=...)``
with the shardings computed from ``jax.eval_shape`` of the model's init and
the logical-axis rules, so no parameter is ever materialized whole on one
device.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax import partitioning
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


def state_shardings(model: nn.Module, tx: optax.GradientTransformation,
                    mesh: Mesh, rules, batch_shapes) -> tuple[TrainState, TrainState]:
  """Abstract train state and its ``NamedSharding`` tree.

  Returns:
    ``(abstract_state, shardings)``, both ``TrainState``s; the first holds
    ``jax.ShapeDtypeStruct`` leaves (use it for checkpoint restore).
  """
  init = _param_init_fn(model, batch_shapes)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  with partitioning.with_sharding(mesh, rules):
    boxed = jax.eval_shape(init, key)
  param_sh = partitioning.params_shardings(mesh, boxed, rules)
  params = nn.unbox(boxed)
  opt = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, P())
  shardings = TrainState(
      step=replicated, params=param_sh,
      opt_state=optimizers.opt_state_shardings(opt, params, param_sh, mesh),
      rng=replicated, tx=tx)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                        params=params, opt_state=opt, rng=key, tx=tx)
  return abstract, shardings


def init_train_state(model: nn.Module, tx: optax.GradientTransformation,
                     mesh: Mesh, rules, batch_shapes, seed: int = 0
                     ) -> tuple[TrainState, TrainState]:
  """Initializes the train state directly with its final shardings.

  Args:
    model: flax module with T5X's ``__call__`` signature.
    tx: optimizer.
    mesh: device mesh; rules: logical-axis rules.
    batch_shapes: from :func:`dummy_batch` (the global batch size does not
      change parameter shapes; any size that fits the mesh works).
    seed: parameter and training RNG seed.

  Returns:
    ``(state, shardings)``.
  """
  _, shardings = state_shardings(model, tx, mesh, rules, batch_shapes)
  init = _param_init_fn(model, batch_shapes)

  def create():
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    params = nn.unbox(init(init_key))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=train_key, tx=tx)

  with partitioning.with_sharding(mesh, rules):
    state = jax.jit(create, out_shardings=shardings)()
  return state, shardings
