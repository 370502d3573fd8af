"""Tests for moe_jax.data.vocab_trainer (``moe-train-vocab``)."""

import seqio
import sentencepiece as spm

from moe_jax.data import vocab_trainer

TEXT = ["the cat sat on the mat", "a dog ran in the park", "the bird sang",
        "cats and dogs play"] * 50


def test_trained_model_has_t5_layout_and_round_trips(tmp_path):
  path = vocab_trainer.train_sentencepiece(TEXT, str(tmp_path / "v" / "m.model"),
                                           vocab_size=40, hard_vocab_limit=False)
  sp = spm.SentencePieceProcessor(model_file=path)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  vocab = seqio.SentencePieceVocabulary(path, extra_ids=vocab_trainer.T5_EXTRA_IDS)
  assert vocab.vocab_size == sp.get_piece_size() + 100
  assert vocab.decode(vocab.encode("the dog sat")) == "the dog sat"
  # seqio numbers sentinels from the top: <extra_id_0> is the last id.
  assert vocab.decode([vocab.vocab_size - 1]) == "<extra_id_0>"


def test_training_is_deterministic(tmp_path):
  a = vocab_trainer.train_sentencepiece(TEXT, str(tmp_path / "a.model"), 40,
                                        hard_vocab_limit=False)
  b = vocab_trainer.train_sentencepiece(TEXT, str(tmp_path / "b.model"), 40,
                                        hard_vocab_limit=False)
  assert open(a, "rb").read() == open(b, "rb").read()


def test_console_main_synthetic(tmp_path, capsys):
  out = tmp_path / "syn.model"
  vocab_trainer.console_main(["--synthetic", "--vocab_size", "400",
                              "--model_type", "bpe", "--output", str(out)])
  assert "extra_ids=100" in capsys.readouterr().out
  sp = spm.SentencePieceProcessor(model_file=str(out))
  assert sp.encode("translate Alvic to Borran:", out_type=str) == [
      "\u2581translate", "\u2581Alvic", "\u2581to", "\u2581Borran", ":"]


def test_console_main_from_a_task(tmp_path, shared_data_dir, monkeypatch):
  # --data_dir sets MOE_JAX_DATA_DIR; monkeypatch restores it afterwards.
  monkeypatch.setenv("MOE_JAX_DATA_DIR", shared_data_dir)
  out = tmp_path / "m30k.model"
  vocab_trainer.console_main([
      "--task", "multi30k_translate_en_de", "--data_dir", shared_data_dir,
      "--module", "tasks.multi30k", "--split", "validation",
      "--vocab_size", "500", "--model_type", "bpe", "--output", str(out)])
  sp = spm.SentencePieceProcessor(model_file=str(out))
  assert 100 < sp.get_piece_size() <= 500
  assert sp.decode(sp.encode("Eine Gruppe von Männern")) == "Eine Gruppe von Männern"


def test_empty_text_is_an_error(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="No training text"):
    vocab_trainer.train_sentencepiece(["", "  "], str(tmp_path / "e.model"), 10)
