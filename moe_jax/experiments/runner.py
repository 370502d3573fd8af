"""Runs the command-line tools as subprocesses and collects their results.

Every experiment of ``docs/experiments.md`` is a sequence of the same
commands a user types (``moe-train``, ``moe-eval``, ``moe-upcycle``,
``moe-prune``); this module only builds those command lines, runs them, and
reads what they wrote (TensorBoard scalars, ``metrics.json``). Each finished
run is appended to ``OUT/results.jsonl``; a run whose record exists is not run
again, so an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_data_dir() -> str:
  """``$MOE_JAX_DATA_DIR``, else ``../shared/data`` beside the repository."""
  return os.environ.get("MOE_JAX_DATA_DIR") or os.path.abspath(
      os.path.join(REPO, "..", "shared", "data"))


def read_scalars(event_dir: str) -> dict[str, dict[int, float]]:
  """``{tag: {step: value}}`` of the clu/TensorBoard event files in a directory."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(event_dir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField("tensor"):
          v = float(tf.make_ndarray(value.tensor))
        else:
          v = float(value.simple_value)
        out.setdefault(value.tag, {})[int(event.step)] = v
  return out


@dataclasses.dataclass
class Runner:
  """Runs tools with a fixed environment and records results.

  Attributes:
    out_dir: where model directories and ``results.jsonl`` go.
    env: extra environment variables (data directory, vocabulary).
    dry_run: print the commands instead of running them.
  """
  out_dir: str
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  dry_run: bool = False

  def __post_init__(self):
    os.makedirs(self.out_dir, exist_ok=True)
    self.results_path = os.path.join(self.out_dir, "results.jsonl")

  # --- bookkeeping ------------------------------------------------------
  def records(self) -> dict[str, dict]:
    if not os.path.exists(self.results_path):
      return {}
    with open(self.results_path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return {r["name"]: r for r in rows}

  def record(self, row: dict) -> dict:
    with open(self.results_path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    return row

  def tool(self, name: str, args: Sequence[str], log_name: str) -> None:
    """Runs ``python -m moe_jax.<name> ARGS``; raises with the log tail on failure."""
    cmd = [sys.executable, "-m", f"moe_jax.{name}", *args]
    print("+", " ".join(cmd), flush=True)
    if self.dry_run:
      return
    log_path = os.path.join(self.out_dir, f"{log_name}.log")
    with open(log_path, "w") as log:
      proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **self.env},
                            stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
      with open(log_path) as f:
        tail = f.read()[-3000:]
      raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log {log_path}:\n{tail}")

  # --- the tools ----------------------------------------------------------
  def train_vocab(self, path: str, task: str, pieces: int,
                  max_examples: Optional[int] = None) -> None:
    """``moe-train-vocab``: a BPE SentencePiece model of ``pieces`` pieces on the
    Multi30k ``task``'s text into ``path`` (nothing to do when it exists).

    Runs without ``MOE_JAX_MULTI30K_VOCAB``: the tasks register with the
    cached default vocabulary while the new one is being trained.
    """
    if os.path.exists(path):
      return
    trainer = Runner(self.out_dir, env={k: v for k, v in self.env.items()
                                        if k != "MOE_JAX_MULTI30K_VOCAB"},
                     dry_run=self.dry_run)
    trainer.tool("data.vocab_trainer", [
        f"--task={task}", "--module=tasks.multi30k", f"--vocab_size={pieces}",
        "--model_type=bpe", f"--output={path}",
        *([f"--max_examples={max_examples}"] if max_examples else [])], "vocab")

  def train(self, name: str, gin_files: Sequence[str], overrides: Sequence[str] = (),
            model_dir: Optional[str] = None) -> dict:
    """``moe-train``; returns its record (final eval metrics, step time)."""
    done = self.records()
    if name in done:
      return done[name]
    model_dir = model_dir or os.path.join(self.out_dir, name)
    args = [f"--gin_file={g}" for g in gin_files]
    args += [f"--gin.MODEL_DIR='{model_dir}'"] + [f"--gin.{o}" for o in overrides]
    start = time.time()
    self.tool("train", args, name)
    if self.dry_run:
      return {}
    return self.record({"name": name, "kind": "train", "model_dir": model_dir,
                        "overrides": list(overrides), "wall_s": time.time() - start,
                        **self.summarize(model_dir)})

  def summarize(self, model_dir: str) -> dict:
    """Final eval metrics and training curves of a moe-train model dir."""
    train = read_scalars(os.path.join(model_dir, "train"))
    ev = read_scalars(os.path.join(model_dir, "eval"))
    times = sorted(train.get("timing/step_time_ms", {}).items())[1:]  # skip compile
    last = {tag: vals[max(vals)] for tag, vals in ev.items() if vals}
    bleu = {t.split("/")[0]: v for t, v in last.items() if t.endswith("/bleu")}
    return {
        "eval_loss": last.get("cross_entropy"),
        "eval_accuracy": last.get("accuracy"),
        "bleu": bleu,
        "mean_bleu": statistics.mean(bleu.values()) if bleu else None,
        "step_time_ms": statistics.median(v for _, v in times) if times else None,
        "train_loss_curve": sorted(train.get("cross_entropy", {}).items()),
        "eval_loss_curve": sorted(ev.get("cross_entropy", {}).items()),
        "bleu_curve": sorted(
            (s, statistics.mean(ev[t][s] for t in ev if t.endswith("/bleu") and s in ev[t]))
            for s in ev.get("cross_entropy", {})
            if any(t.endswith("/bleu") and s in ev[t] for t in ev)),
        "train_metrics_last": {t: v[max(v)] for t, v in train.items()
                               if v and (t.startswith("moe/mean/") or "loss" in t)},
        "load_max_curve": sorted(train.get("moe/mean/expert_load_max", {}).items()),
    }

  def evaluate(self, name: str, gin_files: Sequence[str], overrides: Sequence[str],
               output_dir: str) -> dict:
    """``moe-eval``; returns ``{task: {metric: value}}`` (also recorded)."""
    done = self.records()
    if name in done:
      return done[name]
    args = [f"--gin_file={g}" for g in gin_files] + [f"--gin.{o}" for o in overrides]
    args.append(f"--gin.EVAL_OUTPUT_DIR='{output_dir}'")
    self.tool("eval", args, name)
    if self.dry_run:
      return {}
    with open(os.path.join(output_dir, "metrics.json")) as f:
      metrics = json.load(f)
    bleu = {t: m["bleu"] for t, m in metrics.items() if "bleu" in m}
    return self.record({"name": name, "kind": "eval", "bleu": bleu,
                        "mean_bleu": statistics.mean(bleu.values()) if bleu else None,
                        "metrics": metrics})

  def run_tool(self, name: str, tool: str, args: Sequence[str]) -> dict:
    """Any other tool (upcycle, prune): recorded once it succeeds."""
    done = self.records()
    if name in done:
      return done[name]
    self.tool(tool, args, name)
    if self.dry_run:
      return {}
    return self.record({"name": name, "kind": tool, "args": list(args)})


def mean_std(values: Sequence[Optional[float]]) -> str:
  vals = [v for v in values if v is not None]
  if not vals:
    return "n/a"
  if len(vals) == 1:
    return f"{vals[0]:.3f}"
  return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def fmt(value: Any, digits: int = 2) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"
