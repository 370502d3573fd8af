"""Host-memory traffic of a compiled program: what host offload costs per step.

In a compiled TPU (or GPU) module, buffers in host memory (memory kind
``pinned_host``) carry memory space ``S(5)`` in their layout. :func:`transfers`
counts, per step and per chip, the copies between device and host memory:

* ``copy-start`` (async; its result is ``(destination, source, context)``)
  and ``copy`` whose destination and source sit in different spaces;
* ``dynamic-slice`` reading a slice of a host buffer into device memory and
  ``dynamic-update-slice`` writing a device slice into a host buffer (one
  slice per loop iteration, e.g. offloaded activations of scanned layers, or
  a scanned block's offloaded weights and their gradients), synchronous or
  async (``dynamic-slice-start``, ``dynamic-update-slice-start``);
* a host program (``compute_on("device_host")``: an async call on the
  ``host`` execution thread): its operands in device memory are read over the
  link (device to host), its results in device memory are written over it
  (host to device, counted at the matching ``call-done``).

An instruction inside a while loop counts once per iteration (trip counts
as in :mod:`moe_jax.aot.hlo`). Bytes are the per-chip buffer moved.
:func:`seconds` turns the bytes into the time they take at the chip's
host link bandwidth (:mod:`moe_jax.aot.chips`), the two directions in
parallel (PCIe is full duplex).
"""

from __future__ import annotations

from typing import Optional

from moe_jax.aot import hlo

HOST_MEMORY_SPACE = "S(5)"
DIRECTIONS = ("host_to_device", "device_to_host")


def _on_host(shape: str) -> bool:
  return HOST_MEMORY_SPACE in shape


def _operand_shape(module: hlo.Module, instr: hlo.Instruction,
                   index: int) -> Optional[str]:
  if hlo._ARRAY.search(instr.operand_text):  # pylint: disable=protected-access
    parts = hlo._split_top_level(instr.operand_text)  # pylint: disable=protected-access
    return parts[index] if index < len(parts) else None
  if index < len(instr.operands) and instr.operands[index] in module.by_name:
    return module.by_name[instr.operands[index]].shape
  return None


def _device_bytes(shapes: list[str]) -> int:
  return sum(hlo.shape_bytes(x) for x in shapes if x and not _on_host(x))


def _tuple_parts(shape: str) -> list[str]:
  """The top-level elements of a tuple shape ``(a, b, ...)``."""
  shape = shape.strip()
  return hlo._split_top_level(shape[1:-1]) if shape.startswith("(") else []  # pylint: disable=protected-access


def _is_host_call(instr: Optional[hlo.Instruction]) -> bool:
  return (instr is not None and instr.opcode.endswith("call-start")
          and ('async_execution_thread="host"' in instr.attrs
               or "DEVICE_TYPE_HOST" in instr.attrs))


def transfer(module: hlo.Module, instr: hlo.Instruction) -> Optional[tuple[str, int]]:
  """``(direction, bytes)`` when ``instr`` copies between device and host memory."""
  op = instr.opcode
  if _is_host_call(instr):   # the host program reads its device operands
    n = len(instr.operands)
    moved = _device_bytes([_operand_shape(module, instr, i) for i in range(n)])
    return ("device_to_host", moved) if moved else None
  if op.endswith("call-done") and instr.operands and _is_host_call(
      module.by_name.get(instr.operands[0])):   # ... and writes its device results
    moved = _device_bytes(_tuple_parts(instr.shape) or [instr.shape.strip()])
    return ("host_to_device", moved) if moved else None
  # ``dest`` and ``src`` are the two memory spaces; ``moved`` the buffer that
  # crosses: the destination for copies and slice reads, the update (operand
  # 1) for slice writes.
  if op == "copy-start":   # ``(destination, source, context)``
    parts = _tuple_parts(instr.shape)
    if len(parts) < 2:
      return None
    dest, src = parts[0], parts[1]
    moved = dest
  elif op in ("dynamic-slice-start", "dynamic-update-slice-start"):
    # Async slices: ``((operands...), result, context)``.
    parts = _tuple_parts(instr.shape)
    operands = _tuple_parts(parts[0]) if parts else []
    if len(parts) < 2 or len(operands) < 2:
      return None
    dest = parts[1]
    src = operands[0] if op == "dynamic-slice-start" else operands[1]
    moved = dest if op == "dynamic-slice-start" else src
  elif op in ("copy", "dynamic-slice"):
    dest, src = instr.shape, _operand_shape(module, instr, 0)
    moved = dest
  elif op == "dynamic-update-slice":
    dest, src = instr.shape, _operand_shape(module, instr, 1)
    moved = src
  else:
    return None
  if src is None or _on_host(dest) == _on_host(src):
    return None
  return ("device_to_host" if _on_host(dest) else "host_to_device"), hlo.shape_bytes(moved)


def transfers(text: str) -> dict[str, dict[str, int]]:
  """``{"host_to_device": {"count", "bytes"}, "device_to_host": {...}}`` per
  step and chip for the compiled module ``text`` (``compiled.as_text()``)."""
  module = hlo.parse_module(text)
  runs, _ = hlo.multiplicities(module)
  out = {k: {"count": 0, "bytes": 0} for k in DIRECTIONS}
  for comp, instrs in module.computations.items():
    n = runs.get(comp, 0)
    for instr in instrs if n else ():
      moved = transfer(module, instr)
      if moved is not None:
        out[moved[0]]["count"] += n
        out[moved[0]]["bytes"] += n * moved[1]
  return out


def seconds(moved: dict[str, dict[str, int]], bytes_per_s: float) -> float:
  """Time the transfers take at ``bytes_per_s`` each way (directions overlap)."""
  return max(moved[d]["bytes"] for d in DIRECTIONS) / bytes_per_s
