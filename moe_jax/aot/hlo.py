"""Reading a compiled (SPMD-partitioned, per-device) HLO module's text.

``compiled.as_text()`` of a sharded program is the program of *one* device,
so every shape in it is per chip. :func:`analyze` reads it once and gives:

* ``collectives``: for each kind, how many times it runs per step and the
  bytes per chip it exchanges per step. A collective inside a while loop
  (``nn.scan`` layers, gradient-accumulation microbatches) counts once per
  iteration. Async pairs (``all-reduce-start`` / ``-done``, ``async-start``
  wrapping a collective) count once, at the start. Bytes of one collective:

  ==================  ==============================================
  all-to-all          its operand(s) (= its result)
  all-gather          its result (the gathered buffer)
  reduce-scatter      its operand(s)
  all-reduce          its operand(s); tuple shapes are summed
  collective-permute  its first operand (the buffer sent)
  ragged-all-to-all   its first operand (an upper bound: the sizes
                      actually sent are only known at run time)
  ==================  ==============================================

  This is the per-chip buffer size, not wire traffic: a ring all-gather or
  all-to-all over ``n`` chips moves ``(n-1)/n`` of it through each chip's
  links, a ring all-reduce about twice that. Transfers between slices of a
  multi-slice program are not XLA collectives but ``send``/``recv`` pairs
  over the data-center network tagged ``_xla_megascale_transfer_type``;
  they appear as kinds ``dcn-all-reduce``, ``dcn-all-gather`` ..., one per
  rendezvous, bytes = the buffer sent.

* ``loop_extra_flops`` / ``loop_extra_bytes``: what XLA's cost analysis
  (``compiled.cost_analysis()``) leaves out. It counts a while-loop body
  once, whatever the trip count; this adds ``(trip count - 1)`` x the body's
  matmul FLOPs (``dot`` and ``convolution``: 2 x output elements x
  contracted size) and memory traffic (operand + result bytes of each
  top-level instruction). Zero for a program without loops.

Trip counts come from ``known_trip_count`` when XLA records it, else from
the loop condition ``counter < constant`` (jax's scan/fori_loop form,
starting from the constant the loop tuple is initialized with).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Iterable, Optional

COLLECTIVE_KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce",
                    "collective-permute", "ragged-all-to-all")

# opcode -> (kind, which bytes): "operands", "first_operand", "result", or
# "result_minus_operands" (``-start`` ops whose result tuple holds operand
# and output).
_COLLECTIVE_OPS = {
    "all-to-all": ("all-to-all", "operands"),
    "all-gather": ("all-gather", "result"),
    "all-gather-start": ("all-gather", "result_minus_operands"),
    "reduce-scatter": ("reduce-scatter", "operands"),
    "all-reduce": ("all-reduce", "operands"),
    "all-reduce-start": ("all-reduce", "operands"),
    "collective-permute": ("collective-permute", "first_operand"),
    "collective-permute-start": ("collective-permute", "first_operand"),
    "ragged-all-to-all": ("ragged-all-to-all", "first_operand"),
}

# Bits per element of HLO primitive types.
_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8,
         "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32, "u32": 32,
         "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128,
         "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_NAME = re.compile(r"%([\w.\-]+)")
# Opcodes that move no data of their own (their bytes are counted elsewhere).
_NO_TRAFFIC = frozenset({
    "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
    "while", "conditional", "call", "async-start", "async-update", "async-done",
    "all-reduce-done", "all-gather-done", "collective-permute-done",
    "copy-done", "send-done", "recv-done", "call-done", "opt-barrier",
    "partition-id", "replica-id", "iota"})


def _element_bits(dtype: str) -> int:
  if dtype in _BITS:
    return _BITS[dtype]
  match = re.fullmatch(r"[a-z]+(\d+).*", dtype)  # f8e4m3fn, f4e2m1fn, ...
  return int(match.group(1)) if match else 0


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (tuples summed, layouts ignored).

  ``"bf16[8,128]{1,0:T(8,128)(2,1)}"`` -> 2048; ``"(f32[4], s32[])"`` -> 20;
  ``"f32[<=16]"`` (dynamic) -> its bound, 64.
  """
  total_bits = 0
  for dtype, dims in _ARRAY.findall(shape):
    bits = _element_bits(dtype)
    count = 1
    for d in filter(None, (x.strip() for x in dims.split(","))):
      count *= int(d.lstrip("<="))
    total_bits += bits * count
  return (total_bits + 7) // 8


def _dims(shape: str) -> list[int]:
  match = _ARRAY.search(shape)
  if not match:
    return []
  return [int(d.strip().lstrip("<=")) for d in match.group(2).split(",") if d.strip()]


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at ``text[start]``."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  stack = []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  return len(text)


@dataclasses.dataclass
class Instruction:
  """One HLO instruction: ``%name = shape opcode(operands), attributes``."""
  name: str
  shape: str
  opcode: str
  operands: list[str]
  operand_text: str
  attrs: str
  is_root: bool = False


def parse_instruction(line: str) -> Optional[Instruction]:
  """Parses one instruction line (``None`` for other lines)."""
  match = _INSTR.match(line)
  if not match:
    return None
  name, rest = match.group(2), match.group(3)
  rest = re.sub(r"/\*.*?\*/", "", rest)  # /*index=5*/ comments in tuple shapes
  if rest.startswith("("):
    end = _balanced(rest, 0)
  else:
    end = rest.find(" ")
    if end < 0:
      return None
    # A layout may follow the dims: f32[8]{0:T(128)} -- part of the shape.
  shape = rest[:end].strip()
  rest = rest[end:].strip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  close = _balanced(rest, op.end() - 1)
  operand_text = rest[op.end():close - 1]
  return Instruction(name=name, shape=shape, opcode=op.group(1),
                     operands=_NAME.findall(operand_text), operand_text=operand_text,
                     attrs=rest[close:], is_root=bool(match.group(1)))


@dataclasses.dataclass
class Module:
  """A parsed HLO module: computations (instruction lists) and the entry."""
  computations: dict[str, list[Instruction]]
  entry: str
  fused: set[str]  # computations called by fusion instructions

  def __post_init__(self):
    self.by_name = {i.name: i for instrs in self.computations.values() for i in instrs}


def parse_module(text: str) -> Module:
  """Splits ``compiled.as_text()`` into computations.

  Raises:
    ValueError: no ``ENTRY`` computation (not an HLO module's text).
  """
  computations: dict[str, list[Instruction]] = {}
  entry = None
  current = None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    if current is not None:
      instr = parse_instruction(line)
      if instr is not None:
        computations[current].append(instr)
  if entry is None:
    raise ValueError("No ENTRY computation found; pass compiled.as_text() of an "
                     "XLA executable.")
  fused = set()
  for instrs in computations.values():
    for i in instrs:
      if i.opcode == "fusion":
        fused.update(_called(i, ("calls",)))
  return Module(computations, entry, fused)


def _called(instr: Instruction, keys: Iterable[str]) -> list[str]:
  out = []
  for key in keys:
    for match in re.finditer(rf"\b{key}=(\{{[^}}]*\}}|%[\w.\-]+)", instr.attrs):
      out += _NAME.findall(match.group(1))
  return out


def _callees(instr: Instruction) -> list[tuple[str, str]]:
  """``(callee, role)`` computations an instruction runs (not reducers)."""
  op = instr.opcode
  if op == "while":
    return ([(c, "body") for c in _called(instr, ("body",))]
            + [(c, "condition") for c in _called(instr, ("condition",))])
  if op in ("fusion", "async-start"):
    return [(c, "call") for c in _called(instr, ("calls",))]
  if op in ("call", "call-start"):
    return [(c, "call") for c in _called(instr, ("to_apply", "calls"))]
  if op == "conditional":
    return [(c, "call") for c in _called(
        instr, ("branch_computations", "true_computation", "false_computation"))]
  return []


def _constant(module: Module, name: str, depth: int = 0) -> Optional[int]:
  """The integer value ``name`` holds if it is a (copied/converted) constant."""
  instr = module.by_name.get(name)
  if instr is None or depth > 8:
    return None
  if instr.opcode == "constant":
    try:
      return int(float(instr.operand_text))
    except ValueError:
      return None
  if instr.opcode in ("copy", "convert", "bitcast", "reshape") and instr.operands:
    return _constant(module, instr.operands[0], depth + 1)
  return None


def _tuple_element(module: Module, name: str, index: int) -> Optional[str]:
  instr = module.by_name.get(name)
  if instr is not None and instr.opcode == "tuple" and index < len(instr.operands):
    return instr.operands[index]
  return None


def trip_count(module: Module, loop: Instruction) -> Optional[int]:
  """Iterations of a ``while`` instruction, or ``None`` when not derivable."""
  known = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', loop.attrs)
  if known:
    return int(known.group(1))
  conds = _called(loop, ("condition",))
  if not conds or conds[0] not in module.computations:
    return None
  instrs = module.computations[conds[0]]
  for cmp in instrs:
    if cmp.opcode != "compare" or len(cmp.operands) != 2:
      continue
    direction = re.search(r"direction=(\w+)", cmp.attrs)
    direction = direction.group(1) if direction else ""
    a, b = cmp.operands
    limit = _constant(module, b)
    counter = a
    if limit is None:
      limit, counter = _constant(module, a), b
      direction = {"GT": "LT", "GE": "LE"}.get(direction, direction)
    if limit is None:
      continue
    start = 0
    gte = module.by_name.get(counter)
    if gte is not None and gte.opcode == "get-tuple-element" and loop.operands:
      index = re.search(r"index=(\d+)", gte.attrs)
      element = _tuple_element(module, loop.operands[0], int(index.group(1))) if index else None
      value = _constant(module, element) if element else None
      start = value if value is not None else 0
    if direction == "LT":
      return max(limit - start, 0)
    if direction == "LE":
      return max(limit - start + 1, 0)
  return None


def multiplicities(module: Module, use_trip_counts: bool = True
                   ) -> tuple[dict[str, int], dict[str, Optional[int]]]:
  """How many times each computation runs per execution of the entry.

  Returns:
    ``(runs, loops)``: runs per computation (reachable ones); trip count per
    while instruction (``None`` where unknown -- its body then counts once).
  """
  edges: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
  loops: dict[str, Optional[int]] = {}
  for comp, instrs in module.computations.items():
    for instr in instrs:
      n = None
      if instr.opcode == "while":
        n = trip_count(module, instr)
        loops[instr.name] = n
      for callee, role in _callees(instr):
        factor = 1
        if use_trip_counts and role == "body" and n is not None:
          factor = n
        elif use_trip_counts and role == "condition" and n is not None:
          factor = n + 1
        edges[comp].append((callee, factor))
  reachable, stack = {module.entry}, [module.entry]
  while stack:
    for callee, _ in edges.get(stack.pop(), []):
      if callee not in reachable and callee in module.computations:
        reachable.add(callee)
        stack.append(callee)
  indegree = collections.Counter(c for comp in reachable for c, _ in edges.get(comp, [])
                                 if c in reachable)
  runs = collections.Counter({module.entry: 1})
  ready = [module.entry]
  while ready:
    comp = ready.pop()
    for callee, factor in edges.get(comp, []):
      if callee not in reachable:
        continue
      runs[callee] += runs[comp] * factor
      indegree[callee] -= 1
      if indegree[callee] == 0:
        ready.append(callee)
  return dict(runs), loops


def _split_top_level(text: str) -> list[str]:
  """``text`` split at commas outside brackets."""
  parts, depth, start = [], 0, 0
  for i, c in enumerate(text):
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _operand_bytes(module: Module, instr: Instruction, first_only: bool = False) -> int:
  """Bytes of an instruction's operands (or its first), by shape or by name."""
  if _ARRAY.search(instr.operand_text):  # operands printed with their shapes
    parts = _split_top_level(instr.operand_text)
    return sum(shape_bytes(p) for p in (parts[:1] if first_only else parts))
  names = instr.operands[:1] if first_only else instr.operands
  return sum(shape_bytes(module.by_name[n].shape) for n in names if n in module.by_name)


def _collective(module: Module, instr: Instruction) -> Optional[tuple[str, int, str]]:
  """``(kind, bytes, dedup key)`` when ``instr`` starts a collective."""
  if instr.opcode in _COLLECTIVE_OPS:
    kind, which = _COLLECTIVE_OPS[instr.opcode]
    if which == "operands":
      size = _operand_bytes(module, instr)
    elif which == "first_operand":
      size = _operand_bytes(module, instr, first_only=True)
    elif which == "result":
      size = shape_bytes(instr.shape)
    else:
      size = shape_bytes(instr.shape) - _operand_bytes(module, instr)
    return kind, size, instr.name
  if instr.opcode in ("send", "recv"):
    transfer = re.search(r'_xla_megascale_transfer_type="(\w+)"', instr.attrs)
    if transfer:
      kind = "dcn-" + transfer.group(1).lower().replace("_", "-")
      key = re.search(r'_xla_host_transfer_rendezvous="([^"]+)"', instr.attrs)
      size = _operand_bytes(module, instr, first_only=True) if instr.opcode == "send" else 0
      return kind, size, (key.group(1) if key else instr.name)
  return None


def _window(attrs: str, n: int) -> dict[str, list]:
  """``window={size=.. stride=.. pad=lo_hi.. lhs_dilate=.. rhs_dilate=..}`` per spatial dim."""
  out = {"size": [1] * n, "stride": [1] * n, "pad": [(0, 0)] * n,
         "lhs_dilate": [1] * n, "rhs_dilate": [1] * n}
  match = re.search(r"window=\{([^}]*)\}", attrs)
  if not match:
    return out
  for key, value in re.findall(r"(\w+)=([\dx_\-]+)", match.group(1)):
    parts = value.split("x")
    if key == "pad":
      out["pad"] = [tuple(int(v) for v in p.split("_")) for p in parts]
    elif key in out:
      out[key] = [int(v) for v in parts]
  return out


def _valid_taps(n: int, window: int, out: int, stride: int, pad_lo: int,
                lhs_dilate: int, rhs_dilate: int) -> int:
  """(output position, window tap) pairs of one spatial dimension that land on
  a real input element (not padding, not a hole of lhs dilation)."""
  if out * window > 1_000_000:  # a real spatial convolution: no holes to skip
    return out * window
  last = (n - 1) * lhs_dilate
  taps = 0
  for o in range(out):
    for w in range(window):
      pos = o * stride + w * rhs_dilate - pad_lo
      if 0 <= pos <= last and pos % lhs_dilate == 0:
        taps += 1
  return taps


def _matmul_flops(module: Module, instr: Instruction) -> float:
  """FLOPs (2 per multiply-add) of a ``dot`` / ``convolution``.

  A dot: 2 x output elements x contracted size. A convolution: 2 x output
  batch x output features x input features x the window taps that hit real
  input -- the TPU compiler writes batched matmuls (attention's batch and
  head dimensions) as convolutions whose "spatial" dimensions are dilated so
  that one tap in each window is real; counting every tap would multiply
  them by the window size.
  """
  if instr.opcode == "convolution" and len(instr.operands) >= 2:
    lhs = module.by_name.get(instr.operands[0])
    rhs = module.by_name.get(instr.operands[1])
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    if lhs is None or rhs is None or not labels:
      return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    lhs_d, rhs_d, out_d = _dims(lhs.shape), _dims(rhs.shape), _dims(instr.shape)
    if len(lhs_d) != len(lhs_l) or len(rhs_d) != len(rhs_l) or len(out_d) != len(out_l):
      return 0.0
    spatial = sorted(c for c in out_l if c.isdigit())
    win = _window(instr.attrs, len(spatial))
    flops = 2.0 * out_d[out_l.index("b")] * out_d[out_l.index("f")] * rhs_d[rhs_l.index("i")]
    for k, c in enumerate(spatial):
      lo = win["pad"][k][0] if k < len(win["pad"]) else 0
      flops *= _valid_taps(lhs_d[lhs_l.index(c)], rhs_d[rhs_l.index(c)],
                           out_d[out_l.index(c)], win["stride"][k], lo,
                           win["lhs_dilate"][k], win["rhs_dilate"][k])
    return flops
  if instr.opcode == "dot" and instr.operands:
    lhs = module.by_name.get(instr.operands[0])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
    if lhs is None or not contracting:
      return 0.0
    dims = _dims(lhs.shape)
    size = 1
    for d in _dims(instr.shape):
      size *= d
    for i in filter(None, contracting.group(1).split(",")):
      size *= dims[int(i)]
    return 2.0 * size
  return 0.0


_SLICING = ("dynamic-slice", "slice", "gather")


def _fused_param_reads(module: Module, comp: str, depth: int = 0
                       ) -> dict[int, Optional[int]]:
  """Per parameter of fused computation ``comp``: the bytes actually read when
  every use slices it, also through nested fusions (``None``: read whole; 0:
  only updated in place)."""
  instrs = module.computations.get(comp, [])
  params = {i.name: int(i.operand_text) for i in instrs
            if i.opcode == "parameter" and i.operand_text.strip().isdigit()}
  users = collections.defaultdict(list)
  for i in instrs:
    for pos, name in enumerate(i.operands):
      if name in params:
        users[name].append((i, pos))
  reads: dict[int, Optional[int]] = {}
  for name, index in params.items():
    total: Optional[int] = 0
    for user, pos in users.get(name, []):
      if user.opcode in _SLICING and pos == 0:
        total += shape_bytes(user.shape)
      elif user.opcode == "dynamic-update-slice" and pos == 0:
        pass  # the buffer updated in place is not read
      elif user.opcode == "fusion" and depth < 4:
        nested = _called(user, ("calls",))
        read = _fused_param_reads(module, nested[0], depth + 1).get(pos) if nested else None
        if read is None:
          total = None
          break
        total += read
      else:
        total = None
        break
    reads[index] = total if users.get(name) else None
  return reads


def _written(module: Module, instr: Instruction, root: Optional[Instruction]) -> int:
  """Result bytes written; an in-place dynamic-update-slice writes its update."""
  if root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
    update = module.by_name.get(root.operands[1])
    if update is not None:
      return shape_bytes(update.shape)
  return shape_bytes(instr.shape)


def _traffic(module: Module, instr: Instruction) -> int:
  """HBM bytes read + written by one top-level instruction (as XLA's cost
  analysis counts them: a fusion reads only the slices it takes of an operand,
  and writes only the update of an in-place dynamic-update-slice)."""
  op = instr.opcode
  if op in _NO_TRAFFIC or op.endswith("-done"):
    return 0
  if op == "fusion":
    fused = _called(instr, ("calls",))
    comp = fused[0] if fused else ""
    reads = _fused_param_reads(module, comp)
    total = 0
    for index, name in enumerate(instr.operands):
      read = reads.get(index)
      if read is None and name in module.by_name:
        read = shape_bytes(module.by_name[name].shape)
      total += read or 0
    root = next((i for i in module.computations.get(comp, []) if i.is_root), None)
    return total + _written(module, instr, root)
  if op in _SLICING:
    return 2 * shape_bytes(instr.shape)
  if op == "dynamic-update-slice":
    return 2 * _written(module, instr, instr)
  return shape_bytes(instr.shape) + _operand_bytes(module, instr)


@dataclasses.dataclass
class Analysis:
  """What :func:`analyze` reads from a compiled module (all per chip, per step)."""
  collectives: dict[str, dict[str, int]]
  loop_extra_flops: float
  loop_extra_bytes: float
  loops: dict[str, Optional[int]]

  @property
  def unknown_loops(self) -> list[str]:
    return sorted(k for k, v in self.loops.items() if v is None)


def analyze(text: str) -> Analysis:
  """Collectives per step and the loop FLOPs/bytes cost analysis misses."""
  module = parse_module(text)
  runs, loops = multiplicities(module)
  once, _ = multiplicities(module, use_trip_counts=False)
  stats = {k: {"count": 0, "bytes": 0} for k in COLLECTIVE_KINDS}
  seen: set[tuple[str, str]] = set()
  extra_flops = extra_bytes = 0.0
  for comp, instrs in module.computations.items():
    n = runs.get(comp, 0)
    if not n:
      continue
    for instr in instrs:
      found = _collective(module, instr)
      if found is not None:
        kind, size, key = found
        entry = stats.setdefault(kind, {"count": 0, "bytes": 0})
        if (kind, key) not in seen:
          seen.add((kind, key))
          entry["count"] += n
        entry["bytes"] += n * size
    repeats = n - once.get(comp, n)
    if repeats > 0:
      extra_flops += repeats * sum(_matmul_flops(module, i) for i in instrs
                                   if i.opcode in ("dot", "convolution"))
      if comp not in module.fused:
        extra_bytes += repeats * sum(_traffic(module, i) for i in instrs)
  return Analysis(stats, extra_flops, extra_bytes, loops)


def collective_stats(text: str) -> dict[str, dict[str, int]]:
  """``{kind: {"count", "bytes"}}`` per step for the compiled module ``text``."""
  return analyze(text).collectives


if __name__ == "__main__":  # python -m moe_jax.aot.hlo < module.txt
  import sys  # pylint: disable=g-import-not-at-top
  result = analyze(sys.stdin.read())
  print(json.dumps(dataclasses.asdict(result), indent=1))
