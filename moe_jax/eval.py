r"""``moe-eval``: decode and score a Task/Mixture's eval split from a checkpoint.

  moe-eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH=/tmp/run \
      --gin.EVAL_OUTPUT_DIR=/tmp/run/eval

The model (and, unless given, the data settings) come from the ``config.gin``
the run wrote next to ``CHECKPOINT_PATH`` (a run or a step directory); a
model gin file (``--gin_file=models/tiny_switch.gin``) given explicitly wins.

Macros read (T5X names): ``CHECKPOINT_PATH`` (model dir = latest step, a
step dir, or a params checkpoint from ``moe-prune``), ``MIXTURE_OR_TASK_NAME``
(+ ``MIXTURE_OR_TASK_MODULE``), ``TASK_FEATURE_LENGTHS``, ``EVAL_SPLIT``,
``EVAL_BATCH_SIZE``, ``EVAL_OUTPUT_DIR``, ``MESH_*``; decoding:
``DECODE_METHOD`` ('greedy' | 'beam' | 'sample'), ``BEAM_SIZE``,
``DECODE_ALPHA``, ``MAX_DECODE_LENGTH``; optional ``EVAL_MAX_EXAMPLES``
(per task) and ``COLLECT_ROUTING_STATS`` (default True).

Writes ``EVAL_OUTPUT_DIR/metrics.json`` ({task: {metric: value}}),
``predictions/<task>.jsonl``, TensorBoard events, ``routing_stats.json``,
``heatmaps/*.png`` and ``report.md``.
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from moe_jax import gin_utils


def run(gin_files: Sequence[str], bindings: Sequence[str] = (),
        search_paths: Sequence[str] = (), log_fn=print) -> dict:
  """Parses gin and evaluates; returns the metrics ``{task: {metric: value}}``."""
  from moe_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from moe_jax.evaluation import evaluator, gin_setup  # pylint: disable=g-import-not-at-top
  checkpoint, output_dir, name, lengths = gin_setup.parse_required(
      "moe-eval", gin_files, bindings, search_paths, log_fn, "CHECKPOINT_PATH",
      "EVAL_OUTPUT_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS")
  model, params, partitioner = gin_setup.load_model(checkpoint)
  evals = pipeline.get_eval_datasets(
      name, dict(lengths), gin_setup.macro("EVAL_BATCH_SIZE", 32),
      split=gin_setup.macro("EVAL_SPLIT", "validation"), shard_index=0, num_shards=1,
      max_examples=gin_setup.macro("EVAL_MAX_EXAMPLES", None))
  spec = gin_setup.decode_spec()
  log_fn(f"moe-eval: {checkpoint} on the {gin_setup.macro('EVAL_SPLIT', 'validation')} "
         f"split of {name}; {describe_decode(spec)}")
  result = evaluator.evaluate(model, params, evals, partitioner, spec,
                              collect_routing=gin_setup.macro("COLLECT_ROUTING_STATS", True))
  evaluator.write_results(output_dir, result, step=gin_setup.checkpoint_step(checkpoint))
  log_fn(json.dumps(result.metrics, indent=1, sort_keys=True))
  return result.metrics


def describe_decode(spec) -> str:
  """One line naming the decoding, e.g. ``beam search (beam 4, alpha 0.6), max length 64``."""
  length = f"max length {spec.max_decode_length or 'of the targets feature'}"
  if spec.method == "beam":
    return f"beam search (beam {spec.beam_size}, alpha {spec.alpha}), {length}"
  if spec.method == "sample":
    return f"sampling (temperature {spec.temperature}, top-k {spec.top_k}), {length}"
  return f"greedy decoding, {length}"


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  def go():
    args = gin_utils.parse_flags(
        argv, prog="moe-eval",
        description="Decode and score a Task/Mixture's eval split from a checkpoint.")
    gin_utils.setup_logging(args.log_level)
    run(args.gin_file, args.bindings, args.gin_search_paths)
  return gin_utils.run_cli("moe-eval", go)


def console_main() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console_main()
