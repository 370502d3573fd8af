"""seqio Tasks/Mixtures -> per-host numpy batches -> global sharded jax.Arrays.

Entry points for the training and eval binaries::

  from moe_jax.data import pipeline
  it = pipeline.get_train_iterator(
      "synthetic_translate_mix", {"inputs": 32, "targets": 32},
      batch_size=64, seed=0)                  # global batch; this host's shard
  batch = next(it)                            # dict of <int32>[64 / hosts, length]
  batch = pipeline.to_global_batch(batch, mesh)   # dict of jax.Array, batch-sharded
  state = it.get_state()                      # small JSON-able dict
  ...
  it = pipeline.get_train_iterator(...same args...); it.set_state(state)
  # -> continues with exactly the batches the first iterator would have given

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
  num_shards`` rows, and :func:`to_global_batch` assembles the global
  ``jax.Array`` sharded along logical ``('batch', 'length')`` with
  ``jax.make_array_from_process_local_data``.
* Determinism and resumption: the order is a pure function of ``seed`` (and of
  the shard). The iterator position is ``{..., "batches_consumed": n}``;
  :meth:`DataIterator.set_state` rebuilds the same pipeline and skips ``n``
  batches, so the checkpoint holds plain JSON and no pickles. (Skipping costs
  re-reading ``n`` batches at restore time -- cheap next to a training step.)
* Bad data: over-long sequences are truncated by the tasks (EOS kept);
  :func:`data_report` counts them. Empty lines / invalid UTF-8 are counted
  by the file readers (:mod:`moe_jax.data.text_files`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any, Iterator, Mapping, Optional, Sequence

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding

from moe_jax import partitioning
from moe_jax.data import route_ids as route_ids_lib

MODEL_TYPES = ("encdec", "decoder")
STATE_FORMAT = "moe_jax.data.iterator/1"
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


def _per_host_batch(batch_size: int, num_shards: int) -> int:
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
    converter = make_feature_converter(model_type, pack)
    ds = seqio.get_dataset(
        mixture_or_task_name, task_feature_lengths=dict(task_feature_lengths),
        feature_converter=converter, dataset_split=split, shuffle=shuffle,
        num_epochs=num_epochs, shard_info=shard_info, seed=seed, verbose=False)
  if per_host_batch_size is not None:
    ds = ds.batch(per_host_batch_size, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


# --------------------------------------------------------------------------
# Train iterator with a saveable position
# --------------------------------------------------------------------------

class DataIterator:
  """Iterator of per-host numpy batches whose position is a JSON-able dict.

  Yields ``dict[str, np.ndarray]`` of ``<int32>[per_host_batch, length]``.
  """

  def __init__(self, config: Mapping[str, Any]):
    self._config = dict(config)
    self._batches_consumed = 0
    self._iterator: Optional[Iterator] = None

  @property
  def config(self) -> dict:
    return dict(self._config)

  @property
  def batches_consumed(self) -> int:
    return self._batches_consumed

  def _make_iterator(self) -> Iterator:
    c = self._config
    ds = build_dataset(
        c["mixture_or_task_name"], c["task_feature_lengths"],
        c["per_host_batch_size"], c["seed"], c["shard_index"], c["num_shards"],
        pack=c["pack"], model_type=c["model_type"], split=c["split"],
        shuffle=c["shuffle"], num_epochs=c["num_epochs"])
    if self._batches_consumed:
      ds = ds.skip(self._batches_consumed)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._make_iterator()
    batch = next(self._iterator)
    self._batches_consumed += 1
    return batch

  def get_state(self) -> dict:
    """A small JSON-able dict: the data config and the batches consumed."""
    state = {"format": STATE_FORMAT, "batches_consumed": self._batches_consumed}
    state.update(self._config)
    return json.loads(json.dumps(state))  # plain JSON types only

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to the position recorded by :meth:`get_state`.

    Raises:
      ValueError: the state came from a differently configured pipeline.
    """
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"Not a data iterator state (format={state.get('format')!r},"
                       f" expected {STATE_FORMAT!r}).")
    mine = json.loads(json.dumps(self._config))
    for key, value in mine.items():
      # Every host consumes batches in lock-step, so a state saved by one
      # host (the checkpoint keeps process 0's) is valid for all of them:
      # only the shard index differs.
      if key == "shard_index":
        continue
      if state.get(key) != value:
        raise ValueError(
            f"Data iterator state has {key}={state.get(key)!r} but this pipeline "
            f"has {key}={value!r}. Resume with the same data settings, or start "
            "the data from scratch (do not restore the iterator state).")
    self._batches_consumed = int(state["batches_consumed"])
    self._iterator = None  # rebuilt lazily, skipping the consumed batches


@gin.configurable(module="moe_jax.data")
def get_train_iterator(mixture_or_task_name: str,
                       task_feature_lengths: Mapping[str, int],
                       batch_size: int,
                       seed: int = 0,
                       shard_index: Optional[int] = None,
                       num_shards: Optional[int] = None,
                       pack: bool = True,
                       model_type: str = "encdec",
                       split: str = "train",
                       shuffle: bool = True,
                       num_epochs: Optional[int] = None,
                       curriculum: Optional[Sequence] = None) -> DataIterator:
  """The training iterator of this host.

  Args:
    mixture_or_task_name: a registered seqio Task/Mixture (``tasks`` is
      imported if the name is unknown).
    task_feature_lengths: e.g. ``{"inputs": 512, "targets": 114}``.
    batch_size: the *global* batch size (all hosts together).
    seed: fixes shuffling and mixture sampling.
    shard_index, num_shards: this host's data shard (default: process index
      and count).
    pack: pack several examples per row.
    model_type: ``encdec`` or ``decoder``.
    split, shuffle, num_epochs: ``None`` epochs repeats forever.
    curriculum: optional phases ``[(start_step, members), ...]`` (gin
      ``get_train_iterator.curriculum``): training then reads each phase's
      members instead of ``mixture_or_task_name`` (which stays the eval
      mixture); see :mod:`moe_jax.data.curriculum` and docs/curriculum.md.

  Returns:
    A :class:`DataIterator` (a ``CurriculumIterator`` with a curriculum) of
    ``<int32>[batch_size / num_shards, length]`` feature dicts with
    ``get_state()`` / ``set_state()``.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"Unknown model_type {model_type!r}; use one of {MODEL_TYPES}.")
  if shard_index is None or num_shards is None:
    default_index, default_count = default_shard()
    shard_index = default_index if shard_index is None else shard_index
    num_shards = default_count if num_shards is None else num_shards
  ensure_registered(mixture_or_task_name)
  config = dict(
      mixture_or_task_name=mixture_or_task_name,
      task_feature_lengths={k: int(v) for k, v in task_feature_lengths.items()},
      per_host_batch_size=_per_host_batch(batch_size, num_shards),
      seed=seed, shard_index=shard_index, num_shards=num_shards, pack=pack,
      model_type=model_type, split=split, shuffle=shuffle, num_epochs=num_epochs)
  if curriculum:
    from moe_jax.data import curriculum as curriculum_lib  # pylint: disable=g-import-not-at-top
    return curriculum_lib.CurriculumIterator(curriculum, config)
  return DataIterator(config)


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
  per_host = _per_host_batch(batch_size, num_shards)
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
# Global arrays
# --------------------------------------------------------------------------

def batch_sharding(mesh: Mesh,
                   rules: Optional[partitioning.LogicalRules] = None,
                   logical_axes: Sequence[Optional[str]] = ("batch", "length"),
                   ) -> NamedSharding:
  """``NamedSharding`` for a ``<int>[batch, length]`` input feature."""
  rules = partitioning.standard_logical_rules() if rules is None else rules
  return partitioning.logical_sharding(mesh, logical_axes, rules)


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                    rules: Optional[partitioning.LogicalRules] = None
                    ) -> dict[str, jax.Array]:
  """Per-host numpy batch -> global batch-sharded ``jax.Array`` per feature.

  Each host passes its own ``<int>[per_host_batch, length]`` rows; the result
  is ``<int>[per_host_batch * num_hosts, length]`` sharded over the mesh's
  batch axes (``data``, ``fsdp``, ``expert`` by the standard rules).
  """
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    sharding = batch_sharding(mesh, rules, ("batch", "length")[:value.ndim]
                              + (None,) * max(0, value.ndim - 2))
    num_batch_shards = partitioning.mesh_axis_size(
        mesh, sharding.spec[0] if len(sharding.spec) else None)
    global_rows = value.shape[0] * jax.process_count()
    if global_rows % num_batch_shards:
      raise ValueError(
          f"Feature {name!r}: global batch {global_rows} is not divisible by "
          f"the {num_batch_shards} batch shards of the mesh {dict(mesh.shape)}; "
          "make the batch size a multiple of data*fsdp*expert.")
    out[name] = jax.make_array_from_process_local_data(sharding, value)
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
