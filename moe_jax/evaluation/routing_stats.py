"""Routing statistics: how many tokens each expert of each MoE layer receives.

Collection is non-invasive: :func:`routing_counts` applies the model with a
flax method interceptor around every ``MoeLayer.__call__``. After the layer
ran, the interceptor recomputes the router probabilities from the layer's
input and its ``router_kernel`` (float32, as the layer does; eval has no
jitter) and sows, per layer, into ``intermediates``:

* ``routing_top1_count``  <float32>[E]: real tokens whose first choice is e;
* ``routing_topk_count``  <float32>[E]: real tokens with e among their top-k;
* ``routing_gate_sum``    <float32>[E]: sum of the router probability of e over
  those top-k selections (``gate_sum / topk_count`` is e's mean confidence);
* ``routing_num_tokens``  <float32>[]: real (non-padding) tokens.

Counts are router *choices*, before capacity drops. Everything is a sum, so
statistics from several batches, hosts or jobs merge by addition
(:meth:`RoutingStats.merge`).

On disk (JSON, ``FORMAT``)::

  {"format": ..., "groups": {task: {"source_language": "xa",
     "target_language": "xb", "layers": {"encoder/layers/layers_1/moe":
     {"num_experts": 8, "k": 1, "num_tokens": 1234.0, "top1_count": [...],
      "topk_count": [...], "gate_sum": [...]}}}}}

The layer key is the path of the ``MoeLayer`` module in the params tree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "moe_jax.routing_stats/1"
TOP1, TOPK, GATE, TOKENS = ("routing_top1_count", "routing_topk_count",
                            "routing_gate_sum", "routing_num_tokens")
_SOWN = (TOP1, TOPK, GATE, TOKENS)
ENCODER, DECODER = "encoder", "decoder"


def _is_moe_layer(module) -> bool:
  from moe_jax.layers.moe import MoeLayer  # pylint: disable=g-import-not-at-top
  return isinstance(module, MoeLayer)


def router_choices(x: jax.Array, router_kernel: jax.Array,
                   router_bias: Optional[jax.Array], k: int,
                   padding_mask: Optional[jax.Array], config: Optional[Any] = None,
                   selection_bias: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Routing counts of one layer call.

  Args:
    x: <float>[batch, length, embed] the MoE layer's input.
    router_kernel: <float>[embed, E]; router_bias: <float>[E] or None.
    k: experts each token selects.
    padding_mask: <bool|int>[batch, length] (1 = real token) or None.
    config: the layer's ``MoeConfig``: its score function and device limits
      choose the experts as the layer does (``layers/selection.py``); None =
      softmax top-k.
    selection_bias: <float>[E] the aux-loss-free selection bias, or None.

  Returns:
    ``{TOP1: [E], TOPK: [E], GATE: [E], TOKENS: []}`` float32 sums; the gate
    of a choice is its normalized router probability.
  """
  from moe_jax.layers import selection  # pylint: disable=g-import-not-at-top
  logits = jnp.einsum("bld,de->ble", x.astype(jnp.float32),
                      jnp.asarray(router_kernel, jnp.float32))
  if router_bias is not None:
    logits = logits + router_bias
  e = logits.shape[-1]
  scores, probs = selection.score(logits, config.score_function if config else "softmax")
  _, index = selection.select_top_k(  # [b, l, k]
      scores, k, bias=selection_bias,
      num_groups=config.routing_groups if config else 0,
      groups_per_token=config.routing_groups_per_token if config else 0,
      group_score=config.routing_group_score if config else "max")
  gate = jnp.take_along_axis(probs, index, axis=-1)
  mask = (jnp.ones(x.shape[:2], jnp.float32) if padding_mask is None
          else padding_mask.astype(jnp.float32))
  chosen = jax.nn.one_hot(index, e, dtype=jnp.float32) * mask[..., None, None]
  return {TOP1: jnp.sum(chosen[..., 0, :], axis=(0, 1)),
          TOPK: jnp.sum(chosen, axis=(0, 1, 2)),
          GATE: jnp.sum(chosen * gate[..., None], axis=(0, 1, 2)),
          TOKENS: jnp.sum(mask)}


def _interceptor(next_fun, args, kwargs, context):
  out = next_fun(*args, **kwargs)
  module = context.module
  if context.method_name != "__call__" or not _is_moe_layer(module):
    return out
  params = nn.unbox(module.variables.get("params", {}))
  if "router_kernel" not in params:  # e.g. during init
    return out
  x = args[0]
  mask = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
  counts = router_choices(x, params["router_kernel"], params.get("router_bias"),
                          module.config.num_selected_experts, mask, module.config,
                          params.get("expert_bias"))
  for name, value in counts.items():
    module.sow("intermediates", name, value)
  return out


def routing_counts(model: nn.Module, params: Any, *args, **kwargs
                   ) -> dict[str, dict[str, jax.Array]]:
  """Applies ``model`` (``enable_dropout=False``) and returns its routing counts.

  ``args``/``kwargs`` are the model's ``__call__`` inputs (T5X signature).
  Jit-able. Scanned stacks (``scan_layers=True``) are summed over the scan.

  Returns:
    ``{layer path: {TOP1: [E], TOPK: [E], GATE: [E], TOKENS: []}}``.
  """
  with nn.intercept_methods(_interceptor):
    _, state = model.apply({"params": params}, *args, enable_dropout=False,
                           mutable=["intermediates"], **kwargs)
  out: dict[str, dict[str, jax.Array]] = {}
  flat = jax.tree_util.tree_flatten_with_path(state.get("intermediates", {}))[0]
  for path, leaf in flat:
    names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path
             if hasattr(p, "key") or hasattr(p, "name")]
    if not names or names[-1] not in _SOWN:
      continue
    layer = "/".join(names[:-1])
    value = jnp.asarray(leaf, jnp.float32)
    if names[-1] == TOKENS:
      value = jnp.sum(value)
    else:
      value = value.reshape(-1, value.shape[-1]).sum(0)
    entry = out.setdefault(layer, {})
    entry[names[-1]] = entry.get(names[-1], 0.0) + value
  return out


def stack_of(layer: str) -> str:
  """``"encoder"`` or ``"decoder"`` for a layer path (decoder-only: decoder)."""
  return ENCODER if layer.split("/")[0] == ENCODER else DECODER


def languages_of(task_name: str) -> tuple[Optional[str], Optional[str]]:
  """``(source, target)`` of a translation task named ``..._translate_SRC_TGT``."""
  m = re.search(r"translate_([A-Za-z\-]+)_([A-Za-z\-]+)$", task_name)
  return (m.group(1), m.group(2)) if m else (None, None)


@dataclasses.dataclass
class LayerStats:
  """Summed routing counts of one MoE layer (see module docstring)."""
  top1_count: np.ndarray
  topk_count: np.ndarray
  gate_sum: np.ndarray
  num_tokens: float
  k: int

  @property
  def num_experts(self) -> int:
    return int(self.top1_count.shape[0])

  @classmethod
  def zeros(cls, num_experts: int, k: int) -> "LayerStats":
    z = np.zeros(num_experts, np.float64)
    return cls(z.copy(), z.copy(), z.copy(), 0.0, k)

  def __add__(self, other: "LayerStats") -> "LayerStats":
    if other.num_experts != self.num_experts or other.k != self.k:
      raise ValueError(
          f"Cannot merge stats of a layer with {self.num_experts} experts (k={self.k}) "
          f"and {other.num_experts} experts (k={other.k}); were they collected from "
          "the same model?")
    return LayerStats(self.top1_count + other.top1_count,
                      self.topk_count + other.topk_count,
                      self.gate_sum + other.gate_sum,
                      self.num_tokens + other.num_tokens, self.k)

  def top1_fraction(self) -> np.ndarray:
    """<float>[E]: share of tokens whose first choice is each expert."""
    return self.top1_count / max(self.num_tokens, 1.0)

  def mean_confidence(self) -> np.ndarray:
    """<float>[E]: mean router probability of the expert when selected (0 if never)."""
    return np.divide(self.gate_sum, self.topk_count,
                     out=np.zeros_like(self.gate_sum), where=self.topk_count > 0)

  def to_json(self) -> dict:
    return {"num_experts": self.num_experts, "k": self.k,
            "num_tokens": float(self.num_tokens),
            "top1_count": self.top1_count.tolist(),
            "topk_count": self.topk_count.tolist(),
            "gate_sum": self.gate_sum.tolist()}

  @classmethod
  def from_json(cls, d: Mapping) -> "LayerStats":
    return cls(np.asarray(d["top1_count"], np.float64),
               np.asarray(d["topk_count"], np.float64),
               np.asarray(d["gate_sum"], np.float64), float(d["num_tokens"]),
               int(d["k"]))


@dataclasses.dataclass
class GroupStats:
  """Stats of one group of examples (a task): its languages and layers."""
  source_language: Optional[str] = None
  target_language: Optional[str] = None
  layers: dict[str, LayerStats] = dataclasses.field(default_factory=dict)


class RoutingStats:
  """Routing statistics per group (task) and MoE layer; merge by addition."""

  def __init__(self, groups: Optional[Mapping[str, GroupStats]] = None):
    self.groups: dict[str, GroupStats] = dict(groups or {})

  # -- accumulation -----------------------------------------------------------
  def add_counts(self, group: str, counts: Mapping[str, Mapping[str, Any]],
                 k: int) -> None:
    """Adds one :func:`routing_counts` result to ``group`` (created if new).

    ``k`` is the model's ``num_selected_experts``. A new group's languages
    come from its name (``..._translate_SRC_TGT``).
    """
    if group not in self.groups:
      src, tgt = languages_of(group)
      self.groups[group] = GroupStats(src, tgt)
    g = self.groups[group]
    for layer, c in counts.items():
      top1 = np.asarray(jax.device_get(c[TOP1]), np.float64)
      new = LayerStats(top1, np.asarray(jax.device_get(c[TOPK]), np.float64),
                       np.asarray(jax.device_get(c[GATE]), np.float64),
                       float(np.asarray(jax.device_get(c[TOKENS]))),
                       int(k))
      g.layers[layer] = g.layers[layer] + new if layer in g.layers else new

  def merge(self, other: "RoutingStats") -> "RoutingStats":
    """A new object holding the sums of ``self`` and ``other``."""
    out = RoutingStats()
    for source in (self, other):
      for name, g in source.groups.items():
        if name not in out.groups:
          out.groups[name] = GroupStats(g.source_language, g.target_language, {})
        dst = out.groups[name]
        if (dst.source_language, dst.target_language) != (g.source_language,
                                                         g.target_language):
          raise ValueError(f"Group {name!r} has different languages in the two "
                           "stats files; fix the language labels before merging.")
        for layer, s in g.layers.items():
          dst.layers[layer] = dst.layers[layer] + s if layer in dst.layers else s
    return out

  # -- views ------------------------------------------------------------------
  def layers(self) -> list[str]:
    return sorted({layer for g in self.groups.values() for layer in g.layers})

  def pooled(self, layer: str, groups: Optional[Iterable[str]] = None) -> LayerStats:
    """Stats of ``layer`` summed over ``groups`` (default: all)."""
    names = list(self.groups) if groups is None else list(groups)
    total = None
    for name in names:
      s = self.groups[name].layers.get(layer)
      if s is not None:
        total = s if total is None else total + s
    if total is None:
      raise KeyError(f"No statistics for layer {layer!r} in groups {names}; "
                     f"layers with stats: {self.layers()}.")
    return total

  def groups_for_language(self, layer: str, language: str) -> list[str]:
    """Groups relevant to ``language`` for ``layer``: encoder layers use the
    source language, decoder layers the target language."""
    attr = "source_language" if stack_of(layer) == ENCODER else "target_language"
    return [n for n, g in self.groups.items() if getattr(g, attr) == language]

  def languages(self, stack: str) -> list[str]:
    attr = "source_language" if stack == ENCODER else "target_language"
    return sorted({getattr(g, attr) for g in self.groups.values()
                   if getattr(g, attr) is not None})

  def by_language(self, layer: str) -> dict[str, LayerStats]:
    """``{language: pooled stats}`` (source languages for encoder layers)."""
    return {lang: self.pooled(layer, self.groups_for_language(layer, lang))
            for lang in self.languages(stack_of(layer))}

  # -- files ------------------------------------------------------------------
  def to_json(self) -> dict:
    return {"format": FORMAT, "groups": {
        name: {"source_language": g.source_language,
               "target_language": g.target_language,
               "layers": {k: v.to_json() for k, v in sorted(g.layers.items())}}
        for name, g in sorted(self.groups.items())}}

  @classmethod
  def from_json(cls, d: Mapping) -> "RoutingStats":
    if d.get("format") != FORMAT:
      raise ValueError(f"Not a routing statistics file (format {d.get('format')!r}, "
                       f"expected {FORMAT!r}); give the routing_stats.json that "
                       "moe-eval wrote.")
    return cls({name: GroupStats(g.get("source_language"), g.get("target_language"),
                                 {k: LayerStats.from_json(v)
                                  for k, v in g["layers"].items()})
                for name, g in d["groups"].items()})

  def save(self, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(self.to_json(), f)

  @classmethod
  def load(cls, path: str) -> "RoutingStats":
    with open(path) as f:
      return cls.from_json(json.load(f))

  @classmethod
  def load_and_merge(cls, paths: Iterable[str]) -> "RoutingStats":
    """Loads several stats files (e.g. one per host) and sums them."""
    out = cls()
    for p in paths:
      out = out.merge(cls.load(p))
    return out
