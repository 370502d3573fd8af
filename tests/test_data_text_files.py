"""Tests for moe_jax.data.text_files: aligned gzip reading and bad data."""

import gzip

import pytest

from moe_jax.data import text_files


def _write(path, raw_lines):
  with gzip.open(path, "wb") as f:
    f.write(b"\n".join(raw_lines) + b"\n")
  return str(path)


def test_bad_lines_are_replaced_dropped_and_counted(tmp_path):
  en = _write(tmp_path / "x.en.gz", [b"one", b"", b"caf\xe9 bad", b"four", b"   "])
  de = _write(tmp_path / "x.de.gz", [b"eins", b"zwei", b"drei", b"", b"f\xc3\xbcnf"])
  columns, stats = text_files.read_aligned({"en": en, "de": de})
  # Pairs with an empty side (lines 2, 4, 5) are dropped; bad UTF-8 -> U+FFFD.
  assert columns == {"en": ("one", "caf\ufffd bad"), "de": ("eins", "drei")}
  assert stats.as_dict() == {"lines": 5, "invalid_utf8_lines": 1, "empty_dropped": 3}


def test_mismatched_line_counts_is_a_clear_error(tmp_path):
  en = _write(tmp_path / "y.en.gz", [b"a", b"b", b"c"])
  de = _write(tmp_path / "y.de.gz", [b"a", b"b"])
  with pytest.raises(ValueError, match=r"different line counts .*y\.en\.gz: 3 lines"):
    text_files.read_aligned({"en": en, "de": de})


def test_data_dir_resolution_and_errors(tmp_path, monkeypatch):
  monkeypatch.delenv(text_files.DATA_DIR_ENV, raising=False)
  with pytest.raises(ValueError, match="MOE_JAX_DATA_DIR"):
    text_files.data_dir()
  (tmp_path / "corpus").mkdir()
  _write(tmp_path / "corpus" / "train.en.gz", [b"hi"])
  monkeypatch.setenv(text_files.DATA_DIR_ENV, str(tmp_path))
  # Either the parent directory or the data set directory itself works.
  assert text_files.find_dataset_dir("corpus", "train.en.gz") == str(tmp_path / "corpus")
  assert text_files.find_dataset_dir("corpus", "train.en.gz",
                                     root=str(tmp_path / "corpus")) == str(tmp_path / "corpus")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "other" / "train.en.gz")):
    text_files.find_dataset_dir("other", "train.en.gz")
  with pytest.raises(FileNotFoundError, match="nope.gz"):
    text_files.read_lines(str(tmp_path / "nope.gz"))


def test_gin_binding_sets_the_data_dir(monkeypatch):
  import gin  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv(text_files.DATA_DIR_ENV, raising=False)
  with gin.unlock_config():
    gin.parse_config("moe_jax.data.data_dir.path = '/data/from/gin'")
  try:
    assert text_files.data_dir() == "/data/from/gin"
  finally:
    gin.clear_config()
