"""Evaluation, inference, routing statistics and expert pruning.

* :mod:`~moe_jax.evaluation.inference` -- restore params, sharded batched decoding.
* :mod:`~moe_jax.evaluation.evaluator` -- decode a Task's eval split, its metrics
  (sacreBLEU BLEU / chrF, sequence accuracy), outputs on disk.
* :mod:`~moe_jax.evaluation.routing_stats` -- per-layer expert usage counts,
  mergeable across hosts and runs.
* :mod:`~moe_jax.evaluation.report` -- heatmaps and the markdown report.
* :mod:`~moe_jax.evaluation.pruning` -- expert scores, selection, sliced params.
"""
