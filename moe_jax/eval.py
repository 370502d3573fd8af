r"""``moe-eval``: decode and score a Task/Mixture's eval split from a checkpoint.

  moe-eval --gin_file=models/tiny_switch.gin --gin_file=runs/eval.gin \
      --gin.CHECKPOINT_PATH=/tmp/run --gin.MIXTURE_OR_TASK_NAME=synthetic_translate_mix \
      --gin.EVAL_OUTPUT_DIR=/tmp/run/eval

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

from moe_jax import train as train_bin


def run(gin_files: Sequence[str], bindings: Sequence[str] = (),
        search_paths: Sequence[str] = (), log_fn=print) -> dict:
  """Parses gin and evaluates; returns the metrics ``{task: {metric: value}}``."""
  from moe_jax import models  # pylint: disable=g-import-not-at-top
  from moe_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from moe_jax.evaluation import evaluator, gin_setup, inference  # pylint: disable=g-import-not-at-top
  gin_setup.parse(gin_files, bindings, search_paths)
  checkpoint = gin_setup.required("CHECKPOINT_PATH")
  output_dir = gin_setup.required("EVAL_OUTPUT_DIR")
  name = gin_setup.required("MIXTURE_OR_TASK_NAME")
  lengths = dict(gin_setup.required("TASK_FEATURE_LENGTHS"))
  mesh, rules = gin_setup.mesh_and_rules()
  config = gin_setup.model_config()
  model = models.build_model(config)
  params = inference.load_params(checkpoint, model, mesh, rules)
  evals = pipeline.get_eval_datasets(
      name, lengths, gin_setup.macro("EVAL_BATCH_SIZE", 32),
      split=gin_setup.macro("EVAL_SPLIT", "validation"), shard_index=0, num_shards=1,
      max_examples=gin_setup.macro("EVAL_MAX_EXAMPLES", None))
  spec = gin_setup.decode_spec()
  result = evaluator.evaluate(model, params, evals, mesh, rules, spec,
                              collect_routing=gin_setup.macro("COLLECT_ROUTING_STATS", True))
  evaluator.write_results(output_dir, result, step=gin_setup.checkpoint_step(checkpoint))
  log_fn(json.dumps(result.metrics, indent=1, sort_keys=True))
  return result.metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  def go():
    args = train_bin.parse_flags(argv)
    run(args.gin_file, args.bindings, args.gin_search_paths)
  return train_bin.run_cli("moe-eval", go)


def console_main() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console_main()
