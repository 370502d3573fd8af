"""Pod-scale table: moe_jax's train step compiled for Cloud TPU topologies.

  python -m moe_jax.benchmarks.pod_scale --json                # every row
  python -m moe_jax.benchmarks.pod_scale --json --rows=switch_base_128
  python -m moe_jax.benchmarks.pod_scale --render              # doc only

Each row compiles ``moe-train``'s train step with ``moe-compile``'s path
(:func:`moe_jax.aot.step.run`) in its own process (memory is returned, a
timeout does not stop the table), prints one JSON line (``--json``), keeps
the results in ``docs/pod_scale.jsonl`` (one line per row, replaced when the
row is rerun) and regenerates ``docs/pod_scale.md`` from them. Needs libtpu
(``pip install -e ".[tpu]"``), no TPU. Rows use ``scan_layers=True`` and
bfloat16 activations (the shipped model files' default) to keep each compile
within minutes on a small machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JSONL = os.path.join(REPO, "docs", "pod_scale.jsonl")
DOC = os.path.join(REPO, "docs", "pod_scale.md")
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Row:
  """One (model, topology, mesh) of the table."""
  name: str
  model: str
  topology: str
  mesh: dict
  batch: int
  num_slices: int = 1
  dcn: Optional[dict] = None
  scan: bool = True
  extra: tuple = ()

  def bindings(self) -> list[str]:
    out = [f"MESH_{k.upper()} = {v}" for k, v in self.mesh.items()]
    out += [f"DCN_MESH_{k.upper()} = {v}" for k, v in (self.dcn or {}).items()]
    return out + [f"BATCH_SIZE = {self.batch}", f"T5Config.scan_layers = {self.scan}",
                  *self.extra]

  def gin_files(self) -> list[str]:
    return [f"models/{self.model}.gin", "runs/pretrain.gin"]


ROWS = (
    Row("switch_base_8", "switch_base_8", "v5p-128", {"data": 8, "expert": 8}, 256),
    Row("switch_base_128", "switch_base_128", "v5p-128", {"data": 4, "expert": 16}, 256),
    Row("st_moe_base", "st_moe_base", "v5p-128", {"data": 2, "expert": 32}, 256),
    Row("switch_large_128", "switch_large_128", "v5p-256", {"data": 2, "expert": 64}, 256),
    Row("switch_base_128_2slices", "switch_base_128", "v5p-128",
        {"data": 4, "expert": 16}, 512, num_slices=2, dcn={"data": 2}),
    Row("switch_xxl", "switch_xxl", "v5p-1024", {"data": 1, "fsdp": 4, "expert": 128}, 1024),
    # As configured (no remat), Switch-C's activations overflow a v4 chip:
    # the row shows what moe-compile reports for a program that does not fit.
    Row("switch_c", "switch_c", "v4-2048", {"data": 1, "expert": 1024}, 2048),
    Row("switch_c_remat", "switch_c", "v4-2048", {"data": 1, "expert": 1024}, 2048,
        extra=("T5Config.remat_policy = 'full'",)),
    Row("switch_c_v5p", "switch_c", "v5p-2048", {"data": 1, "expert": 1024}, 2048),
    # The same program without nn.scan: what scanning changes.
    Row("switch_base_128_unscanned", "switch_base_128", "v5p-128",
        {"data": 4, "expert": 16}, 256, scan=False),
)


def analytic_all_to_all_bytes(exp) -> Optional[float]:
  """Minimum all-to-all bytes per chip per step of the expert-parallel MoE
  layers: each MoE layer sends every token's ``d_model`` activations to its
  ``k`` experts and back (2 all-to-alls) in the forward pass and again in the
  backward pass -- ``4 x k x tokens per chip x d_model x bytes`` per layer,
  with no capacity-factor slack. ``None`` for a model without experts."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  cfg = exp.model_config
  if not cfg.has_moe or partitioning.mesh_axis_size(exp.mesh, "expert") == 1:
    return None
  shards = partitioning.mesh_axis_size(exp.mesh, partitioning.BATCH_MESH_AXES)
  act_bytes = np.dtype(cfg.dtype).itemsize
  lengths = {"encoder": "encoder_input_tokens", "decoder": "decoder_target_tokens"}
  total = 0.0
  for stack in cfg.sparse_stacks():
    feature = exp.batch_shapes.get(lengths[stack])
    if feature is None:
      continue
    layers = len(getattr(cfg, f"{stack}_layout").sparse_layers(
        getattr(cfg, f"num_{stack}_layers")))
    k = cfg.stack_moe(stack).num_selected_experts
    tokens_per_chip = int(np.prod(feature.shape)) / shards
    total += 4 * layers * k * tokens_per_chip * cfg.d_model * act_bytes
  return total


def compile_row(row: Row, hlo_dir: Optional[str] = None) -> dict[str, Any]:
  """Compiles one row in this process; the JSON line for it. With ``hlo_dir``
  the compiled HLO text is kept there as ``ROW.hlo.txt``."""
  from moe_jax.aot import report, step  # pylint: disable=g-import-not-at-top
  done = step.run(row.topology, row.num_slices, row.gin_files(), row.bindings(),
                         title=f"models/{row.model}.gin")
  line = {"row": row.name, "model": row.model, "topology_arg": row.topology,
          **report.public(done.report),
          "params": done.report["_detail"].get("params"),
          "all_to_all_analytic_min_bytes": analytic_all_to_all_bytes(done.experiment),
          "detail": {k: v for k, v in done.report["_detail"].items() if k != "params"}}
  print(done.summary, file=sys.stderr)
  if hlo_dir and done.compiled is not None:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"{row.name}.hlo.txt"), "w") as f:
      f.write(done.compiled.as_text())
  return line


def _run_child(row: Row, timeout: float, hlo_dir: Optional[str]) -> dict[str, Any]:
  cmd = [sys.executable, "-m", "moe_jax.benchmarks.pod_scale", "--row", row.name]
  if hlo_dir:
    cmd.append(f"--hlo_dir={hlo_dir}")
  t0 = time.perf_counter()
  base = {"row": row.name, "model": row.model, "topology_arg": row.topology}
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
  except subprocess.TimeoutExpired:
    return {**base, "error": f"did not finish compiling in {timeout:.0f} s on this "
            f"machine ({os.cpu_count()} CPU cores)", "wall_s": round(time.perf_counter() - t0)}
  sys.stderr.write(proc.stderr[-4000:])
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode in (0, 1) and lines:
    return json.loads(lines[-1])
  why = ("killed (out of host memory?)" if proc.returncode in (-9, 137)
         else f"exit code {proc.returncode}")
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  errors = [l for l in lines if re.match(r"^[\w.]*(Error|Exception|Exhausted)\b", l)]
  tail = (errors or lines or [""])[-1]
  return {**base, "error": f"{why}: {tail[:300]}",
          "wall_s": round(time.perf_counter() - t0)}


def load(path: str = JSONL) -> dict[str, dict]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {d["row"]: d for d in (json.loads(l) for l in f if l.strip())}


def save(results: dict[str, dict], path: str = JSONL) -> None:
  order = [r.name for r in ROWS]
  names = sorted(results, key=lambda n: order.index(n) if n in order else len(order))
  with open(path, "w") as f:
    for name in names:
      f.write(json.dumps(results[name]) + "\n")


# ----------------------------------------------------------------------------
# The document
# ----------------------------------------------------------------------------
def _gib(n) -> str:
  return "-" if n is None else f"{n / GIB:.1f}"


def _params(p) -> str:
  if not p:
    return "-"
  def short(n):
    return f"{n / 1e12:.2f}T" if n >= 1e12 else f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
  return f"{short(p['total'])} / {short(p['active'])}"


def _coll(d, kind) -> str:
  c = (d.get("collectives") or {}).get(kind)
  if d.get("collectives") is None:
    return "-"
  if not c or not c["count"]:
    return "0"
  return f"{c['count']} / {c['bytes'] / GIB:.2f}"


def _mesh(d) -> str:
  mesh = {k: v for k, v in d["mesh"].items() if v != 1}
  return " ".join(f"{k}={v}" for k, v in mesh.items()) or "1"


def table(results: dict[str, dict]) -> str:
  head = ("| model | topology | mesh | batch | params total / active | HBM GiB per chip "
          "(used / chip) | fits | all-to-all | all-gather | reduce-scatter | all-reduce | "
          "DCN all-reduce | roofline MFU bound | compile here |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for row in ROWS:
    d = results.get(row.name)
    if d is None or "error" in d:
      continue
    topo = row.topology + (f" x {row.num_slices}" if row.num_slices > 1 else "")
    mfu = "-" if d["mfu_bound"] is None else f"{d['mfu_bound']:.0%}"
    det = d.get("detail", {})
    if d["mfu_bound"] is not None and det.get("compute_s"):
      bound = "HBM" if det["memory_s"] > det["compute_s"] else "compute"
      compute_only = d["mfu_bound"] * d["roofline_step_s"] / det["compute_s"]
      mfu += f" ({bound}-bound; compute alone {compute_only:.0%})"
    model = row.model + ("" if row.scan else " (no scan)") + "".join(
        " (remat)" for e in row.extra if "remat_policy = 'full'" in e)
    lines.append(
        f"| {model} | {topo} ({d['topology']}) | {_mesh(d)} | {d['global_batch']} | "
        f"{_params(d.get('params'))} | {_gib(d['device_bytes']['total'])} / "
        f"{_gib(d['hbm_bytes_per_chip'])} | {'yes' if d['fits'] else '**no**'} | "
        f"{_coll(d, 'all-to-all')} | {_coll(d, 'all-gather')} | "
        f"{_coll(d, 'reduce-scatter')} | {_coll(d, 'all-reduce')} | "
        f"{_coll(d, 'dcn-all-reduce')} | {mfu} | {d['compile_s']:.0f} s |")
  return "\n".join(lines)


def failures(results: dict[str, dict]) -> str:
  out = []
  for row in ROWS:
    d = results.get(row.name)
    if d is None:
      out.append(f"* **{row.name}** ({row.model} on {row.topology}): not run yet.")
    elif "error" in d:
      out.append(f"* **{row.name}** ({row.model} on {row.topology}, mesh "
                 f"{row.mesh}, batch {row.batch}): {d['error']}")
  for row in ROWS:
    d = results.get(row.name)
    if d and "error" not in d and not d["fits"]:
      out.append(f"* **{row.name}** compiled up to XLA's out-of-memory refusal: that is "
                 f"its result (`fits: false`), not a failure to compile.")
  out.append("* Not attempted: Switch-XXL and Switch-C without `nn.scan` (unrolled, "
             "the program XLA compiles grows with every layer; too slow for this "
             f"{os.cpu_count()}-core machine), and meshes with `MESH_MODEL` > 1.")
  return "\n".join(out)


def _ok(results, name):
  d = results.get(name)
  return d if d and "error" not in d else None


def all_to_all_note(results: dict[str, dict], name: str = "switch_base_128") -> str:
  d = _ok(results, name)
  if not d or not d.get("all_to_all_analytic_min_bytes"):
    return f"({name} has not been compiled yet.)"
  a2a = d["collectives"]["all-to-all"]
  ratio = a2a["bytes"] / d["all_to_all_analytic_min_bytes"]
  det = d.get("detail", {})
  compute_only = d["mfu_bound"] * d["roofline_step_s"] / det["compute_s"]
  return (
      f"{name} on {d['topology_arg']} (mesh {_mesh(d)}, batch {d['global_batch']} x "
      f"512 inputs / 114 targets, {d['global_batch'] // d['chips']} sequences per "
      f"chip): **{a2a['count']} all-to-alls per step moving "
      f"{a2a['bytes'] / 2**20:.1f} MiB per chip**. The analytic minimum is "
      f"{d['all_to_all_analytic_min_bytes'] / 2**20:.1f} MiB: 2 all-to-alls "
      f"(dispatch, combine) per MoE layer x tokens per chip x d_model 768 x 2 bytes "
      f"(bfloat16), forward and again backward, over 12 MoE layers (6 encoder layers "
      f"see 2048 tokens per chip, 6 decoder layers 456). Measured / minimum = "
      f"**{ratio:.2f}x**: the capacity factor 1.25 pads every expert buffer to "
      f"1.25x the tokens it would get under perfect balance, and capacities round "
      f"up per group; nothing else is exchanged.\n\n"
      f"Roofline for the same program: {d['flops_per_chip'] / 1e12:.2f} TFLOP and "
      f"{det['hbm_bytes_accessed_per_chip'] / 2**30:.1f} GiB of HBM traffic per chip "
      f"per step: compute {det['compute_s'] * 1e3:.1f} ms at 459 TFLOP/s, HBM "
      f"{det['memory_s'] * 1e3:.1f} ms at 2.77 TB/s, so the step takes at least "
      f"{d['roofline_step_s'] * 1e3:.1f} ms and **MFU <= {d['mfu_bound']:.0%}** "
      f"(compute alone would allow {compute_only:.0%}: model FLOPs / compiled FLOPs, "
      f"the rest being capacity padding, routing and the optimizer). At 4 sequences "
      f"per chip the bound is set by HBM traffic, not FLOPs: traffic that does not "
      f"grow with the tokens (parameters, gradients, optimizer state) weighs most "
      f"at small per-chip batches, so more sequences per chip should raise it (not "
      f"compiled here).")


def scan_note(results: dict[str, dict]) -> str:
  scanned, plain = _ok(results, "switch_base_128"), _ok(results, "switch_base_128_unscanned")
  if not (scanned and plain):
    return "(switch_base_128 with and without `nn.scan` has not been compiled yet.)"
  s_dev, p_dev = scanned["device_bytes"], plain["device_bytes"]
  return (
      f"switch_base_128 on v5p-128 without `nn.scan`: {_gib(p_dev['total'])} GiB per "
      f"chip ({_gib(p_dev['temp'])} GiB temporaries), compiled in "
      f"{plain['compile_s']:.0f} s; with it, {_gib(s_dev['total'])} GiB "
      f"({_gib(s_dev['temp'])} GiB temporaries) in {scanned['compile_s']:.0f} s. The "
      f"all-to-alls are the same ({plain['collectives']['all-to-all']['count']} vs "
      f"{scanned['collectives']['all-to-all']['count']}); the gradient all-reduces "
      f"move the same bytes ({plain['collectives']['all-reduce']['bytes'] / GIB:.2f} "
      f"vs {scanned['collectives']['all-reduce']['bytes'] / GIB:.2f} GiB) but XLA "
      f"combines them into {plain['collectives']['all-reduce']['count']} without "
      f"scan and not across loop iterations "
      f"({scanned['collectives']['all-reduce']['count']} with scan); the FLOPs agree "
      f"({plain['flops_per_chip'] / 1e12:.2f} vs "
      f"{scanned['flops_per_chip'] / 1e12:.2f} TFLOP per chip; for the scanned "
      f"program XLA's cost analysis counts each loop body once and "
      f"`moe_jax/aot/hlo.py` adds the other iterations). Here scanning roughly "
      f"doubles the per-chip memory and does not shorten the compile; the scanned "
      f"rows above were scanned so that the large models compile in minutes on "
      f"this machine.")


def slices_note(results: dict[str, dict]) -> str:
  d = _ok(results, "switch_base_128_2slices")
  one = _ok(results, "switch_base_128")
  if not (d and one):
    return "(the two-slice row or its one-slice twin has not been compiled yet.)"
  dcn = d["collectives"].get("dcn-all-reduce", {"count": 0, "bytes": 0})
  changed = [f"{k} {one['collectives'][k]['count']} -> {v['count']}"
             for k, v in d["collectives"].items()
             if not k.startswith("dcn-") and v["count"] != one["collectives"][k]["count"]]
  return (
      f"Two v5p-128 slices with `DCN_MESH_DATA=2` (mesh data=4 inside a slice x 2 "
      f"across, expert=16; batch {d['global_batch']}, the same per chip as the "
      f"one-slice row): the program adds **{dcn['count']} cross-slice all-reduces "
      f"moving {dcn['bytes'] / 2**20:.0f} MiB per chip per step** over the "
      f"data-center network -- the gradient reduction between slices. XLA reduces "
      f"hierarchically, inside each slice and then across, so the in-slice "
      f"collectives change too ({', '.join(changed) or 'none'}). The all-to-alls "
      f"stay inside each slice ({d['collectives']['all-to-all']['count']}, as with "
      f"one slice): the expert axis does not cross the data-center network.")


def big_models_note(results: dict[str, dict]) -> str:
  out = []
  xxl = _ok(results, "switch_xxl")
  if xxl:
    c = xxl["collectives"]
    out.append(
        f"* **Switch-XXL** ({xxl['params']['total'] / 1e9:.0f}B parameters) on v5p-1024 "
        f"with fsdp=4 x expert=128: {_gib(xxl['device_bytes']['total'])} GiB per chip "
        f"of 95. FSDP shows in the pattern: {c['all-gather']['count']} all-gathers "
        f"({c['all-gather']['bytes'] / GIB:.1f} GiB per chip per step: each layer's "
        f"non-expert weights gathered before use) next to "
        f"{c['all-to-all']['count']} all-to-alls (4 per MoE layer x 24, plus one "
        f"in the decoder's lookup of the fsdp-sharded token embedding).")
  c_oom, c_remat, c_v5p = (results.get("switch_c"), _ok(results, "switch_c_remat"),
                           _ok(results, "switch_c_v5p"))
  if c_oom and "error" not in c_oom and not c_oom["fits"]:
    out.append(
        f"* **Switch-C** ({c_oom['params']['total'] / 1e12:.2f}T parameters) on v4-2048 "
        f"(1024 chips, 2 experts each) as configured does **not** fit: XLA needs "
        f"{_gib(c_oom['device_bytes']['temp'])} GiB of temporaries on top of "
        f"{_gib(c_oom['device_bytes']['argument'])} GiB of train state per 32 GiB chip "
        f"(`fits: false`, {_gib(-c_oom['headroom_bytes'])} GiB over; moe-compile exits 1 "
        f"and lists remat, microbatches and more sharding).")
  if c_remat:
    a2a = c_remat["collectives"]["all-to-all"]
    ratio = a2a["bytes"] / c_remat["all_to_all_analytic_min_bytes"]
    out.append(
        f"* With `T5Config.remat_policy='full'` it fits: "
        f"{_gib(c_remat['device_bytes']['total'])} GiB per chip (compiled in "
        f"{c_remat['compile_s'] / 60:.0f} min here). Remat shows in the pattern too: "
        f"{a2a['count']} all-to-alls, 6 per MoE layer x 30 (the backward pass reruns "
        f"each layer's forward dispatch and combine). They move "
        f"{a2a['bytes'] / GIB:.1f} GiB per chip per step, **{ratio:.0f}x** the "
        f"analytic minimum: with 2 sequences per chip each chip's token group is "
        f"1024 encoder or 228 decoder tokens, but every group has 2048 experts x "
        f"capacity 4 (`MoeConfig.min_expert_capacity`) = 8192 slots. A smaller "
        f"`min_expert_capacity` (1 gives 2048 slots) or more tokens per chip would cut "
        f"that padding. The padded slots also cost compute: the experts (and the "
        f"dispatch and combine around them) run over all 8192 slots, so the compiled FLOPs are "
        f"{c_remat['flops_per_chip'] * c_remat['chips'] / c_remat['model_flops_per_step']:.1f}x "
        f"the model FLOPs (with remat's recomputation) -- the kind of thing this "
        f"table exists to show before a pod is booked.")
  if c_v5p:
    out.append(
        f"* On v5p-2048 (1024 chips of 95 GiB) the same Switch-C fits without remat: "
        f"{_gib(c_v5p['device_bytes']['total'])} GiB per chip, "
        f"{c_v5p['collectives']['all-to-all']['count']} all-to-alls (4 per MoE layer "
        f"x 30).")
  return "\n".join(out) or "(Switch-XXL and Switch-C have not been compiled yet.)"


DOC_TEMPLATE = """# Pod scale: moe_jax's train step compiled for Cloud TPU pods

Generated by `python -m moe_jax.benchmarks.pod_scale --json` (raw results,
one JSON line per row: [pod_scale.jsonl](pod_scale.jsonl); rerun one row with
`--rows=NAME`, re-render with `--render`). Each row is `moe-compile` -- the
train step `moe-train` runs, with the same function, shardings and donation --
compiled by libtpu {libtpu} (jax {jax}) for the compile-only devices of the
topology, on a {cores}-core CPU machine with no TPU. Every row:
`models/MODEL.gin` + `runs/pretrain.gin` (T5's Adafactor, span-corruption
lengths 512 inputs / 114 targets, float32 parameters, bfloat16 activations),
`T5Config.scan_layers=True`, no remat and one microbatch unless marked.

## The table

{table}

* **HBM per chip**: XLA's `memory_analysis()` of the compiled program
  (arguments + outputs - aliased + temporaries) against the chip's HBM
  (v5p 95 GiB, v4 32 GiB; `moe_jax/aot/chips.py` cites the Cloud TPU pages).
* **Collectives**: `count / GiB per chip per step`, parsed from the compiled
  HLO (a collective inside a scanned layer counts once per iteration; bytes
  are each collective's per-chip buffer, see `moe_jax/aot/hlo.py`). "DCN
  all-reduce" is the gradient reduction between slices (send/recv over the
  data-center network) of the multi-slice row.
* **Roofline MFU bound**: model FLOPs per step (6 x active parameters x each
  stack's tokens + attention; `moe_jax/aot/model_flops.py`) over `chips x
  peak bf16 FLOP/s x max(compiled FLOPs / peak, HBM bytes accessed / HBM
  bandwidth)`, FLOPs and bytes from XLA's cost analysis of the compiled
  program. "Compute alone" drops the HBM term: it is model FLOPs over
  compiled FLOPs.
* **Compile here**: lowering + XLA compile on this machine (shared, loaded).

## switch_base_128 on v5p-128: the expert-parallel all-to-all

{a2a}

## Switch-XXL and Switch-C

{big}

## Scanned and unscanned layers

{scan}

## Two slices

{slices}

## What this proves, and what it does not

* **Fit.** For these meshes and batches the program's buffers fit in each
  chip's HBM, by XLA's own allocation for that chip. (The TPU compiler
  refuses a program that does not fit; `moe-compile` then reports `fits:
  false`, how far over, and what to change, with exit code 1.)
* **The collective pattern.** Which collectives the sharding produces, where
  (the all-to-alls around every MoE layer, the gradient all-reduces, the
  cross-slice reduction), how many per step and how many bytes each chip
  exchanges: this is the program a pod would run.
* **Not speed.** The roofline bound ignores communication time, overlap,
  kernel efficiency and the host; it says "this program cannot beat X% MFU",
  never what it will reach. Step times and MFU need real chips.

## Rows that could not be compiled here, and rows not tried

{failures}
"""


def render(results: dict[str, dict], path: str = DOC) -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    libtpu_version = metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    libtpu_version = "(not installed)"
  import jax  # pylint: disable=g-import-not-at-top
  text = DOC_TEMPLATE.format(table=table(results), a2a=all_to_all_note(results),
                             scan=scan_note(results), slices=slices_note(results),
                             big=big_models_note(results),
                             failures=failures(results), libtpu=libtpu_version,
                             jax=jax.__version__, cores=os.cpu_count())
  with open(path, "w") as f:
    f.write(text)
  return text


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--json", action="store_true", help="print one JSON line per row")
  p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per row")
  p.add_argument("--render", action="store_true", help="only regenerate the doc")
  p.add_argument("--hlo_dir", default=None, help="keep each row's compiled HLO text here")
  p.add_argument("--jsonl", default=JSONL, help="results file (one line per row)")
  p.add_argument("--doc", default=DOC, help="the generated Markdown document")
  p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # child mode
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  by_name = {r.name: r for r in ROWS}
  if args.row:
    print(json.dumps(compile_row(by_name[args.row], args.hlo_dir)))
    return 0
  results = load(args.jsonl)
  if not args.render:
    names = [n for n in args.rows.split(",") if n] or list(by_name)
    unknown = sorted(set(names) - set(by_name))
    if unknown:
      p.error(f"unknown rows {unknown}; rows are {list(by_name)}")
    for name in names:
      line = _run_child(by_name[name], args.timeout, args.hlo_dir)
      results[name] = line
      save(results, args.jsonl)
      if args.json:
        print(json.dumps(line), flush=True)
  render(results, args.doc)
  return 0


if __name__ == "__main__":
  sys.exit(main())
