"""Vocabularies: T5 SentencePiece from a path, cached trained ones, bytes.

* :func:`sentencepiece_vocabulary` -- a SentencePiece model the user names
  (e.g. T5's ``sentencepiece.model``), with T5's 100 extra ids.
* :func:`synthetic_vocabulary` -- the vocabulary of the embedded synthetic
  languages: a small BPE SentencePiece model (<= 400 pieces, every word of
  the languages one piece, + 100 extra ids) trained
  on first use in a cache directory (``$MOE_JAX_CACHE_DIR`` or
  ``~/.cache/moe_jax``), deterministic, about a second to build.
* :func:`byte_vocabulary` -- seqio's ByteVocabulary (needs no file).
* :func:`get_vocabulary` -- one gin-friendly switch over the three.
* :func:`default_vocabulary` -- what the TFDS-backed tasks (C4, mC4, WMT)
  register with: ``$MOE_JAX_VOCAB`` (e.g. T5's ``sentencepiece.model``, or
  mT5's for mC4) if set, else the byte vocabulary.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Callable, Optional

import gin
import seqio

from moe_jax.data import vocab_trainer

T5_EXTRA_IDS = vocab_trainer.T5_EXTRA_IDS
CACHE_DIR_ENV = "MOE_JAX_CACHE_DIR"
VOCAB_ENV = "MOE_JAX_VOCAB"
SYNTHETIC_VOCAB_SIZE = 400


def default_cache_dir() -> str:
  return os.environ.get(CACHE_DIR_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "moe_jax")


def sentencepiece_vocabulary(path: str,
                             extra_ids: int = T5_EXTRA_IDS) -> seqio.SentencePieceVocabulary:
  """A SentencePiece vocabulary from ``path`` (e.g. T5's ``sentencepiece.model``)."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"SentencePiece model not found at {path!r}. Give the path of T5's "
        "sentencepiece.model, or train one with `moe-train-vocab --task NAME "
        "--output PATH`.")
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def byte_vocabulary(extra_ids: int = T5_EXTRA_IDS) -> seqio.ByteVocabulary:
  """seqio's UTF-8 byte vocabulary (ByT5 layout: pad 0, eos 1, unk 2)."""
  return seqio.ByteVocabulary(extra_ids=extra_ids)


def default_vocabulary(env: str = VOCAB_ENV) -> seqio.Vocabulary:
  """SentencePiece from ``$<env>`` if set (T5's model path), else bytes."""
  path = os.environ.get(env)
  if path:
    return sentencepiece_vocabulary(path)
  return byte_vocabulary()


class CachedSentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePiece vocabulary whose model file is built on first use.

  ``build_fn(path)`` must write the model to ``path`` (atomically); it runs
  only if ``path`` does not exist yet, so task registration stays free.
  """

  _build_lock = threading.Lock()

  def __init__(self, path: str, build_fn: Callable[[str], object],
               extra_ids: int = T5_EXTRA_IDS):
    super().__init__(path, extra_ids=extra_ids)
    self._build_fn = build_fn

  def _ensure_built(self) -> None:
    path = self._sentencepiece_model_file
    if not os.path.exists(path):
      with self._build_lock:
        if not os.path.exists(path):
          self._build_fn(path)

  def _model_context(self):
    self._ensure_built()
    return super()._model_context()

  def __getstate__(self):
    self._ensure_built()  # a pickled copy must be usable without build_fn
    return super().__getstate__()


def _build_synthetic_model(seed: int, path: str) -> None:
  from moe_jax.data import synthetic_languages  # pylint: disable=g-import-not-at-top
  vocab_trainer.train_sentencepiece(
      synthetic_languages.corpus_text_for_vocabulary(seed), path,
      vocab_size=SYNTHETIC_VOCAB_SIZE, model_type="bpe", hard_vocab_limit=False)


@functools.lru_cache(maxsize=8)
def synthetic_vocabulary(seed: int = 0,
                         cache_dir: Optional[str] = None) -> CachedSentencePieceVocabulary:
  """The SentencePiece vocabulary of the embedded synthetic languages."""
  from moe_jax.data import synthetic_languages  # pylint: disable=g-import-not-at-top
  cache_dir = cache_dir or default_cache_dir()
  name = (f"synthetic_v{synthetic_languages.GENERATOR_VERSION}_seed{seed}_bpe"
          f"_{SYNTHETIC_VOCAB_SIZE}.model")
  return CachedSentencePieceVocabulary(
      os.path.join(cache_dir, name),
      functools.partial(_build_synthetic_model, seed))


@gin.configurable(module="moe_jax.data")
def get_vocabulary(kind: str = "synthetic", path: Optional[str] = None,
                   extra_ids: int = T5_EXTRA_IDS) -> seqio.Vocabulary:
  """Vocabulary by name: ``"sentencepiece"`` (with ``path``), ``"synthetic"``, ``"byte"``."""
  if kind == "sentencepiece":
    if not path:
      raise ValueError("get_vocabulary(kind='sentencepiece') needs path=... "
                       "(the .model file).")
    return sentencepiece_vocabulary(path, extra_ids)
  if kind == "synthetic":
    return synthetic_vocabulary()
  if kind == "byte":
    return byte_vocabulary(extra_ids)
  raise ValueError(f"Unknown vocabulary kind {kind!r}; use 'sentencepiece', "
                   "'synthetic' or 'byte'.")
