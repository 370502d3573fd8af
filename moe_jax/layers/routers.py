"""The router registry: ``MoeConfig.router_type`` -> a ``routing.Router``.

A new router is a class with ``route`` and ``rng_mode`` (``routing.Router``)
plus one ``@register("name")`` builder here; the MoE layer never changes.
This module sits above ``routing.py`` and ``dts_gate.py`` (which do not
import it).
"""

from __future__ import annotations

from typing import Callable

from moe_jax.layers import dts_gate
from moe_jax.layers import moe_config as cfg_lib
from moe_jax.layers import routing
from moe_jax.layers import selection

Builder = Callable[[cfg_lib.MoeConfig], routing.Router]
_BUILDERS: dict[str, Builder] = {}


def register(router_type: str) -> Callable[[Builder], Builder]:
  """Decorator: ``builder(config) -> Router`` for ``router_type``."""
  def wrap(builder: Builder) -> Builder:
    if router_type in _BUILDERS:
      raise ValueError(f"router_type {router_type!r} is already registered.")
    _BUILDERS[router_type] = builder
    return builder
  return wrap


def registered() -> tuple[str, ...]:
  return tuple(_BUILDERS)


def make_router(config: cfg_lib.MoeConfig) -> routing.Router:
  """The router ``config.router_type`` names."""
  try:
    builder = _BUILDERS[config.router_type]
  except KeyError:
    raise ValueError(f"Unknown router_type {config.router_type!r}; registered: "
                     f"{sorted(_BUILDERS)}.") from None
  return builder(config)


@register("tokens_choose")
def _tokens_choose(c: cfg_lib.MoeConfig) -> routing.Router:
  return routing.TokensChooseRouter(
      num_selected_experts=c.num_selected_experts, priority=c.priority,
      renormalize_top_k=c.renormalize_top_k, num_clusters=c.num_expert_clusters,
      cluster_dropout_rate=c.cluster_expert_dropout_rate,
      options=selection.SelectionOptions.of(c))


@register("experts_choose")
def _experts_choose(c: cfg_lib.MoeConfig) -> routing.Router:
  del c
  return routing.ExpertsChooseRouter()


@register("dense_to_sparse")
def _dense_to_sparse(c: cfg_lib.MoeConfig) -> routing.Router:
  return dts_gate.DenseToSparseRouter(
      num_selected_experts=c.num_selected_experts, renormalize_top_k=c.renormalize_top_k,
      options=dts_gate.DtsOptions.of(c))
