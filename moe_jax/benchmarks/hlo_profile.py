"""Where a compiled step's time goes: profiler trace x HLO, by layer part.

The JAX profiler (``jax.profiler.trace(..., create_perfetto_trace=True)``)
records one event per executed HLO instruction (XLA:CPU thunks are named
after them). The compiled module's HLO text gives each instruction its
``op_name`` metadata, which carries the ``jax.named_scope`` of the MoE layer
(``router``, ``dispatch``, ``all_to_all``, ``experts``, ``combine``) and
whether it is forward or backward (``transpose(jvp(...))``). Summing event
durations per part gives the device time of each part per step (averaged
over devices); matmul fusions and collectives are split out by opcode.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
from typing import Any, Mapping

_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter",
                "collective-permute", "ragged-all-to-all")
PARTS = ("router", "dispatch", "all_to_all", "experts", "combine")


def parse_instruction(line: str):
  """``(name, shape text, opcode)`` of an HLO instruction line, or None.

  The result shape may be a tuple with spaces (``(f32[2], f32[3]) all-to-all(``).
  """
  m = _NAME.match(line)
  if not m:
    return None
  name, rest = m.groups()
  if rest.startswith("("):  # tuple shape: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  opcode = rest.split("(", 1)[0].strip()
  if not opcode or " " in opcode:
    return None
  return name, shape, opcode


def instruction_table(hlo_text: str) -> dict[str, dict[str, Any]]:
  """``{instruction name: {"opcode", "op_name", "matmul"}}`` of an HLO module.

  A fusion counts as a matmul when its fused computation contains a ``dot``
  or it is an XNNPACK/YNNPACK custom fusion (``__ynn_fusion``/``__xnn``).
  """
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line and "(" in line:
      current = line.split(" ", 1)[0].lstrip("%")
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  has_dot = {name: any(" dot(" in l or " convolution(" in l for l in lines)
             for name, lines in computations.items()}

  def inner_op_name(comp: str) -> str:
    """op_name of a fused computation: its root's, else the first one found."""
    names = [(l.lstrip().startswith("ROOT"), _OP_NAME.search(l))
             for l in computations.get(comp, ())]
    found = [m.group(1) for root, m in names if m and root] + [
        m.group(1) for _, m in names if m]
    return found[0] if found else ""

  table = {}
  for lines in computations.values():
    for line in lines:
      parsed = parse_instruction(line)
      if parsed is None:
        continue
      name, _, opcode = parsed
      op_name = _OP_NAME.search(line)
      calls = _CALLS.search(line)
      op_name = op_name.group(1) if op_name else (
          inner_op_name(calls.group(1)) if calls else "")
      matmul = (opcode in ("dot", "convolution") or '"__ynn_fusion"' in line
                or '"__xnn_fusion"' in line
                or bool(calls and opcode == "fusion" and has_dot.get(calls.group(1))))
      table[name] = dict(opcode=opcode, op_name=op_name, matmul=matmul)
  return table


def classify(info: Mapping[str, Any]) -> str:
  """Part of the layer an instruction belongs to (``PARTS``, a collective's
  opcode, ``matmul`` / ``elementwise`` outside the scopes, or ``other``)."""
  opcode = info["opcode"].replace("-start", "").replace("-done", "")
  if opcode in _COLLECTIVES:
    return opcode
  scopes = info["op_name"].split("/")
  for part in PARTS:
    if part in scopes:
      if part == "experts":
        return "experts_matmul" if info["matmul"] else "experts_elementwise"
      return part
  return "matmul" if info["matmul"] else "other"


def _trace_durations(trace_dir: str) -> dict[str, float]:
  """``{event name: total microseconds}`` from the perfetto trace in ``trace_dir``."""
  files = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"),
                    recursive=True)
  if not files:
    raise RuntimeError(f"No perfetto trace under {trace_dir}; the profiler wrote none.")
  with gzip.open(files[0]) as f:
    events = json.load(f)["traceEvents"]
  out: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X":
      out[e["name"]] += float(e.get("dur", 0.0))
  return out


def profile_compiled(compiled, args: tuple, steps: int, num_devices: int) -> dict:
  """Per-part device milliseconds per step of ``compiled(*args)``.

  Returns:
    ``{"parts_ms": {part: ms}, "total_ms": ms, "fractions": {part: share}}``;
    ms are summed over instructions and averaged over the ``num_devices``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  table = instruction_table(compiled.as_text())
  trace_dir = tempfile.mkdtemp(prefix="moe_jax_profile_")
  try:
    jax.block_until_ready(compiled(*args))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(compiled(*args))
    durations = _trace_durations(trace_dir)
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  parts: dict[str, float] = collections.defaultdict(float)
  for name, micros in durations.items():
    if name in table:
      parts[classify(table[name])] += micros / 1000.0 / steps / num_devices
  total = sum(parts.values())
  return dict(parts_ms={k: round(v, 2) for k, v in sorted(parts.items())},
              total_ms=round(total, 2),
              fractions={k: round(v / total, 3) for k, v in sorted(parts.items())})


def profile_kinds(runs: Mapping[str, tuple], steps: int) -> dict[str, dict]:
  """``profile_compiled`` for every ``kind -> (compiled, params, xs, info)``."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for kind, (compiled, params, xs, info) in runs.items():
    out[kind] = dict(kind=kind, dispatch=info.get("dispatch"), steps=steps,
                     **profile_compiled(compiled, (params, xs), steps,
                                        len(jax.devices())))
  return out
