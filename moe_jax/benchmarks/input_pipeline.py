"""Input pipeline throughput: examples/s and tokens/s with packing.

  python -m moe_jax.benchmarks.input_pipeline --json [--data_dir DIR]

Reads the Multi30k translation mixture (six directions) from ``--data_dir``
or ``$MOE_JAX_DATA_DIR``; if that data is absent it falls back to the embedded
``synthetic_translate_mix`` (the JSON says which ran). Examples are counted as
packed segments, tokens as non-padding encoder + decoder positions. The first
batch (pipeline construction, vocabulary, shuffle buffers) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
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
  from moe_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  it = pipeline.get_train_iterator(
      mixture, {"inputs": inputs_length, "targets": targets_length},
      batch_size=batch_size, seed=seed, shard_index=0, num_shards=1, pack=True)
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
  args = parser.parse_args(argv)
  if args.mixture:
    mixture, fallback = args.mixture, False
  elif _multi30k_available(args.data_dir):
    mixture, fallback = MULTI30K_MIXTURE, False
  else:
    mixture, fallback = FALLBACK_MIXTURE, True
  import tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
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
