"""Input pipeline throughput with packing, and the cost of resuming it.

  python -m moe_jax.benchmarks.input_pipeline --json [--data_dir DIR]
  python -m moe_jax.benchmarks.input_pipeline --json --resume_at N [--state_dir DIR]

Reads the Multi30k translation mixture (six directions) from ``--data_dir``
or ``$MOE_JAX_DATA_DIR``; if that data is absent it falls back to the embedded
``synthetic_translate_mix`` (the JSON says which ran). Examples are counted as
packed segments, tokens as non-padding encoder + decoder positions. The first
batch (pipeline construction, vocabulary, shuffle buffers) is timed apart.

``--resume_at N`` times what a restarted run pays before its first step: a
fresh process builds the iterator, restores the position saved after ``N``
batches (``DataIterator.save``) and takes one batch (``first_batch_s``,
from building the iterator to that batch; ``process_s`` adds the imports).
The positions are made once by running the pipeline (``prepare_s``, from the
largest cached smaller position) and kept in ``--state_dir`` for later calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

MULTI30K_MIXTURE = "multi30k_translate_mix"
FALLBACK_MIXTURE = "synthetic_translate_mix"


def _count(batch: dict) -> tuple[int, int]:
  """(examples, real tokens) in a packed encoder-decoder batch."""
  enc = batch.get("encoder_segment_ids")
  dec = batch["decoder_segment_ids"]
  examples = int(dec.max(axis=1).sum())  # segment ids run 1..k in each row
  tokens = int((dec > 0).sum()) + (int((enc > 0).sum()) if enc is not None else 0)
  return examples, tokens


def run(mixture: str, batch_size: int, inputs_length: int, targets_length: int,
        num_batches: int, seed: int = 0) -> dict:
  start = time.perf_counter()
  it = _iterator(mixture, batch_size, inputs_length, targets_length, seed)
  first = next(it)
  first_batch_s = time.perf_counter() - start
  examples = tokens = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    e, t = _count(next(it))
    examples, tokens = examples + e, tokens + t
  elapsed = time.perf_counter() - start
  capacity = num_batches * batch_size * (inputs_length + targets_length)
  return {
      "benchmark": "input_pipeline",
      "mixture": mixture,
      "packing": True,
      "batch_size": batch_size,
      "inputs_length": inputs_length,
      "targets_length": targets_length,
      "num_batches": num_batches,
      "first_batch_s": round(first_batch_s, 3),
      "batches_per_s": round(num_batches / elapsed, 2),
      "examples_per_s": round(examples / elapsed, 1),
      "tokens_per_s": round(tokens / elapsed, 1),
      "examples_per_row": round(examples / (num_batches * batch_size), 2),
      "non_padding_fraction": round(tokens / capacity, 3),
      "row_shape_ok": bool(np.all([v.shape == (batch_size, inputs_length)
                                   for k, v in first.items()
                                   if k.startswith("encoder")])),
  }


def _iterator(mixture: str, batch_size: int, inputs_length: int, targets_length: int,
              seed: int):
  from moe_jax.data import train_iterator  # pylint: disable=g-import-not-at-top
  return train_iterator.get_train_iterator(
      mixture, {"inputs": inputs_length, "targets": targets_length},
      batch_size=batch_size, seed=seed, shard_index=0, num_shards=1, pack=True)


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def prepare_positions(args, mixture: str, targets: list[int]) -> tuple[str, dict]:
  """Saved positions after each of ``targets`` batches; ``(root, {N: prepare_s})``.

  Reuses positions already in ``args.state_dir`` (keyed by the settings) and
  makes each new one from the largest smaller one.
  """
  settings = [mixture, args.batch_size, args.inputs_length, args.targets_length, args.seed]
  key = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:12]
  root = os.path.join(args.state_dir, key)
  os.makedirs(root, exist_ok=True)
  times = {}
  for n in sorted(targets):
    target = os.path.join(root, str(n))
    if os.path.isdir(target):
      times[n] = 0.0
      continue
    done = sorted(int(d) for d in os.listdir(root) if d.isdigit() and int(d) < n)
    start = time.perf_counter()
    it = _iterator(mixture, args.batch_size, args.inputs_length, args.targets_length,
                   args.seed)
    if done:
      it.restore(os.path.join(root, str(done[-1])))
    for _ in range(n - it.batches_consumed):
      next(it)
    it.save(target + ".tmp")
    os.rename(target + ".tmp", target)
    times[n] = round(time.perf_counter() - start, 1)
  return root, times


def measure_resume(args, mixture: str, position: str) -> dict:
  """In this (fresh) process: build the iterator, restore, first batch."""
  start = time.perf_counter()
  it = _iterator(mixture, args.batch_size, args.inputs_length, args.targets_length,
                 args.seed)
  it.restore(position)
  next(it)
  return {"first_batch_s": round(time.perf_counter() - start, 3),
          "batches_consumed_before": it.batches_consumed - 1}


def resume(args, mixture: str) -> list[dict]:
  """One JSON row per ``--resume_at`` value, each timed in a fresh process."""
  targets = [int(n) for n in args.resume_at.split(",")]
  root, prepare_s = prepare_positions(args, mixture, targets)
  rows = []
  for n in targets:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "moe_jax.benchmarks.input_pipeline", "--json",
           "--mixture", mixture, "--batch_size", str(args.batch_size),
           "--inputs_length", str(args.inputs_length),
           "--targets_length", str(args.targets_length), "--seed", str(args.seed),
           "--measure_position", os.path.join(root, str(n))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update({"benchmark": "input_pipeline_resume", "mixture": mixture,
                "resume_at": n, "process_s": round(time.perf_counter() - start, 2),
                "prepare_s": prepare_s[n],
                "position_bytes": _dir_bytes(os.path.join(root, str(n))),
                "batch_size": args.batch_size, "inputs_length": args.inputs_length,
                "targets_length": args.targets_length})
    rows.append(row)
  return rows


def _multi30k_available(data_dir: str | None) -> bool:
  if data_dir:
    os.environ["MOE_JAX_DATA_DIR"] = data_dir
  from moe_jax.data import text_files  # pylint: disable=g-import-not-at-top
  try:
    text_files.find_dataset_dir("multi30k", "train.en.gz")
    return True
  except (FileNotFoundError, ValueError):
    return False


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="Print one JSON line.")
  parser.add_argument("--data_dir", default=None,
                      help="Directory holding multi30k/ (else $MOE_JAX_DATA_DIR).")
  parser.add_argument("--mixture", default=None,
                      help="Override the mixture/task (default: Multi30k or fallback).")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--inputs_length", type=int, default=64)
  parser.add_argument("--targets_length", type=int, default=64)
  parser.add_argument("--num_batches", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--resume_at", default=None,
                      help="N or N1,N2,...: time resuming the pipeline after N batches")
  parser.add_argument("--state_dir", default="/tmp/moe_jax_input_pipeline_positions",
                      help="where --resume_at keeps the saved positions")
  parser.add_argument("--measure_position", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.mixture:
    mixture, fallback = args.mixture, False
  elif _multi30k_available(args.data_dir):
    mixture, fallback = MULTI30K_MIXTURE, False
  else:
    mixture, fallback = FALLBACK_MIXTURE, True
  import tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  if args.measure_position:
    result = measure_resume(args, mixture, args.measure_position)
    print(json.dumps(result))
    return result
  if args.resume_at:
    rows = resume(args, mixture)
    for row in rows:
      row["fell_back_to_embedded_default"] = fallback
      print(json.dumps(row) if args.json else row)
    return rows
  result = run(mixture, args.batch_size, args.inputs_length, args.targets_length,
               args.num_batches, args.seed)
  result["fell_back_to_embedded_default"] = fallback
  if args.json:
    print(json.dumps(result))
  else:
    for key, value in result.items():
      print(f"{key:>32}: {value}")
  return result


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  main()
