"""Expert pruning for inference (Koishekenov et al. 2023; Kim et al. 2021).

From routing statistics (:mod:`routing_stats`) each expert of each MoE layer
gets a score, normalized to sum to 1 over the layer's experts:

* ``activity``:   share of tokens whose *first* choice is the expert;
* ``importance``: router probability mass it receives over its top-k
  selections (frequency weighted by gate confidence);
* ``load``:       share of all top-k assignments it receives.

The statistics scored are, by ``granularity``:

* ``global``: all groups pooled;
* ``language``: encoder layers use every group whose *source* language is
  the pair's source, decoder layers every group whose *target* language is
  the pair's target (so one encoder pruning serves all pairs from a language);
* ``pair``: only the groups of that exact (source, target) pair.

Then a kept set per layer: ``fixed`` keeps ``ceil(keep * E)`` top experts in
every layer; ``threshold`` keeps the ``round(keep * total experts)`` best
experts of the whole model by score x E (a global threshold), but at least
``min_experts`` (and at least ``k``) in each layer. Kept experts stay in
their original order, so keeping all of them reproduces the model exactly.

:func:`prune_params` slices the expert weights (``experts/*`` along axis 0)
and the router's columns (``router_kernel[:, kept]``, ``router_bias[kept]``,
the aux-loss-free ``expert_bias[kept]``);
:func:`pruned_config` gives the matching ``T5Config`` (per-layer expert
counts in ``SparseLayout.num_experts``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import traverse_util

from moe_jax.evaluation import routing_stats as rs_lib

SCORES = ("activity", "importance", "load")
GRANULARITIES = ("global", "language", "pair")
PER_LAYER = ("fixed", "threshold")


def expert_scores(stats: rs_lib.LayerStats, score: str) -> np.ndarray:
  """<float64>[E] normalized scores (sum 1; uniform when nothing was routed)."""
  if score == "activity":
    raw = stats.top1_count
  elif score == "importance":
    raw = stats.gate_sum
  elif score == "load":
    raw = stats.topk_count
  else:
    raise ValueError(f"Unknown score {score!r}; use one of {SCORES}.")
  total = float(np.sum(raw))
  if total <= 0:
    return np.full(stats.num_experts, 1.0 / stats.num_experts)
  return np.asarray(raw, np.float64) / total


def layer_stats(stats: rs_lib.RoutingStats, layer: str, granularity: str,
                pair: Optional[tuple[str, str]] = None) -> rs_lib.LayerStats:
  """The statistics ``granularity`` scores for ``layer`` (module docstring)."""
  if granularity == "global":
    return stats.pooled(layer)
  if granularity not in GRANULARITIES:
    raise ValueError(f"Unknown granularity {granularity!r}; use one of {GRANULARITIES}.")
  if pair is None:
    raise ValueError(f"granularity={granularity!r} needs a language pair "
                     "(--pair SRC-TGT).")
  src, tgt = pair
  if granularity == "language":
    lang = src if rs_lib.stack_of(layer) == rs_lib.ENCODER else tgt
    groups = stats.groups_for_language(layer, lang)
  else:
    groups = [n for n, g in stats.groups.items()
              if (g.source_language, g.target_language) == (src, tgt)]
  if not groups:
    raise ValueError(
        f"No statistics for {granularity} {pair} in layer {layer!r}; the stats "
        f"have groups {sorted(stats.groups)}. Evaluate that pair first or pick "
        "another --pair.")
  return stats.pooled(layer, groups)


def _floor(stats: rs_lib.LayerStats, min_experts: int) -> int:
  return min(stats.num_experts, max(min_experts, stats.k, 1))


def select_fixed(scores: Mapping[str, np.ndarray], keep: float,
                 floors: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Per layer, the ``max(floor, ceil(keep * E))`` best experts (sorted ids)."""
  out = {}
  for layer, s in scores.items():
    n = min(len(s), max(floors[layer], math.ceil(keep * len(s) - 1e-9)))
    best = np.argsort(-s, kind="stable")[:n]
    out[layer] = np.sort(best)
  return out


def select_threshold(scores: Mapping[str, np.ndarray], keep: float,
                     floors: Mapping[str, int]) -> dict[str, np.ndarray]:
  """The ``round(keep * total)`` best experts over all layers by ``score * E``,
  each layer keeping at least its floor (sorted ids per layer)."""
  total = sum(len(s) for s in scores.values())
  budget = max(sum(floors.values()), int(round(keep * total)))
  chosen = {layer: list(np.argsort(-s, kind="stable")[:floors[layer]])
            for layer, s in scores.items()}
  rest = [(-float(s[e]) * len(s), layer, int(e)) for layer, s in scores.items()
          for e in range(len(s)) if e not in chosen[layer]]
  rest.sort()
  for _, layer, e in rest[:budget - sum(len(c) for c in chosen.values())]:
    chosen[layer].append(e)
  return {layer: np.sort(np.asarray(c, np.int64)) for layer, c in chosen.items()}


@dataclasses.dataclass(frozen=True)
class PruneSpec:
  """What ``moe-prune`` keeps (see module docstring)."""
  keep: float
  granularity: str = "global"
  per_layer: str = "fixed"
  score: str = "importance"
  min_experts: int = 1
  pair: Optional[tuple[str, str]] = None

  def __post_init__(self):
    if not 0.0 < self.keep <= 1.0:
      raise ValueError(f"keep={self.keep} must be in (0, 1] (the fraction of "
                       "experts kept).")
    if self.per_layer not in PER_LAYER:
      raise ValueError(f"per_layer={self.per_layer!r}: use one of {PER_LAYER}.")
    if self.score not in SCORES:
      raise ValueError(f"score={self.score!r}: use one of {SCORES}.")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity={self.granularity!r}: use one of {GRANULARITIES}.")


def choose_experts(stats: rs_lib.RoutingStats, spec: PruneSpec,
                   layers: Optional[list[str]] = None) -> dict[str, np.ndarray]:
  """``{layer path: sorted kept expert ids}`` for every MoE layer with stats."""
  layers = layers or stats.layers()
  per = {layer: layer_stats(stats, layer, spec.granularity, spec.pair) for layer in layers}
  scores = {layer: expert_scores(s, spec.score) for layer, s in per.items()}
  floors = {layer: _floor(s, spec.min_experts) for layer, s in per.items()}
  select = select_fixed if spec.per_layer == "fixed" else select_threshold
  return select(scores, spec.keep, floors)


def moe_layer_paths(params: Any) -> list[str]:
  """Paths of the MoE layers (modules holding ``router_kernel``) in ``params``."""
  suffix = "/router_kernel"
  return sorted(k[:-len(suffix)] for k in traverse_util.flatten_dict(params, sep="/")
                if k.endswith(suffix))


def prune_params(params: Any, selection: Mapping[str, np.ndarray]) -> dict:
  """Params with each selected layer's experts and router columns sliced.

  Returns a nested dict of numpy arrays (host memory).
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  layers = moe_layer_paths(params)
  missing = sorted(set(selection) - set(layers))
  if missing:
    raise ValueError(f"Selection names layers {missing} that are not MoE layers of "
                     f"these params (MoE layers: {layers}); were the statistics "
                     "collected from this model?")
  out = {}
  for name, leaf in flat.items():
    value = np.asarray(jax.device_get(leaf))
    layer = next((l for l in selection if name.startswith(l + "/")), None)
    if layer is not None:
      keep = np.asarray(selection[layer])
      rel = name[len(layer) + 1:]
      if rel == "router_kernel":
        value = value[..., keep]
      elif rel in ("router_bias", "expert_bias") or (rel.startswith("experts/")
                                                     and not rel.endswith("_shared")):
        # Per-expert vectors and kernels; shared-core kernels (``*_shared``)
        # and shared experts (``shared_experts/``) have no expert dim.
        value = value[keep]
    out[name] = value
  return traverse_util.unflatten_dict(out, sep="/")


_LAYER_RE = re.compile(r"^(encoder|decoder)/layers/layers_(\d+)/moe$")


def pruned_config(config, selection: Mapping[str, np.ndarray]):
  """The ``T5Config`` whose sparse layers have the selected expert counts."""
  if config.scan_layers:
    raise ValueError("Pruning a scan_layers=True model is not supported (scanned "
                     "layers must share one expert count); evaluate and prune with "
                     "scan_layers=False (the params convert with "
                     "blocks.unrolled_to_scanned's inverse).")
  counts: dict[tuple[str, int], int] = {}
  for layer, keep in selection.items():
    m = _LAYER_RE.match(layer)
    if m is None:
      raise ValueError(f"Unexpected MoE layer path {layer!r}; expected "
                       "'encoder|decoder/layers/layers_<i>/moe'.")
    counts[(m.group(1), int(m.group(2)))] = len(keep)
  new = {}
  for stack, layout_name, n in (("encoder", "encoder_layout", config.num_encoder_layers),
                                ("decoder", "decoder_layout", config.num_decoder_layers)):
    layout = getattr(config, layout_name)
    stack_moe = config.stack_moe(stack)  # per-stack MoE config, else T5Config.moe
    per = layout.experts_per_layer(n, stack_moe.num_experts if stack_moe else 0)
    if not per:
      continue
    nums = tuple(counts.get((stack, i), e) for i, e in sorted(per.items()))
    new[layout_name] = dataclasses.replace(layout, num_experts=nums)
  return dataclasses.replace(config, **new)


def gin_bindings(config, checkpoint_path: str) -> str:
  """Gin lines that turn the original model config into the pruned one."""
  lines = ["# Pruned model: include the original model gin file first, then this.",
           f"CHECKPOINT_PATH = {checkpoint_path!r}"]
  for stack in ("encoder", "decoder"):
    layout = getattr(config, f"{stack}_layout")
    if layout.num_experts:
      lines.append(f"{stack}/SparseLayout.num_experts = {tuple(layout.num_experts)!r}")
  return "\n".join(lines) + "\n"
