"""Training metrics: MoE layer statistics, throughput/MFU, and writers.

MoE layers sow unweighted statistics into the ``intermediates`` collection,
named in the one registry ``moe_jax/layers/moe_metrics.py``.
:func:`moe_metrics` turns that tree into flat scalars named
``moe/<layer path>/<metric>`` (a scanned stack's layers get the names of the
unrolled stack when the model config is given); per-expert vectors such as
``expert_load`` (``<float>[num_experts]``, fractions summing to 1) become
``expert_load_max`` = ``num_experts * max(load)`` (1.0 means perfectly
balanced, ``num_experts`` means one expert took everything).

Writers are clu metric writers: TensorBoard event files in
``MODEL_DIR/train`` and ``MODEL_DIR/eval`` (T5X's layout) plus console lines.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.layers import moe_metrics as mm

logger = logging.getLogger("moe_jax.train")

_SCANNED_LAYER = re.compile(r"layer_(\d+)")


def _path_names(path) -> list[str]:
  """Dict keys / attribute names of a tree path (sow tuple indices dropped)."""
  return [str(getattr(k, "key", getattr(k, "name", ""))) for k in path
          if hasattr(k, "key") or hasattr(k, "name")]


def logged_name(metric: str) -> str:
  """The logged name of a sown metric (per-expert vectors log their max)."""
  return f"{metric}_max" if mm.REGISTRY[metric].per_expert else metric


def _scan_period(config: Any, stack: str) -> int:
  moe = config.stack_moe(stack)
  return getattr(config, f"{stack}_layout").scan_period(
      getattr(config, f"num_{stack}_layers"), moe.num_experts if moe else 0)


def _per_layer(names: list[str], leaf: jax.Array, config: Optional[Any]
               ) -> list[tuple[str, jax.Array]]:
  """``[(layer path, value)]`` of one sown leaf; a scanned leaf (stacked over
  blocks, path ``<stack>/layers/layers/layer_j/...``) is unstacked into the
  unrolled names ``<stack>/layers/layers_<block*period+j>/...`` when
  ``config`` is given, else averaged over blocks."""
  scanned = [i for i, n in enumerate(names) if _SCANNED_LAYER.fullmatch(n)]
  if not scanned or config is None:
    return [("/".join(names) or "moe", leaf)]
  i = scanned[-1]
  j, stack = int(_SCANNED_LAYER.fullmatch(names[i]).group(1)), names[0]
  period = _scan_period(config, stack)
  head, tail = names[:i - 1], names[i + 1:]
  return [("/".join(head + [f"layers_{b * period + j}"] + tail), leaf[b])
          for b in range(leaf.shape[0])]


def moe_metrics(intermediates: Any, config: Optional[Any] = None) -> dict[str, jax.Array]:
  """Flat per-layer MoE scalars from a model's ``intermediates`` tree.

  Args:
    intermediates: the ``intermediates`` collection (nested dicts; sown
      values are tuples of arrays, possibly stacked over scanned layers).
    config: the model's ``T5Config``, to name a scanned stack's layers as
      the unrolled ones (``None``: scanned values are averaged over blocks).

  Returns:
    ``{"moe/<layer>/<metric>": <float32>[]}`` for every logged metric of
    the registry, and, over all layers, ``moe/mean/<metric>``.
  """
  logged = mm.logged_names()
  out: dict[str, jax.Array] = {}
  per_metric: dict[str, list[jax.Array]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    names = _path_names(path)
    if not names or names[-1] not in logged:
      continue
    metric, per_expert = logged_name(names[-1]), mm.REGISTRY[names[-1]].per_expert
    for layer, value in _per_layer(names[:-1], jnp.asarray(leaf, jnp.float32), config):
      if per_expert:
        value = value.shape[-1] * jnp.max(value, axis=-1).mean()
      else:
        value = value.mean()
      key = f"moe/{layer}/{metric}"
      if key in out:  # a layer called twice: average its tuple entries
        value = (out[key] + value) / 2
      out[key] = value
      per_metric.setdefault(metric, []).append(value)
  for metric, values in per_metric.items():
    out[f"moe/mean/{metric}"] = jnp.mean(jnp.stack(values))
  return out


# ----------------------------------------------------------------------------
# Throughput and MFU
# ----------------------------------------------------------------------------
def train_flops_per_token(active_param_count: int) -> float:
  """``6 * N`` model FLOPs per trained token (forward 2N + backward 4N).

  Attention's sequence-length term is omitted (small at T5 lengths); the
  estimate is the usual one in MFU reports.
  """
  return 6.0 * active_param_count


def measure_matmul_peak(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
  """Measured FLOP/s of a large ``jnp.dot`` on the default device."""
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (n, n), dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


class Throughput:
  """Tokens/s, step time and MFU from wall-clock time between log points."""

  def __init__(self, flops_per_token: float, peak_flops: Optional[float]):
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self._t = time.perf_counter()
    self._tokens = 0
    self._steps = 0

  def add(self, tokens: int, steps: int = 1):
    self._tokens += tokens
    self._steps += steps

  def read(self) -> dict[str, float]:
    """Returns the rates since the last call and resets the window."""
    now = time.perf_counter()
    dt = max(now - self._t, 1e-9)
    out = {}
    if self._steps:
      out["timing/steps_per_sec"] = self._steps / dt
      out["timing/step_time_ms"] = 1000.0 * dt / self._steps
      out["timing/tokens_per_sec"] = self._tokens / dt
      if self.peak_flops:
        out["timing/mfu"] = (self._tokens * self.flops_per_token / dt
                             / self.peak_flops)
    self._t, self._tokens, self._steps = now, 0, 0
    return out


# ----------------------------------------------------------------------------
# Writers and console lines
# ----------------------------------------------------------------------------
def create_writers(model_dir: Optional[str], is_primary: bool = True):
  """``(train_writer, eval_writer)``: clu writers for MODEL_DIR/{train,eval}.

  Only the primary process writes event files; others get logging-only
  writers that stay silent.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  if not model_dir or not is_primary:
    return metric_writers.MultiWriter([]), metric_writers.MultiWriter([])
  writers = []
  for sub in ("train", "eval"):
    path = os.path.join(model_dir, sub)
    os.makedirs(path, exist_ok=True)
    writers.append(metric_writers.AsyncWriter(metric_writers.SummaryWriter(path)))
  return tuple(writers)


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(jax.device_get(v))) for k, v in metrics.items()}


def format_console(step: int, metrics: Mapping[str, float], prefix: str = "train") -> str:
  """One compact line: headline numbers first, then MoE means, then layers."""
  parts = [f"[{prefix}] step {step:>6d}"]
  heads = (("loss", "loss {:.4f}"), ("cross_entropy", "ce {:.4f}"),
           ("accuracy", "acc {:.3f}"), ("learning_rate", "lr {:.3g}"),
           ("grad_norm", "gnorm {:.3g}"),
           ("timing/tokens_per_sec", "tok/s {:,.0f}"),
           ("timing/step_time_ms", "step {:.1f}ms"),
           ("timing/mfu", "mfu {:.2%}"))
  for key, fmt in heads:
    if key in metrics:
      parts.append(fmt.format(metrics[key]))
  for metric in ("bleu", "chrf"):  # decode-and-score eval: mean over tasks
    values = [v for k, v in metrics.items() if k.endswith("/" + metric)]
    if values:
      parts.append(f"{metric} {sum(values) / len(values):.1f}")
  short = {logged_name(m.name): m.short for m in mm.REGISTRY.values()}
  moe_mean = [f"{short.get(k.split('/')[-1], k)} {v:.3g}"
              for k, v in sorted(metrics.items()) if k.startswith("moe/mean/")]
  if moe_mean:
    parts.append("| moe " + " ".join(moe_mean))
  return "  ".join(parts)


def format_moe_layers(metrics: Mapping[str, float]) -> list[str]:
  """One console line per MoE layer."""
  layers: dict[str, dict[str, float]] = {}
  for k, v in metrics.items():
    if k.startswith("moe/") and not k.startswith("moe/mean/"):
      layer, metric = k[len("moe/"):].rsplit("/", 1)
      layers.setdefault(layer, {})[metric] = v
  lines = []
  for layer in sorted(layers):
    vals = " ".join(f"{m}={v:.3g}" for m, v in sorted(layers[layer].items()))
    lines.append(f"    {layer}: {vals}")
  return lines
