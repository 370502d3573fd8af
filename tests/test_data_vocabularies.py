"""Tests for moe_jax.data.vocabularies."""

import os

import pytest

from moe_jax.data import vocabularies


def test_missing_sentencepiece_path_says_how_to_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="moe-train-vocab"):
    vocabularies.sentencepiece_vocabulary(str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="needs path"):
    vocabularies.get_vocabulary("sentencepiece")
  with pytest.raises(ValueError, match="Unknown vocabulary kind"):
    vocabularies.get_vocabulary("words")


def test_byte_vocabulary_fallback(monkeypatch):
  monkeypatch.delenv(vocabularies.VOCAB_ENV, raising=False)
  vocab = vocabularies.default_vocabulary()
  # UTF-8 bytes shifted by the 3 special ids (pad, eos, unk).
  assert vocab.encode("Aé") == [ord("A") + 3, 0xC3 + 3, 0xA9 + 3]
  assert vocab.vocab_size == 256 + 3 + 100


def test_cached_vocabulary_builds_once_on_first_use(tmp_path):
  calls = []

  def build(path):
    calls.append(path)
    from moe_jax.data import vocab_trainer  # pylint: disable=g-import-not-at-top
    vocab_trainer.train_sentencepiece(["alpha beta gamma delta"] * 20, path, 20,
                                      hard_vocab_limit=False)

  path = str(tmp_path / "c.model")
  vocab = vocabularies.CachedSentencePieceVocabulary(path, build)
  assert not os.path.exists(path) and not calls  # nothing built at construction
  assert vocab.decode(vocab.encode("beta gamma")) == "beta gamma"
  again = vocabularies.CachedSentencePieceVocabulary(path, build)
  assert again.encode("alpha") == vocab.encode("alpha")
  assert calls == [path]


def test_synthetic_vocabulary_lives_in_the_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv(vocabularies.CACHE_DIR_ENV, str(tmp_path))
  vocab = vocabularies.synthetic_vocabulary(seed=0, cache_dir=str(tmp_path))
  assert vocab.sentencepiece_model_file.startswith(str(tmp_path))
  assert vocab.eos_id == 1 and vocab.vocab_size <= vocabularies.SYNTHETIC_VOCAB_SIZE + 100
