"""Per-token route ids (task or language) for task-level MoE routing.

Task-MoE / PL-MoE route every token of an example by the example's task or
language (``MoeConfig.routing_level="task"``, ``layers/task_routing.py``). The
ids travel with the batch like segment ids:

  encoder_route_ids <int32>[batch, length]  -- 0 on padding
  decoder_route_ids <int32>[batch, length]

Each token carries its own example's id, so packing keeps them right.

* :class:`RouteIdTable` (gin ``moe_jax.data.RouteIdTable``; off while
  ``level`` is ``None``) says which ids a Task gets:
  ``level="language"``: encoder id = the *source* language's id, decoder id =
  the *target* language's (languages parsed from the task name's trailing
  ``_{src}_{tgt}`` or ``_{lang}``, ids from ``language_ids``);
  ``level="task"``: one id per Task (direction), ``1..N`` in the sorted
  order of the Mixture's task names, the same for encoder and decoder;
  ``task_ids`` overrides both (``{task name: (encoder_id, decoder_id)}``).
* :func:`add_route_ids` attaches ``inputs_route_ids`` / ``targets_route_ids``
  (rank 1, as long as ``inputs`` / ``targets``) to a Task's examples;
  :class:`RoutedMixture` does it per Task inside a Mixture (before mixing).
* :class:`RouteIdsEncDecFeatureConverter` is seqio's encoder-decoder
  converter that also packs/pads the two features and emits them as
  ``encoder_route_ids`` / ``decoder_route_ids``.
* :func:`get_dataset` = ``seqio.get_dataset`` with all of the above.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import gin
import seqio
import tensorflow as tf

LEVELS = ("language", "task")
# en/de/fr/cs: tasks/multi30k.py; xa/xb/xc: tasks/synthetic.py.
LANGUAGE_IDS = {"en": 1, "de": 2, "fr": 3, "cs": 4, "xa": 5, "xb": 6, "xc": 7}
TASK_ROUTE_FEATURES = ("inputs_route_ids", "targets_route_ids")
MODEL_ROUTE_FEATURES = ("encoder_route_ids", "decoder_route_ids")


def task_languages(task_name: str, language_ids: Mapping[str, int]) -> tuple[str, str]:
  """``(source, target)`` language codes from a task name.

  ``..._en_de`` -> ``("en", "de")``; ``..._en`` (monolingual) -> ``("en", "en")``.
  """
  parts = task_name.split("_")
  if len(parts) >= 2 and parts[-2] in language_ids and parts[-1] in language_ids:
    return parts[-2], parts[-1]
  if parts[-1] in language_ids:
    return parts[-1], parts[-1]
  raise ValueError(
      f"Cannot read languages from task name {task_name!r}: it must end in "
      f"'_SRC_TGT' or '_LANG' with codes from {sorted(language_ids)}. Add the "
      "language to RouteIdTable.language_ids, or give the task's ids in "
      "RouteIdTable.task_ids.")


@gin.configurable(module="moe_jax.data")
@dataclasses.dataclass(frozen=True)
class RouteIdTable:
  """Which route ids each Task's tokens carry (module docstring).

  Attributes:
    level: ``None`` (off: no route-id features), ``"language"`` or ``"task"``.
    language_ids: language code -> id (``>= 1``).
    task_ids: explicit ``{task name: (encoder_id, decoder_id)}``; wins over
      ``level``'s rule for the tasks it names.
  """
  level: Optional[str] = None
  language_ids: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: dict(LANGUAGE_IDS))
  task_ids: Optional[Mapping[str, tuple[int, int]]] = None

  def __post_init__(self):
    if self.level is not None and self.level not in LEVELS:
      raise ValueError(f"RouteIdTable.level={self.level!r}: use None, 'language' or "
                       "'task'.")
    if any(int(v) < 1 for v in self.language_ids.values()):
      raise ValueError("RouteIdTable.language_ids must be >= 1 (0 marks padding).")

  @property
  def enabled(self) -> bool:
    return self.level is not None

  def resolve(self, provider) -> dict[str, tuple[int, int]]:
    """``{task name: (encoder_id, decoder_id)}`` for every Task of ``provider``."""
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    names = sorted(t.name for t in tasks)
    out = {}
    for i, name in enumerate(names):
      if self.task_ids and name in self.task_ids:
        enc, dec = self.task_ids[name]
      elif self.level == "task":
        enc = dec = i + 1
      else:
        src, tgt = task_languages(name, self.language_ids)
        enc, dec = self.language_ids[src], self.language_ids[tgt]
      if min(int(enc), int(dec)) < 1:
        raise ValueError(f"Route ids of {name!r} are {(enc, dec)}; ids start at 1.")
      out[name] = (int(enc), int(dec))
    return out

  def num_route_ids(self, provider) -> int:
    """The largest id ``provider`` uses: the minimum ``MoeConfig.num_route_ids``."""
    return max(max(ids) for ids in self.resolve(provider).values())


def add_route_ids(ds: tf.data.Dataset, encoder_id: int, decoder_id: int) -> tf.data.Dataset:
  """Adds ``inputs_route_ids`` / ``targets_route_ids`` (filled with the ids,
  shaped like ``inputs`` / ``targets``) to every example."""
  def add(ex):
    ex = dict(ex)
    if "inputs" in ex:
      ex["inputs_route_ids"] = tf.fill(tf.shape(ex["inputs"]), tf.constant(encoder_id, tf.int32))
    ex["targets_route_ids"] = tf.fill(tf.shape(ex["targets"]), tf.constant(decoder_id, tf.int32))
    return ex
  return ds.map(add, num_parallel_calls=tf.data.AUTOTUNE)


class RoutedMixture(seqio.Mixture):
  """A view of a registered Mixture whose Task datasets carry route ids.

  Shares the Mixture's tasks, rates and sampling (it is never registered);
  only :meth:`get_task_dataset` differs: each Task's examples get their ids
  before the Tasks are mixed.
  """

  def __init__(self, base: seqio.Mixture, ids: Mapping[str, tuple[int, int]]):  # pylint: disable=super-init-not-called
    self.__dict__.update(vars(base))
    self._route_ids = dict(ids)

  def get_task_dataset(self, task, *args, **kwargs) -> tf.data.Dataset:
    ds = super().get_task_dataset(task, *args, **kwargs)
    return add_route_ids(ds, *self._route_ids[task.name])


_SPEC = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)


class RouteIdsEncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """``EncDecFeatureConverter`` that also packs the route ids.

  Task features ``inputs_route_ids`` / ``targets_route_ids`` are trimmed and
  packed together with ``inputs`` / ``targets`` (same lengths, so every packed
  token keeps its own example's id; padding gets 0) and come out as
  ``encoder_route_ids`` / ``decoder_route_ids``. The caller gives the usual
  ``{"inputs": ..., "targets": ...}`` lengths.
  """
  TASK_FEATURES = {**seqio.EncDecFeatureConverter.TASK_FEATURES,
                   "inputs_route_ids": _SPEC, "targets_route_ids": _SPEC}
  MODEL_FEATURES = {**seqio.EncDecFeatureConverter.MODEL_FEATURES,
                    "encoder_route_ids": _SPEC, "decoder_route_ids": _SPEC}

  @staticmethod
  def _with_route_lengths(task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    lengths = dict(task_feature_lengths)
    lengths.setdefault("inputs_route_ids", lengths["inputs"])
    lengths.setdefault("targets_route_ids", lengths["targets"])
    return lengths

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    return super().__call__(ds, self._with_route_lengths(task_feature_lengths))

  def _convert_example(self, features):
    d = dict(super()._convert_example(features))
    d["encoder_route_ids"] = features["inputs_route_ids"]
    d["decoder_route_ids"] = features["targets_route_ids"]
    return d

  def get_model_feature_lengths(self, task_feature_lengths):
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    lengths["encoder_route_ids"] = task_feature_lengths["inputs"]
    lengths["decoder_route_ids"] = task_feature_lengths["targets"]
    return lengths


def get_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                table: RouteIdTable, *, model_type: str = "encdec", pack: bool = True,
                split: str = "train", shuffle: bool = True,
                num_epochs: Optional[int] = None,
                shard_info: Optional[seqio.ShardInfo] = None,
                seed: Optional[int] = None) -> tf.data.Dataset:
  """``seqio.get_dataset`` whose model features include the route ids."""
  if model_type != "encdec":
    raise ValueError(
        "Route ids are implemented for model_type='encdec' only; for a "
        "decoder-only model pass decoder_route_ids to the model yourself or set "
        "RouteIdTable.level = None.")
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  ids = table.resolve(provider)
  # No in-memory cache: its contents would enter every checkpointed iterator.
  common = dict(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                num_epochs=num_epochs, try_in_mem_cache=False)
  if isinstance(provider, seqio.Mixture):
    ds = RoutedMixture(provider, ids).get_dataset(dict(task_feature_lengths), **common)
  else:
    ds = add_route_ids(provider.get_dataset(dict(task_feature_lengths), **common),
                       *ids[provider.name])
  return RouteIdsEncDecFeatureConverter(pack=pack)(ds, task_feature_lengths)


def route_id_features(batch: Mapping, encoder_id: int, decoder_id: int) -> dict:
  """``encoder_route_ids`` / ``decoder_route_ids`` for an *unpacked* numpy batch
  of one Task: the ids on real tokens, 0 on padding."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {}
  if "encoder_input_tokens" in batch:
    out["encoder_route_ids"] = np.where(
        np.asarray(batch["encoder_input_tokens"]) > 0, encoder_id, 0).astype(np.int32)
  out["decoder_route_ids"] = np.where(
      np.asarray(batch["decoder_target_tokens"]) > 0, decoder_id, 0).astype(np.int32)
  return out
