"""Decode a Task's eval split, score it, write the results.

The same path serves ``moe-eval`` and evaluation inside ``moe-train``
(:func:`make_training_eval_fn`). Metrics per Task are the Task's own
seqio-style ``metric_fns(targets, predictions)`` (BLEU for the translation
tasks: sacreBLEU ``corpus_bleu``, ``tokenize="intl"``, exponential smoothing,
case-sensitive, on detokenized text, 0-100) plus, for every text task:

* ``chrf``: sacreBLEU ``corpus_chrf`` with its defaults (character 6-grams,
  no word n-grams, beta 2), 0-100;
* ``sequence_accuracy``: % of predictions equal to their reference.

Predictions and references are the Task's postprocessed strings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu
from flax import traverse_util

from moe_jax import partitioning
from moe_jax.data import pipeline
from moe_jax.evaluation import inference
from moe_jax.evaluation import routing_stats as rs_lib


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def chrf(targets: list[str], predictions: list[str]) -> dict[str, float]:
  """sacreBLEU chrF (defaults), 0-100."""
  return {"chrf": sacrebleu.corpus_chrf(list(predictions), [list(targets)]).score}


def sequence_accuracy(targets: list[str], predictions: list[str]) -> dict[str, float]:
  """Percentage of exact matches."""
  if not targets:
    return {"sequence_accuracy": 0.0}
  hits = sum(t == p for t, p in zip(targets, predictions))
  return {"sequence_accuracy": 100.0 * hits / len(targets)}


def task_metrics(task, targets: list[str], predictions: list[str]) -> dict[str, float]:
  """The Task's metric fns, then chrF and sequence accuracy (if not already there)."""
  out: dict[str, float] = {}
  fns = list(task.predict_metric_fns or task.metric_fns)
  for fn in fns + [chrf, sequence_accuracy]:
    for name, value in fn(list(targets), list(predictions)).items():
      out.setdefault(name, float(getattr(value, "score", value)))
  return out


@dataclasses.dataclass
class EvalResult:
  """``metrics[task][metric]``, ``predictions[task]`` (list of dicts), routing stats."""
  metrics: dict[str, dict[str, float]]
  predictions: dict[str, list[dict[str, str]]]
  routing: Optional[rs_lib.RoutingStats] = None

  def flat_metrics(self) -> dict[str, float]:
    return {f"{task}/{name}": v for task, m in self.metrics.items()
            for name, v in m.items()}


_ROUTE_FEATURES = ("encoder_route_ids", "decoder_route_ids")


def _task_routed(model) -> bool:
  return any(m.routing_level == "task" for m in model.config.moe_configs())


def task_routing_counts(params: Any, batch: Mapping[str, Any],
                        k: Union[int, Mapping[str, int]]
                        ) -> dict[str, dict[str, jax.Array]]:
  """:func:`routing_stats.routing_counts` of a task-routed model, from its tables.

  A task-routing layer's logits are ``table[route_id]`` = ``one_hot(route_id)
  @ table``, so ``router_choices`` on one-hot ids gives its exact counts;
  encoder layers use ``encoder_route_ids``, decoder layers
  ``decoder_route_ids`` (0 = padding, not counted). Scanned stacks are summed
  over the scan. Token-routed layers of the same model are not counted.
  ``k``: experts per token, or ``{"encoder": k, "decoder": k}`` per stack.
  """
  out = {}
  for name, table in traverse_util.flatten_dict(params, sep="/").items():
    if not name.endswith("/router_kernel"):
      continue
    layer = name[:-len("/router_kernel")]
    stack = "encoder" if layer.startswith("encoder") else "decoder"
    ids = batch[f"{stack}_route_ids"]
    k_layer = k[stack] if isinstance(k, Mapping) else k
    tables = table if table.ndim == 3 else table[None]
    one_hot = jax.nn.one_hot(ids, tables.shape[-2], dtype=jnp.float32)
    per = [rs_lib.router_choices(one_hot, t, None, k_layer, ids > 0) for t in tables]
    out[layer] = jax.tree_util.tree_map(lambda *xs: sum(xs), *per)
  return out


def _counts_fn(model, partitioner, param_sh, routed: bool, k: Mapping[str, int]):
  bsh = partitioner.batch_sharding
  task_routed = _task_routed(model)

  def counts(params, batch):
    if task_routed:
      return task_routing_counts(params, batch, k)
    return rs_lib.routing_counts(model, params, batch["encoder_input_tokens"],
                                 batch["decoder_input_tokens"],
                                 batch["decoder_target_tokens"])
  keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
  return jax.jit(counts, in_shardings=(param_sh, {
      name: bsh for name in keys + (_ROUTE_FEATURES if routed else ())}))


def _route_kwargs(local: Mapping[str, np.ndarray]) -> dict:
  """Predictor route ids from an eval batch: encoder ``[rows, s]``, decoder one
  id per row (task-level routing); empty when the batch has none."""
  if "decoder_route_ids" not in local:
    return {}
  return {"encoder_route_ids": local["encoder_route_ids"],
          "decoder_route_ids": local["decoder_route_ids"].max(axis=1)}


def evaluate(model, params, evals: Mapping[str, pipeline.EvalDataset],
             partitioner: partitioning.Partitioner,
             spec: inference.DecodeSpec, collect_routing: bool = True,
             max_batches: Optional[int] = None) -> EvalResult:
  """Decodes and scores every Task of ``evals``.

  Args:
    model, params: an encoder-decoder model and its (sharded) params.
    evals: from :func:`moe_jax.data.pipeline.get_eval_datasets` called with
      ``shard_index=0, num_shards=1`` (every host reads the whole split; each
      feeds its rows of each global batch and gets all outputs back, so all
      hosts compute the same metrics).
    partitioner: device mesh and logical-axis rules.
    spec: decoding settings.
    collect_routing: also replay the predictions under teacher forcing and
      count routing choices per MoE layer (the decoder routes each position
      as during decoding, since routing is per token).
    max_batches: evaluate at most this many batches per task.
  """
  predictor = inference.Predictor(model, params, partitioner, spec)
  stack_k = {s: model.config.stack_moe(s).num_selected_experts
             for s in model.config.sparse_stacks()}
  k = max(stack_k.values(), default=1)
  routed = any(ev.route_ids is not None for ev in evals.values())
  counts_fn = (_counts_fn(model, partitioner, predictor.param_shardings, routed, stack_k)
               if collect_routing and model.config.has_moe else None)
  stats = rs_lib.RoutingStats() if counts_fn else None
  hosts = jax.process_count()
  metrics, predictions = {}, {}
  for name, ev in evals.items():
    vocab = ev.task.output_features["targets"].vocabulary
    max_len = spec.max_decode_length or ev.task_feature_lengths["targets"]
    rows = []
    for b, (batch, n) in enumerate(ev.batches()):
      if max_batches is not None and b >= max_batches:
        break
      if batch["encoder_input_tokens"].shape[0] % hosts:
        raise ValueError(f"Eval batch {ev.batch_size} does not split over {hosts} hosts.")
      local = inference.local_rows(batch, batch["encoder_input_tokens"].shape[0] // hosts)
      route = _route_kwargs(local)
      out = predictor.predict(local["encoder_input_tokens"], max_len, **route)
      if counts_fn is not None:
        replay = inference.teacher_forced_batch(local["encoder_input_tokens"],
                                                local_slice(out, hosts))
        if route:
          dec_id = route["decoder_route_ids"][:, None]
          replay["encoder_route_ids"] = route["encoder_route_ids"]
          replay["decoder_route_ids"] = np.where(
              replay["decoder_target_tokens"] > 0, dec_id, 0).astype(np.int32)
        with partitioner.activate():
          glob = partitioner.global_batch(replay)
          stats.add_counts(name, counts_fn(params, glob), k)
      for ids in inference.trim_after_eos(out[:n]):
        rows.append(vocab.decode(ids))
    examples = ev.examples[:len(rows)]
    preds, targets, records = [], [], []
    for ex, text in zip(examples, rows):
      target_raw = (_text(ex["targets_pretokenized"]) if "targets_pretokenized" in ex
                    else vocab.decode([int(t) for t in ex["targets"] if t > 1]))
      pred = ev.task.postprocess_fn(text, example=ex, is_target=False)
      target = ev.task.postprocess_fn(target_raw, example=ex, is_target=True)
      preds.append(pred)
      targets.append(target)
      records.append({"input": _text(ex.get("inputs_pretokenized", b"")),
                      "target": _text(target), "prediction": _text(pred)})
    metrics[name] = task_metrics(ev.task, targets, preds)
    predictions[name] = records
  return EvalResult(metrics, predictions, stats)


def local_slice(global_rows: np.ndarray, hosts: int) -> np.ndarray:
  """This host's block of a gathered global batch."""
  per_host = global_rows.shape[0] // hosts
  start = jax.process_index() * per_host
  return global_rows[start:start + per_host]


def write_results(output_dir: str, result: EvalResult, step: int = 0,
                  heatmaps: bool = True, writer=None) -> dict[str, str]:
  """Writes ``metrics.json``, ``predictions/<task>.jsonl``, TensorBoard scalars,
  ``routing_stats.json``, heatmaps and ``report.md`` (primary host only).

  Returns ``{what: path}`` of the files written.
  """
  if jax.process_index() != 0:
    return {}
  os.makedirs(output_dir, exist_ok=True)
  paths = {"metrics": os.path.join(output_dir, "metrics.json")}
  with open(paths["metrics"], "w") as f:
    json.dump(result.metrics, f, indent=2, sort_keys=True)
  pred_dir = os.path.join(output_dir, "predictions")
  os.makedirs(pred_dir, exist_ok=True)
  for task, records in result.predictions.items():
    with open(os.path.join(pred_dir, f"{task}.jsonl"), "w") as f:
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
  paths["predictions"] = pred_dir
  if writer is None:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    writer = metric_writers.create_default_writer(output_dir, asynchronous=False)
  writer.write_scalars(step, result.flat_metrics())
  writer.flush()
  if result.routing is not None:
    from moe_jax.evaluation import report  # pylint: disable=g-import-not-at-top
    paths["routing_stats"] = os.path.join(output_dir, "routing_stats.json")
    result.routing.save(paths["routing_stats"])
    images = report.save_heatmaps(result.routing, output_dir) if heatmaps else {}
    paths["report"] = report.write_report(os.path.join(output_dir, "report.md"),
                                          result.metrics, result.routing, images)
  return paths


def make_training_eval_fn(model, partitioner: partitioning.Partitioner,
                          mixture_or_task_name: str,
                          task_feature_lengths: Mapping[str, int], batch_size: int,
                          spec: Optional[inference.DecodeSpec] = None,
                          split: str = "validation", max_examples: Optional[int] = None,
                          output_dir: Optional[str] = None
                          ) -> Callable[[int, Any], dict[str, float]]:
  """``fn(step, params) -> {"<task>/<metric>": value}`` for the training loop.

  Reads the eval data once; each call decodes, scores and (with
  ``output_dir``) writes ``output_dir/<step>/`` like ``moe-eval``.
  """
  evals = pipeline.get_eval_datasets(mixture_or_task_name, task_feature_lengths,
                                     batch_size, split=split, shard_index=0,
                                     num_shards=1, max_examples=max_examples)
  spec = spec or inference.DecodeSpec()

  def run(step: int, params: Any) -> dict[str, float]:
    result = evaluate(model, params, evals, partitioner, spec,
                      collect_routing=output_dir is not None)
    if output_dir:
      write_results(os.path.join(output_dir, str(step)), result, step)
    return result.flat_metrics()
  return run
