"""Expert-usage heatmaps (matplotlib PNG, one per MoE layer) and a markdown report."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from moe_jax.evaluation import routing_stats as rs_lib


def usage_matrix(stats: rs_lib.RoutingStats, layer: str) -> tuple[list[str], np.ndarray]:
  """``(row labels, <float>[rows, E])``: top-1 share of each expert per language
  (source languages for encoder layers, target languages for decoder layers);
  per task when the tasks carry no language."""
  by_lang = stats.by_language(layer)
  if by_lang:
    labels = sorted(by_lang)
    return labels, np.stack([by_lang[l].top1_fraction() for l in labels])
  labels = sorted(n for n, g in stats.groups.items() if layer in g.layers)
  return labels, np.stack([stats.groups[n].layers[layer].top1_fraction() for n in labels])


def _file_name(layer: str) -> str:
  return layer.replace("/", "_") + ".png"


def save_heatmaps(stats: rs_lib.RoutingStats, output_dir: str) -> dict[str, str]:
  """One PNG per layer under ``output_dir/heatmaps``; ``{layer: path}``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(output_dir, "heatmaps")
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for layer in stats.layers():
    labels, matrix = usage_matrix(stats, layer)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * matrix.shape[1], 1.0 + 0.4 * len(labels)))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("expert")
    side = "source" if rs_lib.stack_of(layer) == rs_lib.ENCODER else "target"
    ax.set_ylabel(f"{side} language")
    ax.set_title(f"{layer}: top-1 share", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = os.path.join(out_dir, _file_name(layer))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths[layer] = path
  return paths


def _metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
  names = sorted({m for v in metrics.values() for m in v})
  lines = ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  for task in sorted(metrics):
    vals = [f"{metrics[task][n]:.2f}" if n in metrics[task] else "" for n in names]
    lines.append(f"| {task} | " + " | ".join(vals) + " |")
  return lines


def write_report(path: str, metrics: Mapping[str, Mapping[str, float]],
                 stats: rs_lib.RoutingStats, images: Mapping[str, str]) -> str:
  """Writes the markdown report (metrics, then per-layer expert usage)."""
  lines = ["# Evaluation report", "", "## Metrics", ""] + _metrics_table(metrics)
  lines += ["", "## Expert usage", "",
            "Top-1 share per expert (router choices before capacity), "
            "dead = experts never chosen first, confidence = mean router "
            "probability when selected.", ""]
  for layer in stats.layers():
    pooled = stats.pooled(layer)
    frac = pooled.top1_fraction()
    dead = int(np.sum(pooled.top1_count == 0))
    lines += [f"### {layer}", "",
              f"{pooled.num_experts} experts, k={pooled.k}, {int(pooled.num_tokens)} "
              f"tokens; busiest expert {int(frac.argmax())} ({100 * frac.max():.1f}%), "
              f"{dead} dead; mean confidence "
              f"{float(pooled.gate_sum.sum() / max(pooled.topk_count.sum(), 1)):.3f}.", ""]
    labels, matrix = usage_matrix(stats, layer)
    lines += ["| group | " + " | ".join(str(e) for e in range(matrix.shape[1])) + " |",
              "|---" * (matrix.shape[1] + 1) + "|"]
    for label, row in zip(labels, matrix):
      lines.append(f"| {label} | " + " | ".join(f"{100 * v:.0f}" for v in row) + " |")
    if layer in images:
      rel = os.path.relpath(images[layer], os.path.dirname(os.path.abspath(path)))
      lines += ["", f"![{layer}]({rel})"]
    lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
