"""The ``moe-compile`` report: memory per chip, fit, roofline bound, collectives.

:func:`from_compiled` builds it from a compiled program, :func:`from_oom`
from the out-of-memory error XLA raises for a program that cannot fit (the
TPU compiler refuses to compile past the chip's HBM). Both return one dict
with the keys :data:`KEYS`; :func:`summary` renders it for people and
:func:`advice` says what to try when it does not fit.

Keys: ``topology`` (libtpu's name, e.g. ``v5p:4x4x4``), ``chips`` (all
slices), ``slices``, ``mesh`` (axis sizes, DCN included), ``global_batch``,
``tokens_per_step`` (encoder inputs + decoder targets of the global batch),
``device_bytes`` / ``host_bytes``, ``hbm_bytes_per_chip``, ``fits``,
``headroom_bytes`` (negative when over), ``flops_per_chip`` (compiled, per
step), ``model_flops_per_step`` (:mod:`moe_jax.aot.model_flops`, all chips),
``roofline_step_s``, ``mfu_bound``, ``collectives`` (:mod:`moe_jax.aot.hlo`),
``compile_s``, ``memory_settings`` (the host-offload macros
``OFFLOAD_OPTIMIZER_STATE`` / ``OFFLOAD_PARAMS``, ``remat_policy``,
``zero_sharding``) and ``host_offload`` (below). For a program XLA refused
for lack of HBM, the FLOPs, roofline, collectives and host traffic are
``None``.

Memory (``device_bytes`` / ``host_bytes``, per chip) is XLA's
``memory_analysis()``: ``argument`` (train state + batch shard), ``output``,
``alias`` (outputs that reuse donated argument buffers: the donated state),
``temp`` (activations and other temporaries); ``total = argument + output -
alias + temp``. Host bytes are buffers in host memory kinds (``pinned_host``
offload), with the same keys: XLA aliases donated host buffers too
(``host_alias_size_in_bytes``), so the new offloaded state overwrites the
old one in place and is counted once.

``host_offload`` (per chip, per step): ``host_to_device_bytes`` /
``device_to_host_bytes`` and ``transfers`` (:mod:`moe_jax.aot.host_memory`),
``host_bytes_per_s`` (the chip's host link, each way) and ``transfer_s``
(the larger direction over it: what the traffic adds to a step that cannot
hide it behind compute), ``host_total_bytes`` (``host_bytes["total"]``: host
arguments + outputs - aliased + temporaries), ``host_memory_bytes_per_chip``
(the host's RAM over its chips; ``None`` where unpublished) and
``host_fits``.

``roofline_step_s`` is a lower bound on the step time from the compiled
program alone: ``max(FLOPs / peak FLOP/s, HBM bytes accessed / HBM
bandwidth)`` per chip, with the chip's published peaks
(:mod:`moe_jax.aot.chips`) and XLA's cost analysis completed for loop
bodies (:mod:`moe_jax.aot.hlo`). It ignores communication and assumes
perfect overlap, so real steps are slower; ``mfu_bound = model FLOPs per
step / (chips x peak x roofline_step_s)`` is therefore an upper bound on the
MFU this program can reach. (``cost_analysis()["optimal_seconds"]`` is not
used: it comes back negative for whole train steps.)
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from moe_jax.aot import chips as chips_lib
from moe_jax.aot import hlo
from moe_jax.aot import host_memory

KEYS = ("topology", "chips", "slices", "mesh", "global_batch", "tokens_per_step",
        "device_bytes", "host_bytes", "hbm_bytes_per_chip", "fits", "headroom_bytes",
        "flops_per_chip", "model_flops_per_step", "roofline_step_s", "mfu_bound",
        "collectives", "compile_s", "memory_settings", "host_offload")
GIB = chips_lib.GIB
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(value: str, unit: str) -> int:
  return int(float(value) * _UNITS[unit.upper()[:1] if unit else ""])


def parse_oom(message: str) -> dict[str, Optional[int]]:
  """Sizes in an XLA TPU out-of-memory message (``None`` where absent).

  Returns:
    ``{"temp", "used", "available", "over"}`` in bytes. XLA's ``G`` is GiB.
  """
  num = r"([\d.]+)\s*([KMGT]?)i?B?"
  found = {"temp": None, "used": None, "available": None, "over": None}
  m = re.search(rf"required for HLO temporaries \({num}\) exceeds available HBM "
                rf"\({num}\)", message)
  if m:
    found["temp"] = _bytes(m.group(1), m.group(2))
    found["available"] = _bytes(m.group(3), m.group(4))
  m = re.search(rf"Used {num} of {num} hbm", message)
  if m:
    found["used"] = _bytes(m.group(1), m.group(2))
    found["available"] = _bytes(m.group(3), m.group(4))
  m = re.search(rf"Exceeded hbm capacity by {num}", message)
  if m:
    found["over"] = _bytes(m.group(1), m.group(2))
  return found


def is_oom(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def _base(topo, mesh_shape: Mapping[str, int], batch_size: int, tokens_per_step: int,
          model_flops: float, compile_s: float,
          memory_settings: Optional[Mapping[str, Any]]) -> dict[str, Any]:
  return {"topology": topo.name, "chips": topo.num_chips, "slices": topo.num_slices,
          "mesh": {k: int(v) for k, v in mesh_shape.items()},
          "global_batch": int(batch_size), "tokens_per_step": int(tokens_per_step),
          "hbm_bytes_per_chip": int(topo.chip.hbm_bytes),
          "model_flops_per_step": float(model_flops), "compile_s": round(compile_s, 2),
          "memory_settings": dict(memory_settings or {})}


def _host_offload(report: Mapping[str, Any], chip, text: Optional[str]) -> dict[str, Any]:
  total = report["host_bytes"]["total"]
  capacity = chip.host_memory_bytes or None
  out = {"host_to_device_bytes": None, "device_to_host_bytes": None, "transfers": None,
         "host_bytes_per_s": chip.host_bytes_per_s or None, "transfer_s": None,
         "host_total_bytes": int(total), "host_memory_bytes_per_chip": capacity,
         "host_fits": None if capacity is None else bool(total <= capacity)}
  if text is not None:
    moved = host_memory.transfers(text)
    out.update(host_to_device_bytes=moved["host_to_device"]["bytes"],
               device_to_host_bytes=moved["device_to_host"]["bytes"],
               transfers=sum(v["count"] for v in moved.values()))
    if chip.host_bytes_per_s:
      out["transfer_s"] = host_memory.seconds(moved, chip.host_bytes_per_s)
  return out


def memory_bytes(argument: int, output: int, alias: int, temp: int) -> dict[str, int]:
  """One memory space's bytes; ``total`` counts a donated, aliased buffer once."""
  argument, output, alias, temp = (int(x) for x in (argument, output, alias, temp))
  return {"argument": argument, "temp": temp, "output": output, "alias": alias,
          "total": argument + output - alias + temp}


def _fit(report: dict[str, Any]) -> None:
  total = report["device_bytes"]["total"]
  report["headroom_bytes"] = int(report["hbm_bytes_per_chip"] - total)
  report["fits"] = bool(report["headroom_bytes"] >= 0)


def from_compiled(compiled: Any, topo, *, mesh_shape: Mapping[str, int],
                  batch_size: int, tokens_per_step: int, model_flops: float,
                  compile_s: float, memory_settings: Optional[Mapping[str, Any]] = None
                  ) -> tuple[dict[str, Any], hlo.Analysis]:
  """The report of a compiled program, and the HLO analysis behind it.

  Args:
    compiled: ``jax.stages.Compiled`` for the topology's devices.
    topo: its :class:`~moe_jax.aot.topology.Topology`.
    mesh_shape: mesh axis sizes; batch_size: global batch;
    tokens_per_step: tokens the step processes; model_flops: model FLOPs per
      step (:mod:`moe_jax.aot.model_flops`); compile_s: lowering + compile time;
    memory_settings: the run's offload switches (``Experiment.memory_settings``).
  """
  report = _base(topo, mesh_shape, batch_size, tokens_per_step, model_flops, compile_s,
                 memory_settings)
  mem = compiled.memory_analysis()
  report["device_bytes"] = memory_bytes(mem.argument_size_in_bytes,
                                        mem.output_size_in_bytes,
                                        mem.alias_size_in_bytes, mem.temp_size_in_bytes)
  report["host_bytes"] = memory_bytes(mem.host_argument_size_in_bytes,
                                      mem.host_output_size_in_bytes,
                                      mem.host_alias_size_in_bytes, mem.host_temp_size_in_bytes)
  _fit(report)
  text = compiled.as_text()
  analysis = hlo.analyze(text)
  report["host_offload"] = _host_offload(report, topo.chip, text)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) + analysis.loop_extra_flops
  accessed = float(cost.get("bytes accessed", 0.0)) + analysis.loop_extra_bytes
  chip = topo.chip
  step_s = max(flops / chip.peak_bf16_flops, accessed / chip.hbm_bytes_per_s)
  report["flops_per_chip"] = flops
  report["roofline_step_s"] = step_s
  report["mfu_bound"] = (model_flops / (topo.num_chips * chip.peak_bf16_flops * step_s)
                         if step_s > 0 else None)
  report["collectives"] = analysis.collectives
  report["_detail"] = {"hbm_bytes_accessed_per_chip": accessed,
                       "xla_cost_flops": float(cost.get("flops", 0.0)),
                       "xla_cost_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
                       "compute_s": flops / chip.peak_bf16_flops,
                       "memory_s": accessed / chip.hbm_bytes_per_s,
                       "unknown_trip_counts": analysis.unknown_loops}
  return report, analysis


def from_oom(message: str, topo, *, argument_bytes: int, state_bytes: int,
             mesh_shape: Mapping[str, int], batch_size: int, tokens_per_step: int,
             model_flops: float, compile_s: float,
             memory_settings: Optional[Mapping[str, Any]] = None,
             host_argument_bytes: int = 0) -> dict[str, Any]:
  """The report of a program XLA refused to compile for lack of HBM.

  Arguments and outputs are not in the error; they are the per-chip shards
  of the train state and batch (``argument_bytes``) and of the new, donated
  state (``state_bytes``, the outputs aliased onto the inputs). The error's
  temporaries (or total used) complete the total. The FLOPs, roofline and
  collectives of a program that was never built are ``None``; host memory
  is the state that rests there (``host_argument_bytes``), donated and
  aliased by the new state.
  """
  report = _base(topo, mesh_shape, batch_size, tokens_per_step, model_flops, compile_s,
                 memory_settings)
  sizes = parse_oom(message)
  temp = sizes["temp"]
  if temp is None and sizes["used"] is not None:
    temp = max(sizes["used"] - argument_bytes, 0)
  if temp is None and sizes["over"] is not None:
    temp = max(topo.chip.hbm_bytes + sizes["over"] - argument_bytes, 0)
  temp = temp if temp is not None else max(topo.chip.hbm_bytes - argument_bytes + 1, 0)
  report["device_bytes"] = memory_bytes(argument_bytes, state_bytes, state_bytes, temp)
  report["host_bytes"] = memory_bytes(host_argument_bytes, host_argument_bytes,
                                      host_argument_bytes, 0)
  report["host_offload"] = _host_offload(report, topo.chip, None)
  _fit(report)
  report["fits"] = False  # XLA said so, whatever the arithmetic
  report.update(flops_per_chip=None, roofline_step_s=None, mfu_bound=None,
                collectives=None)
  report["_detail"] = {"xla_error": message.strip().splitlines()[0][:500]}
  return report


def public(report: Mapping[str, Any]) -> dict[str, Any]:
  """The report with exactly :data:`KEYS` (what ``--json`` prints)."""
  return {k: report[k] for k in KEYS}


def advice(report: Mapping[str, Any]) -> list[str]:
  """What to change when the program does not fit, biggest lever first."""
  dev = report["device_bytes"]
  state = dev["argument"]
  activations = dev["temp"]
  state_tips = [
      "shard the train state further: raise MESH_FSDP (with FSDP_PARAMS=True the "
      "non-expert weights and their optimizer state shard over fsdp) or MESH_EXPERT "
      "(expert weights shard over expert), keeping MESH_DATA * MESH_FSDP * "
      "MESH_EXPERT * MESH_MODEL = chips per slice",
      "or MESH_MODEL (tensor parallelism over mlp / heads / vocab)"]
  act_tips = [
      "cut activation memory: --gin.T5Config.remat_policy=\"'full'\" (or "
      "\"'dots_saveable'\") recomputes activations in the backward pass",
      "--gin.NUM_MICROBATCHES=k accumulates gradients over k smaller microbatches",
      "a smaller --gin.BATCH_SIZE or TASK_FEATURE_LENGTHS, or more chips "
      "(a larger --topology or --num_slices)"]
  tips = act_tips + state_tips if activations >= state else state_tips + act_tips
  settings = report.get("memory_settings") or {}
  offload = [f"--gin.{k}=True" for k in ("OFFLOAD_OPTIMIZER_STATE", "OFFLOAD_PARAMS")
             if not settings.get(k)]
  if offload:
    tips.append("host offload: " + " and ".join(offload) + " keep the optimizer state / "
                "float32 parameters in host memory between steps (docs/offload.md)")
  if settings.get("OFFLOAD_OPTIMIZER_STATE") and not settings.get("OPTIMIZER_UPDATE_ON_HOST"):
    tips.append("--gin.OPTIMIZER_UPDATE_ON_HOST=True runs the optimizer update on the "
                "host CPU, so the offloaded state never has a copy in HBM")
  if settings.get("remat_policy") != "offload":
    tips.append("--gin.REMAT_POLICY=\"'offload'\" moves the MoE dispatch/combine and "
                "attention outputs to host memory instead of keeping them in HBM")
  if not settings.get("zero_sharding"):
    tips.append("--gin.train.zero_sharding=True shards the non-expert weights and "
                "their optimizer state over every batch axis")
  return tips


def _gib(n: Optional[float]) -> str:
  return "?" if n is None else f"{n / GIB:.2f} GiB"


def _si(n: float, unit: str = "") -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(n) >= scale:
      return f"{n / scale:.3g} {prefix}{unit}"
  return f"{n:.3g} {unit}"


def summary(report: Mapping[str, Any], topo, *, title: str = "",
            params: Optional[tuple[int, int]] = None) -> str:
  """The human-readable report (several lines)."""
  dev, host = report["device_bytes"], report["host_bytes"]
  mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items() if v != 1) or "1 chip"
  lines = [f"moe-compile: {title + ' on ' if title else ''}{topo.describe()}, mesh {mesh}"]
  if params:
    lines.append(f"  params: {params[0]:,} total, {params[1]:,} active per token")
  lines.append(f"  batch {report['global_batch']}: {report['tokens_per_step']:,} tokens "
               f"per step; model FLOPs {_si(report['model_flops_per_step'], 'FLOP')} per step")
  lines.append(
      f"  HBM per chip: {_gib(dev['total'])} of {_gib(report['hbm_bytes_per_chip'])} "
      f"(arguments {_gib(dev['argument'])}, temporaries {_gib(dev['temp'])}, outputs "
      f"{_gib(dev['output'])}, aliased {_gib(dev['alias'])})")
  if any(host.values()):
    lines.append(f"  host memory per chip: {_gib(host['total'])} (arguments "
                 f"{_gib(host['argument'])}, temporaries {_gib(host['temp'])}, outputs "
                 f"{_gib(host['output'])}, aliased {_gib(host['alias'])})")
  settings = report.get("memory_settings") or {}
  if settings:
    lines.append("  memory settings: " + " ".join(f"{k}={v}" for k, v in settings.items()))
  off = report.get("host_offload") or {}
  if off.get("host_to_device_bytes") or off.get("device_to_host_bytes"):
    cap = off.get("host_memory_bytes_per_chip")
    lines.append(
        f"  host <-> device per step: {_gib(off['host_to_device_bytes'])} in, "
        f"{_gib(off['device_to_host_bytes'])} out ({off['transfers']} copies)"
        + (f", >= {off['transfer_s'] * 1e3:.1f} ms at {_si(off['host_bytes_per_s'], 'B/s')}"
           if off.get("transfer_s") is not None else "")
        + f"; host memory {_gib(off['host_total_bytes'])}"
        + (f" of {_gib(cap)} per chip" + ("" if off["host_fits"] else " (DOES NOT FIT)")
           if cap else ""))
  detail = report.get("_detail", {})
  if report["fits"]:
    lines.append(f"  fits: yes, {_gib(report['headroom_bytes'])} headroom per chip")
  else:
    over = -report["headroom_bytes"]
    lines.append(f"  fits: NO, {_gib(over)} over ({dev['total'] / report['hbm_bytes_per_chip']:.1f}x"
                 f" the chip's HBM)")
    if "xla_error" in detail:
      lines.append(f"    XLA: {detail['xla_error']}")
    lines.append("  try:")
    lines += [f"    - {tip}" for tip in advice(report)]
  if report["flops_per_chip"] is not None:
    lines.append(
        f"  compiled: {_si(report['flops_per_chip'], 'FLOP')} and "
        f"{_gib(detail.get('hbm_bytes_accessed_per_chip'))} HBM traffic per chip per step")
    lines.append(
        f"  roofline: step >= {report['roofline_step_s'] * 1e3:.2f} ms (compute "
        f"{detail['compute_s'] * 1e3:.2f} ms, HBM {detail['memory_s'] * 1e3:.2f} ms at "
        f"{_si(topo.chip.peak_bf16_flops, 'FLOP/s')}, {_si(topo.chip.hbm_bytes_per_s, 'B/s')}"
        f"), so MFU <= {report['mfu_bound']:.1%}")
    if detail.get("unknown_trip_counts"):
      lines.append(f"  (loops with unknown trip count, counted once: "
                   f"{', '.join(detail['unknown_trip_counts'])})")
  if report["collectives"] is not None:
    parts = [f"{kind} {c['count']} x = {_gib(c['bytes'])}"
             for kind, c in report["collectives"].items() if c["count"]]
    lines.append("  collectives per step (bytes per chip): " + ("; ".join(parts) or "none"))
  if report["flops_per_chip"] is None:
    lines.append(f"  XLA refused the program after {report['compile_s']:.1f} s")
  else:
    lines.append(f"  compiled in {report['compile_s']:.1f} s")
  return "\n".join(lines)

