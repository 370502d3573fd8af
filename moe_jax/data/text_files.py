"""Reading sentence-aligned gzip text files from a user-named data directory.

The data directory comes from, in order: an explicit argument, the gin
binding ``moe_jax.data.data_dir.path = "/path"``, or ``$MOE_JAX_DATA_DIR``.

Bad data is handled, counted and logged:

* invalid UTF-8 -> decoded with U+FFFD replacement characters, counted;
* empty (or whitespace-only) lines -> the aligned pair/tuple is dropped,
  counted;
* different line counts between aligned files -> ``ValueError`` naming the
  files and their counts.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
from typing import Mapping, Optional, Sequence

import gin
from absl import logging

DATA_DIR_ENV = "MOE_JAX_DATA_DIR"


@gin.configurable("data_dir", module="moe_jax.data")
def data_dir(path: Optional[str] = None) -> str:
  """The configured data directory (gin ``path``, else ``$MOE_JAX_DATA_DIR``)."""
  path = path or os.environ.get(DATA_DIR_ENV)
  if not path:
    raise ValueError(
        "No data directory configured. Set the environment variable "
        f"{DATA_DIR_ENV}=/path/to/data or bind the gin parameter "
        "moe_jax.data.data_dir.path = '/path/to/data'.")
  return path


def find_dataset_dir(name: str, probe_file: str,
                     root: Optional[str] = None) -> str:
  """``<root>/<name>`` or ``<root>`` itself, whichever holds ``probe_file``.

  Raises:
    FileNotFoundError: naming both paths that were tried.
  """
  root = root or data_dir()
  candidates = [os.path.join(root, name), root]
  for candidate in candidates:
    if os.path.exists(os.path.join(candidate, probe_file)):
      return candidate
  raise FileNotFoundError(
      f"{name} data not found: expected {os.path.join(candidates[0], probe_file)}"
      f" (or {os.path.join(candidates[1], probe_file)}). Point {DATA_DIR_ENV} "
      "or gin moe_jax.data.data_dir.path at the directory holding "
      f"'{name}/' (layout: SPLIT.LANG.gz, one sentence a line).")


@dataclasses.dataclass
class ReadStats:
  """What the reader had to fix."""
  lines: int = 0
  invalid_utf8_lines: int = 0
  empty_dropped: int = 0

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def read_lines(path: str) -> tuple[list[str], int]:
  """Lines of a (gzip or plain) text file and the count with invalid UTF-8."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Text file not found: {path}")
  opener = gzip.open if path.endswith(".gz") else open
  lines, invalid = [], 0
  with opener(path, "rb") as f:
    for raw in f:
      raw = raw.rstrip(b"\r\n")
      try:
        lines.append(raw.decode("utf-8"))
      except UnicodeDecodeError:
        invalid += 1
        lines.append(raw.decode("utf-8", errors="replace"))
  return lines, invalid


@functools.lru_cache(maxsize=64)
def _read_aligned_cached(paths: tuple[tuple[str, str], ...]
                         ) -> tuple[dict[str, tuple[str, ...]], ReadStats]:
  columns, stats = {}, ReadStats()
  counts = {}
  for key, path in paths:
    lines, invalid = read_lines(path)
    columns[key] = lines
    counts[path] = len(lines)
    stats.invalid_utf8_lines += invalid
  if len(set(counts.values())) > 1:
    detail = ", ".join(f"{p}: {n} lines" for p, n in counts.items())
    raise ValueError(
        f"Aligned files have different line counts ({detail}); line i of each "
        "file must translate line i of the others. Fix or re-export the files.")
  keys = list(columns)
  n = len(columns[keys[0]]) if keys else 0
  keep = [i for i in range(n) if all(columns[k][i].strip() for k in keys)]
  stats.lines = n
  stats.empty_dropped = n - len(keep)
  out = {k: tuple(columns[k][i].strip() for i in keep) for k in keys}
  if stats.invalid_utf8_lines or stats.empty_dropped:
    logging.warning("Read %s: %s", [p for _, p in paths], stats.as_dict())
  return out, stats


def read_aligned(paths: Mapping[str, str]
                 ) -> tuple[dict[str, tuple[str, ...]], ReadStats]:
  """Reads aligned files ``{key: path}`` -> ``({key: lines}, stats)``.

  Cached per set of paths (the files are small and read by several tasks).
  """
  return _read_aligned_cached(tuple(sorted(paths.items())))


def aligned_paths(directory: str, split: str,
                  languages: Sequence[str]) -> dict[str, str]:
  """``{lang: <directory>/<split>.<lang>.gz}``."""
  return {lang: os.path.join(directory, f"{split}.{lang}.gz") for lang in languages}
