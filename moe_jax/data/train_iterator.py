"""The training iterator factory (gin: ``moe_jax.data.get_train_iterator``).

::

  from moe_jax.data import train_iterator
  it = train_iterator.get_train_iterator(
      "synthetic_translate_mix", {"inputs": 32, "targets": 32},
      batch_size=64, seed=0)                  # global batch; this host's shard
  batch = next(it)                            # dict of <int32>[64 / hosts, length]

It returns a :class:`~moe_jax.data.iterator.DataIterator`, or with a
``curriculum`` a :class:`~moe_jax.data.curriculum.CurriculumIterator`.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import gin

from moe_jax.data import curriculum as curriculum_lib
from moe_jax.data import iterator as iterator_lib
from moe_jax.data import pipeline


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
                       curriculum: Optional[Sequence] = None) -> iterator_lib.DataIterator:
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
    ``save()`` / ``restore()`` of its position (:mod:`moe_jax.data.iterator`).
  """
  if model_type not in pipeline.MODEL_TYPES:
    raise ValueError(f"Unknown model_type {model_type!r}; use one of "
                     f"{pipeline.MODEL_TYPES}.")
  if shard_index is None or num_shards is None:
    default_index, default_count = pipeline.default_shard()
    shard_index = default_index if shard_index is None else shard_index
    num_shards = default_count if num_shards is None else num_shards
  pipeline.ensure_registered(mixture_or_task_name)
  config = dict(
      mixture_or_task_name=mixture_or_task_name,
      task_feature_lengths={k: int(v) for k, v in task_feature_lengths.items()},
      per_host_batch_size=pipeline.per_host_batch(batch_size, num_shards),
      seed=seed, shard_index=shard_index, num_shards=num_shards, pack=pack,
      model_type=model_type, split=split, shuffle=shuffle, num_epochs=num_epochs)
  if curriculum:
    return curriculum_lib.CurriculumIterator(curriculum, config)
  return iterator_lib.DataIterator(config)
