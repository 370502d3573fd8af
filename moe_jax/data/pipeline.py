"""seqio Tasks/Mixtures -> per-host tf.data pipelines and numpy batches.

:func:`build_dataset` is the training pipeline of one host's shard; the
iterator over it, with its checkpointed position, is
:class:`moe_jax.data.iterator.DataIterator`, made by
:func:`moe_jax.data.train_iterator.get_train_iterator`::

  batch = next(it)                            # dict of <int32>[64 / hosts, length]
  batch = partitioner.global_batch(batch)     # dict of jax.Array, batch-sharded
  it.save(directory)                          # this host's position
  ...
  it = get_train_iterator(...same args...); it.restore(directory)
  # -> continues with exactly the batches the first iterator would have given

Eval data::

  evals = pipeline.get_eval_datasets("synthetic_translate_mix",
                                     {"inputs": 32, "targets": 32}, batch_size=64)
  for name, ev in evals.items(): ev.task, ev.examples, ev.batches(), ...

Both entry points are gin-configurable (``moe_jax.data.get_train_iterator.*``,
``moe_jax.data.get_eval_datasets.*``).

* Feature converters: ``model_type="encdec"`` uses seqio's
  ``EncDecFeatureConverter``; ``"decoder"`` uses ``DecoderFeatureConverter``
  (plain LM for target-only tasks, prefix-LM when the task has ``inputs``).
  ``pack=True`` packs several examples per row (segment ids and positions
  added).
* Sharding: each host reads only its shard, ``seqio.ShardInfo(index, count)``
  from ``jax.process_index()`` / ``jax.process_count()`` unless given.
  ``batch_size`` is the *global* batch; each host yields ``batch_size /
  num_shards`` rows, and :meth:`moe_jax.partitioning.Partitioner.global_batch`
  assembles the global ``jax.Array`` sharded over the batch axes with
  ``jax.make_array_from_process_local_data``.
* Determinism and resumption: the order is a pure function of ``seed`` (and of
  the shard); ``tf.data.Options.deterministic`` is set, so a restored
  tf.data iterator continues bitwise identically (see
  :mod:`moe_jax.data.iterator`). seqio's in-memory cache of small sources is
  off: its contents would enter every checkpointed position.
* Bad data: over-long sequences are truncated by the tasks (EOS kept);
  :func:`data_report` counts them. Empty lines / invalid UTF-8 are counted
  by the file readers (:mod:`moe_jax.data.text_files`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Iterator, Mapping, Optional, Sequence

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from moe_jax.data import route_ids as route_ids_lib

MODEL_TYPES = ("encdec", "decoder")
DEFAULT_TASK_MODULES = ("tasks",)


# --------------------------------------------------------------------------
# Registry and converters
# --------------------------------------------------------------------------

def ensure_registered(mixture_or_task_name: str,
                      modules: Sequence[str] = DEFAULT_TASK_MODULES):
  """The registered Task/Mixture, importing ``modules`` first if needed."""
  names = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  if mixture_or_task_name not in names:
    for module in modules:
      importlib.import_module(module)
  try:
    return seqio.get_mixture_or_task(mixture_or_task_name)
  except ValueError as e:
    raise ValueError(
        f"No seqio Task or Mixture named {mixture_or_task_name!r}. Import the "
        "module that registers it (gin: MIXTURE_OR_TASK_MODULE = 'tasks.NAME') "
        f"or pick a registered name, e.g. 'synthetic_translate_mix'.") from e


def make_feature_converter(model_type: str = "encdec",
                           pack: bool = True) -> seqio.FeatureConverter:
  """seqio's converter for ``model_type`` (``encdec`` or ``decoder``)."""
  if model_type == "encdec":
    return seqio.EncDecFeatureConverter(pack=pack)
  if model_type == "decoder":
    return seqio.DecoderFeatureConverter(pack=pack)
  raise ValueError(f"Unknown model_type {model_type!r}; use one of {MODEL_TYPES}.")


def model_feature_lengths(task_feature_lengths: Mapping[str, int],
                          model_type: str = "encdec",
                          pack: bool = True) -> dict[str, int]:
  """Lengths of the model features (e.g. ``decoder_input_tokens``)."""
  converter = make_feature_converter(model_type, pack)
  return dict(converter.get_model_feature_lengths(task_feature_lengths))


def default_shard() -> tuple[int, int]:
  """``(jax.process_index(), jax.process_count())``."""
  return jax.process_index(), jax.process_count()


def per_host_batch(batch_size: int, num_shards: int) -> int:
  if batch_size % num_shards:
    raise ValueError(
        f"Global batch_size={batch_size} is not divisible by the {num_shards} "
        "data shards (hosts); choose a multiple of the host count.")
  return batch_size // num_shards


def build_dataset(mixture_or_task_name: str,
                  task_feature_lengths: Mapping[str, int],
                  per_host_batch_size: Optional[int],
                  seed: Optional[int],
                  shard_index: int = 0,
                  num_shards: int = 1,
                  pack: bool = True,
                  model_type: str = "encdec",
                  split: str = "train",
                  shuffle: bool = True,
                  num_epochs: Optional[int] = None,
                  drop_remainder: bool = True,
                  route_table: Optional[route_ids_lib.RouteIdTable] = None
                  ) -> tf.data.Dataset:
  """The converted (and batched, if a batch size is given) dataset of a shard.

  ``route_table`` (default: the gin-configured ``moe_jax.data.RouteIdTable``,
  off unless its ``level`` is set) adds ``encoder_route_ids`` /
  ``decoder_route_ids`` for task-level MoE routing.
  """
  ensure_registered(mixture_or_task_name)
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index} must be in [0, {num_shards}).")
  shard_info = (seqio.ShardInfo(index=shard_index, num_shards=num_shards)
                if num_shards > 1 else None)
  route_table = route_ids_lib.RouteIdTable() if route_table is None else route_table
  if route_table.enabled:
    ds = route_ids_lib.get_dataset(
        mixture_or_task_name, task_feature_lengths, route_table,
        model_type=model_type, pack=pack, split=split, shuffle=shuffle,
        num_epochs=num_epochs, shard_info=shard_info, seed=seed)
  else:
    # seqio.get_dataset, without seqio's in-memory cache of small sources: its
    # contents would enter every checkpointed iterator state.
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    ds = provider.get_dataset(
        dict(task_feature_lengths), split=split, shuffle=shuffle, seed=seed,
        shard_info=shard_info, num_epochs=num_epochs, try_in_mem_cache=False)
    ds = make_feature_converter(model_type, pack)(ds, dict(task_feature_lengths))
  if per_host_batch_size is not None:
    ds = ds.batch(per_host_batch_size, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


# --------------------------------------------------------------------------
# Eval
# --------------------------------------------------------------------------

@dataclasses.dataclass
class EvalDataset:
  """One Task's eval data on this host.

  Attributes:
    task: the seqio Task (``metric_fns``, ``postprocess_fn``,
      ``output_features`` for decoding).
    examples: preprocessed, untrimmed examples (numpy dicts with
      ``inputs_pretokenized``/``targets_pretokenized`` when the task keeps
      them), in order -- the references for metrics.
    batch_size: rows per batch of :meth:`batches`.
    task_feature_lengths / model_type: the converter settings.
    route_ids: ``(encoder_id, decoder_id)`` of the Task when route ids are on
      (``moe_jax.data.RouteIdTable``); batches then carry
      ``encoder_route_ids`` / ``decoder_route_ids``.
  """
  task: seqio.Task
  examples: list
  batch_size: int
  task_feature_lengths: dict
  model_type: str
  route_ids: Optional[tuple[int, int]] = None

  def batches(self) -> Iterator[tuple[dict, int]]:
    """Yields ``(batch, num_valid)``: unpacked, fixed-size batches in order.

    The last batch is padded with all-zero rows; ``num_valid`` says how many
    leading rows are real examples.
    """
    converter = make_feature_converter(self.model_type, pack=False)
    ds = tf.data.Dataset.from_generator(
        lambda: iter(self._token_examples()),
        output_signature={k: tf.TensorSpec([None], tf.int32)
                          for k in self.task_feature_lengths})
    ds = converter(ds, self.task_feature_lengths).batch(self.batch_size)
    for batch in ds.as_numpy_iterator():
      if self.route_ids is not None:
        batch.update(route_ids_lib.route_id_features(batch, *self.route_ids))
      n = next(iter(batch.values())).shape[0]
      if n < self.batch_size:
        batch = {k: np.concatenate(
            [v, np.zeros((self.batch_size - n,) + v.shape[1:], v.dtype)])
                 for k, v in batch.items()}
      yield batch, n

  def _token_examples(self):
    for ex in self.examples:
      out = {}
      for k, length in self.task_feature_lengths.items():
        ids = np.asarray(ex[k], np.int32)
        if len(ids) > length:  # keep EOS, as append_eos_after_trim does
          ids = np.concatenate([ids[:length - 1], ids[-1:]])
        out[k] = ids
      yield out


@gin.configurable(module="moe_jax.data")
def get_eval_datasets(mixture_or_task_name: str,
                      task_feature_lengths: Mapping[str, int],
                      batch_size: int,
                      split: str = "validation",
                      model_type: str = "encdec",
                      shard_index: Optional[int] = None,
                      num_shards: Optional[int] = None,
                      max_examples: Optional[int] = None) -> dict[str, EvalDataset]:
  """Per-Task eval data (each Task of a Mixture separately), this host's shard.

  ``batch_size`` is the global batch; each host gets ``batch_size /
  num_shards`` rows per batch.
  """
  provider = ensure_registered(mixture_or_task_name)
  if shard_index is None or num_shards is None:
    shard_index, num_shards = default_shard()
  per_host = per_host_batch(batch_size, num_shards)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  table = route_ids_lib.RouteIdTable()  # gin-configured; off by default
  task_route_ids = table.resolve(provider) if table.enabled else {}
  out = {}
  for task in tasks:
    if split not in task.splits:
      continue
    ds = task.get_dataset(
        sequence_length=None, split=split, shuffle=False, num_epochs=1,
        shard_info=(seqio.ShardInfo(shard_index, num_shards)
                    if num_shards > 1 else None),
        trim_output_features=False)
    if max_examples:
      ds = ds.take(max_examples)
    out[task.name] = EvalDataset(
        task=task, examples=list(ds.as_numpy_iterator()), batch_size=per_host,
        task_feature_lengths=dict(task_feature_lengths), model_type=model_type,
        route_ids=task_route_ids.get(task.name))
  if not out:
    raise ValueError(f"No task of {mixture_or_task_name!r} has a {split!r} split.")
  return out


# --------------------------------------------------------------------------
# Bad-data report
# --------------------------------------------------------------------------

def data_report(mixture_or_task_name: str,
                task_feature_lengths: Mapping[str, int],
                split: str = "train",
                max_examples: Optional[int] = None) -> dict[str, dict[str, int]]:
  """Per task: examples read and how many exceed each feature's length.

  Over-long features are truncated by the pipeline; this says how often.
  File readers' counts (empty lines, invalid UTF-8) are added for tasks
  whose source reports them (``source_stats`` attribute).
  """
  provider = ensure_registered(mixture_or_task_name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  report = {}
  for task in tasks:
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                          num_epochs=1, trim_output_features=False)
    if max_examples:
      ds = ds.take(max_examples)
    counts = {"examples": 0}
    counts.update({f"truncated_{k}": 0 for k in task_feature_lengths})
    for ex in ds.as_numpy_iterator():
      counts["examples"] += 1
      for k, length in task_feature_lengths.items():
        if k in ex and len(ex[k]) > length:
          counts[f"truncated_{k}"] += 1
    stats_fn = getattr(task, "source_stats", None)
    if callable(stats_fn):
      counts.update(stats_fn(split))
    report[task.name] = counts
  return report
