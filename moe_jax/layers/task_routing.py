"""Task-/language-level routing (Task-MoE, Kudugunta et al. 2021; PL-MoE).

With ``MoeConfig.routing_level = "task"`` the router does not look at the
token: every token carries the integer *route id* of its example (a task, a
language or a translation direction; 0 on padding) and its router logits are
the row of a learned table

    router_kernel <float32>[num_route_ids + 1, num_experts]

indexed by that id. It is the token router's ``router_kernel`` applied to a
one-hot route id instead of the hidden state (the paper's "task router"), so
it keeps the token router's parameter name and pruning tools slice it the
same way (columns = experts). All tokens with one id choose the same top-k
experts, so a language is served by ``k`` experts per layer and the model can
be pruned to them exactly (:func:`experts_for_route_ids`).

Capacity: all tokens of a language hit the same ``k`` experts, so with
capacity-based routing most of a group's tokens overflow. Use
``MoeConfig.dropless = True`` (or a capacity factor of about
``num_experts / k``).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ROUTING_LEVELS = ("token", "task")
TABLE_PARAM = "router_kernel"


def missing_route_ids_error() -> ValueError:
  return ValueError(
      "MoeConfig.routing_level='task' routes by the example's route id, but "
      "the model got no route ids. Add the features 'encoder_route_ids' / "
      "'decoder_route_ids' <int32>[batch, length] to the batch (gin: "
      "moe_jax.data.RouteIdTable.level = 'language' or 'task'), or pass "
      "encoder_route_ids= / decoder_route_ids= to the model call; or set "
      "MoeConfig.routing_level='token'.")


class TaskRouterLogits(nn.Module):
  """Router logits from the route-id table (the layer's ``router_kernel``).

  Used by ``MoeLayer`` with a shared scope, so the table sits at
  ``.../moe/router_kernel``. ``__call__(x <float>[batch, length, D], *,
  route_ids <int>[batch, length], deterministic) -> (<float32>[batch, length, E],
  None)`` (no selection bias).
  ``route_ids`` are in ``[0, num_route_ids]`` (0 = padding); ``None`` is
  accepted only while initializing (the table's shape does not depend on the
  ids). An id above ``num_route_ids`` gives NaN logits (out-of-range gather):
  raise ``num_route_ids``.

  Attributes:
    num_route_ids: ``N``; the table has ``N + 1`` rows (row 0: padding).
    num_experts: ``E``.
    init_stddev: stddev of the table's normal initializer.
  """
  num_route_ids: int
  num_experts: int
  init_stddev: float = 0.02

  @nn.compact
  def __call__(self, x: Array, *, route_ids: Optional[Array] = None,
               deterministic: bool = True) -> tuple[Array, None]:
    del deterministic  # no noise on a table lookup
    batch_length = tuple(x.shape[:2])
    table = self.param(
        TABLE_PARAM,
        nn.with_logical_partitioning(nn.initializers.normal(stddev=self.init_stddev),
                                     (None, "unmodeled")),
        (self.num_route_ids + 1, self.num_experts), jnp.float32)
    if route_ids is None:
      if not self.is_initializing():
        raise missing_route_ids_error()
      route_ids = jnp.zeros(batch_length, jnp.int32)
    if tuple(route_ids.shape) != batch_length:
      raise ValueError(
          f"route_ids have shape {tuple(route_ids.shape)} but the layer input has "
          f"[batch, length] = {batch_length}; give one id per token (a "
          "per-example id must be broadcast over the length).")
    table = jnp.asarray(table, jnp.float32)
    return jnp.take(table, route_ids.astype(jnp.int32), axis=0, mode="fill",
                    fill_value=jnp.nan), None


def experts_for_route_ids(params: Any, k: int, encoder_route_id: Optional[int] = None,
                          decoder_route_id: Optional[int] = None
                          ) -> dict[str, np.ndarray]:
  """``{moe layer path: sorted expert ids}`` that the route ids select.

  Reads every task-routing table (``.../moe/router_kernel`` of shape
  ``[N + 1, E]``) of an *unrolled* params tree and takes the top-``k`` of the
  row of the layer's stack: ``encoder_route_id`` for ``encoder/...`` layers,
  ``decoder_route_id`` for ``decoder/...`` ones (language level: the source
  and target language). These are exactly the experts the model uses for
  those examples; the result is a selection for
  :func:`moe_jax.evaluation.pruning.prune_params` /
  :func:`~moe_jax.evaluation.pruning.pruned_config`.
  """
  from moe_jax.checkpoints import tree_paths  # pylint: disable=g-import-not-at-top
  suffix = tree_paths.SEP + TABLE_PARAM
  out = {}
  for name, leaf in tree_paths.flatten_with_paths(params).items():
    if not name.endswith(suffix):
      continue
    route_id = encoder_route_id if name.startswith("encoder") else decoder_route_id
    if route_id is None:
      raise ValueError(f"{name} needs a route id: pass encoder_route_id= and/or "
                       "decoder_route_id=.")
    table = np.asarray(jax.device_get(leaf), np.float32)
    if table.ndim != 2:
      raise ValueError(f"{name} has shape {table.shape}, not [N + 1, E]: scanned "
                       "params are not supported; use scan_layers=False.")
    if not 0 <= route_id < table.shape[0]:
      raise ValueError(f"route id {route_id} is outside the table of {name} "
                       f"({table.shape[0] - 1} route ids).")
    # jax.lax.top_k order: largest first, ties to the lower index.
    best = np.argsort(-table[route_id], kind="stable")[:k]
    out[name[:-len(suffix)]] = np.sort(best)
  if not out:
    raise ValueError("No task-routing table found in these params; was the model "
                     "trained with MoeConfig.routing_level='task'?")
  return out
