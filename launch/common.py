"""Pieces every launcher shares: flag parsing, required settings, scripts.

A launcher turns its flags into one bash script (a list of command lines).
``--dry_run`` prints that script; a real run executes exactly the same text
with ``bash -c``, so what the dry run shows is what runs.

``--gin_file=F`` (repeatable) and ``--gin.NAME=VALUE`` are passed through to
``moe-train`` unchanged, in the order given.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Iterable, Mapping, Optional, Sequence


class LaunchError(ValueError):
  """Bad or missing launcher settings; the message names them and the fix."""


def split_gin_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates ``--gin.NAME=VALUE`` flags (passed through) from the rest.

  Returns:
    ``(gin_overrides, other_args)``, each in the original order.

  Raises:
    LaunchError: a ``--gin.NAME`` without ``=VALUE``.
  """
  overrides, rest = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      if "=" not in arg:
        raise LaunchError(f"{arg!r} needs a value: write --gin.NAME=VALUE.")
      overrides.append(arg)
    else:
      rest.append(arg)
  return overrides, rest


def require(settings: Mapping[str, object], why: str = "") -> None:
  """Raises :class:`LaunchError` naming every flag whose value is empty.

  Args:
    settings: ``{"--flag": value}``; ``None`` and ``""`` count as missing.
    why: appended to the message (e.g. how to find a value).
  """
  missing = [flag for flag, value in settings.items() if value in (None, "")]
  if missing:
    raise LaunchError(
        f"Missing required setting{'s' if len(missing) > 1 else ''}: "
        f"{', '.join(missing)}. Pass {' '.join(f + '=...' for f in missing)}"
        + (f" ({why})" if why else "") + ".")


def moe_train_args(gin_files: Iterable[str], gin_overrides: Iterable[str],
                   extra: Iterable[str] = ()) -> list[str]:
  """``moe-train`` arguments: the gin files, then the overrides, then ``extra``."""
  return ([f"--gin_file={f}" for f in gin_files] + list(gin_overrides)
          + list(extra))


def quote(args: Sequence[str]) -> str:
  """One shell-safe command line (POSIX quoting)."""
  return shlex.join([str(a) for a in args])


def script(lines: Iterable[str], header: str = "") -> str:
  """A complete bash script: shebang, strict mode, then ``lines``."""
  body = "\n".join(lines)
  head = "#!/usr/bin/env bash\n" + (header.rstrip("\n") + "\n" if header else "")
  return head + "set -euo pipefail\n\n" + body + "\n"


def run_script(text: str, dry_run: bool, out=None) -> int:
  """Prints ``text`` (dry run) or runs it with bash; returns the exit code."""
  if dry_run:
    (out or sys.stdout).write(text)
    return 0
  return subprocess.run(["bash", "-c", text], check=False).returncode


def add_gin_file_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      "--gin_file", action="append", default=[],
      help="gin file for moe-train (repeatable), e.g. models/switch_base_8.gin")


def main_wrapper(main_fn, argv: Optional[Sequence[str]], prog: str) -> int:
  """Runs ``main_fn(argv)``, turning :class:`LaunchError` into exit code 2."""
  try:
    return main_fn(sys.argv[1:] if argv is None else list(argv))
  except LaunchError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
