"""How many more experts fit per chip with host offload (``moe-compile``).

  python -m moe_jax.benchmarks.offload_fit --json          # search, print JSON
  python -m moe_jax.benchmarks.offload_fit --settings=none,optimizer --json

One fixed topology (v5p-8: 4 chips, ``v5p:2x2x1``), mesh (``data=1,
expert=4``), batch (32 sequences x 512 target tokens, 8 per chip) and model
shape: a decoder-only Switch T5-Large (``models/switch_large_128.gin`` with
``T5Config.decoder_only=True``: d_model 1024, 16 heads x 64, 24 layers,
every other MLP a top-1 MoE of d_ff 2816, 32128-token vocabulary; float32
parameters, bfloat16 activations, ``scan_layers=True`` so each compile takes
minutes), AdamW (the optimizer whose state ZeRO-Offload moves), ZeRO
sharding on in every setting. For each memory setting (:data:`SETTINGS`) it
searches the number of experts (multiples of the expert-parallel degree 4)
for the largest whose train step XLA compiles within the chip's HBM; a
program that does not fit is XLA's out-of-memory refusal, read by
:func:`moe_jax.aot.report.from_oom`.

The search (:func:`search`) is a secant search on the per-chip device bytes,
which grow almost linearly with the number of experts: two compiles, then
compiles at the predicted crossing until the fitting and the failing counts
are one step (:data:`STEP`) apart or the per-setting budget of compiles is
spent. Every compile is recorded; they are kept in ``docs/offload.json``
and reused by a rerun (``--fresh`` recompiles).

A count fits when XLA compiles it within HBM *and* the host RAM per chip
holds its host bytes (:func:`fits`; host arguments + outputs - aliased +
temporaries: XLA writes the new offloaded state into the donated host
buffers). The next count is predicted from the device-bytes line or, where
it crosses first, the host-bytes line. ``host_limited_experts`` is where the
host-bytes line through the smallest and largest compiled points crosses
the host RAM (an interpolation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

from moe_jax.aot import report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(REPO, "docs", "offload.json")
TOPOLOGY = "v5p-8"
STEP = 4            # experts: multiples of the expert-parallel degree
MAX_COMPILES = 7    # per setting
GIN_FILES = ("models/switch_large_128.gin", "runs/pretrain.gin")
FIXED = ("T5Config.decoder_only = True", "TASK_FEATURE_LENGTHS = {'targets': 512}",
         "MESH_DATA = 1", "MESH_EXPERT = 4", "BATCH_SIZE = 32",
         "T5Config.scan_layers = True", "ACTIVATION_DTYPE = 'bfloat16'",
         "make_optimizer.name = 'adamw'", "train.zero_sharding = True")
SETTINGS = {
    "none": (),
    "optimizer": ("OFFLOAD_OPTIMIZER_STATE = True",),
    "optimizer+params": ("OFFLOAD_OPTIMIZER_STATE = True", "OFFLOAD_PARAMS = True"),
    "everything": ("OFFLOAD_OPTIMIZER_STATE = True", "OFFLOAD_PARAMS = True",
                   "REMAT_POLICY = 'offload'"),
    # The optimizer update computed by the host CPU (OPTIMIZER_UPDATE_ON_HOST).
    "optimizer+host_update": ("OFFLOAD_OPTIMIZER_STATE = True",
                              "OPTIMIZER_UPDATE_ON_HOST = True"),
    # The whole train state on the host, updated there: the device holds the
    # activations and the blocks' fetched weights, nothing between steps.
    "optimizer+params+host_update": ("OFFLOAD_OPTIMIZER_STATE = True",
                                     "OFFLOAD_PARAMS = True",
                                     "OPTIMIZER_UPDATE_ON_HOST = True"),
}
START = {"none": (128, 256), "optimizer": (128, 256), "optimizer+params": (128, 256),
         "everything": (128, 256), "optimizer+host_update": (128, 256),
         "optimizer+params+host_update": (256, 512)}


def bindings(setting: str, num_experts: int) -> list[str]:
  """The gin bindings of one compile."""
  return [*FIXED, *SETTINGS[setting], f"NUM_EXPERTS = {num_experts}"]


def compile_point(setting: str, num_experts: int, topology: str = TOPOLOGY) -> dict[str, Any]:
  """Compiles one (setting, experts) for ``topology`` in this process; its record.

  Returns:
    ``{"setting", "num_experts", "fits", "device_bytes", "host_bytes",
    "host_offload", "roofline_step_s", "compile_s", "params", "xla_error"}``
    (``device_bytes`` etc. as in :mod:`moe_jax.aot.report`, per chip).
  """
  from moe_jax.aot import step  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  done = step.run(topology, 1, list(GIN_FILES), bindings(setting, num_experts),
                  title=f"{setting} E={num_experts}")
  rep = done.report
  print(done.summary, file=sys.stderr, flush=True)
  return {"setting": setting, "num_experts": num_experts, "fits": rep["fits"],
          "device_bytes": rep["device_bytes"], "host_bytes": rep["host_bytes"],
          "host_offload": rep["host_offload"], "hbm_bytes_per_chip": rep["hbm_bytes_per_chip"],
          "roofline_step_s": rep["roofline_step_s"], "mfu_bound": rep["mfu_bound"],
          "collectives": rep["collectives"], "memory_settings": rep["memory_settings"],
          "params": rep["_detail"]["params"], "xla_error": rep["_detail"].get("xla_error"),
          "compile_s": rep["compile_s"], "wall_s": round(time.perf_counter() - t0, 1)}


def _round_down(e: float) -> int:
  return max(STEP, int(e // STEP) * STEP)


def _crossing(a: tuple[int, int], b: tuple[int, int], limit: int) -> float:
  """Experts where the line through ``(experts, bytes)`` points a, b hits ``limit``."""
  (e1, t1), (e2, t2) = a, b
  if e1 == e2 or t1 == t2:
    return float(max(e1, e2) * 2)
  return e1 + (limit - t1) * (e2 - e1) / (t2 - t1)


def fits(point: dict[str, Any]) -> bool:
  """The program fits the chip: XLA compiled it within HBM *and* the host
  RAM per chip holds its host bytes (where that RAM is published)."""
  return bool(point["fits"]) and point["host_offload"].get("host_fits") is not False


def next_count(points: dict[int, dict[str, Any]], limit: int) -> Optional[int]:
  """The next number of experts to compile, or ``None`` when the search is done.

  Args:
    points: compiled records by number of experts.
    limit: HBM bytes per chip.
  """
  fit = [e for e, p in points.items() if fits(p)]
  over = [e for e, p in points.items() if not fits(p)]
  lo, hi = (max(fit) if fit else None), (min(over) if over else None)
  if lo is not None and hi is not None and hi - lo <= STEP:
    return None
  # Extrapolate from the two largest compiled (fitting) programs when there
  # are two: XLA's out-of-memory error reports temporaries before the
  # optimizations a finished compile applies, so refused points sit above the
  # line. Otherwise from the two points nearest the limit.
  near = sorted(fit)[-2:] if len(fit) >= 2 else sorted(
      points, key=lambda e: abs(points[e]["device_bytes"]["total"] - limit))[:2]
  guess = _crossing(*[(e, points[e]["device_bytes"]["total"]) for e in near], limit)
  # Where the host RAM binds first, its line decides.
  host = [points[e]["host_offload"] for e in near]
  capacity = host[0].get("host_memory_bytes_per_chip")
  if capacity and all(h["host_total_bytes"] for h in host):
    guess = min(guess, _crossing(*[(e, h["host_total_bytes"]) for e, h in zip(near, host)],
                                 capacity))
  guess = _round_down(guess)
  if lo is not None:
    guess = max(guess, lo + STEP)
  if hi is not None:
    guess = min(guess, hi - STEP)
  if guess in points:  # the line points at a count already compiled: step off it
    guess = guess + STEP if fits(points[guess]) else guess - STEP
  return guess if guess not in points and guess >= STEP else None


def search(setting: str, compile_fn: Callable[[str, int], dict[str, Any]],
           cache: dict[tuple[str, int], dict[str, Any]],
           max_compiles: int = MAX_COMPILES,
           start: Optional[tuple[int, int]] = None) -> dict[int, dict[str, Any]]:
  """The compiled points of one setting's search (see the module docstring);
  ``start``: the first two counts (default :data:`START`)."""
  points: dict[int, dict[str, Any]] = {}

  def get(e: int) -> None:
    if (setting, e) not in cache:
      cache[(setting, e)] = compile_fn(setting, e)
    points[e] = cache[(setting, e)]

  first, second = start or START[setting]
  get(first)
  get(second if fits(points[first]) else first // 2)
  limit = points[first]["hbm_bytes_per_chip"]
  while len(points) < max_compiles:
    e = next_count(points, limit)
    if e is None:
      break
    get(e)
  return points


def _host_limited(points: dict[int, dict[str, Any]]) -> Optional[int]:
  """Largest count whose host bytes (a line through the smallest and largest
  compiled points) fit the host RAM per chip; ``None`` without host memory
  use or a published RAM size."""
  # Compiled programs only: a refused one's host bytes omit host temporaries.
  good = [(e, p["host_offload"]) for e, p in sorted(points.items())
          if p["host_offload"]["host_total_bytes"]
          and p["host_offload"]["host_to_device_bytes"] is not None]
  if len(good) < 2 or not good[0][1]["host_memory_bytes_per_chip"]:
    return None
  cap = good[0][1]["host_memory_bytes_per_chip"]
  (e1, a), (e2, b) = good[0], good[-1]
  return _round_down(_crossing((e1, a["host_total_bytes"]), (e2, b["host_total_bytes"]), cap))


def _row(setting: str, point: dict[str, Any]) -> dict[str, Any]:
  """What one compiled point holds and costs (a row of the table)."""
  off = point["host_offload"]
  return {"setting": setting, "num_experts": point["num_experts"],
          "total_params": point["params"]["total"], "active_params": point["params"]["active"],
          "device_bytes": point["device_bytes"]["total"],
          "device_argument_bytes": point["device_bytes"]["argument"],
          "host_bytes": off["host_total_bytes"], "host_fits": off["host_fits"],
          "host_memory_bytes_per_chip": off["host_memory_bytes_per_chip"],
          "host_to_device_bytes": off["host_to_device_bytes"],
          "device_to_host_bytes": off["device_to_host_bytes"],
          "transfer_s": off["transfer_s"], "roofline_step_s": point["roofline_step_s"]}


def summarize(setting: str, points: dict[int, dict[str, Any]]) -> dict[str, Any]:
  """The row of one setting: the largest fitting count and what it costs."""
  fit = [e for e, p in points.items() if fits(p)]
  over = [e for e, p in points.items() if not fits(p)]
  if not fit:
    return {"setting": setting, "num_experts": None,
            "smallest_not_fitting": min(over) if over else None}
  best = max(fit)
  return {**_row(setting, points[best]),
          "smallest_not_fitting": min([e for e in over if e > best], default=None),
          "host_limited_experts": _host_limited(points), "compiles": len(points)}


def point_row(setting: str, point: dict[str, Any]) -> dict[str, Any]:
  """The row of one count compiled outside the search (``--point``): whether
  the device holds it (``device_fits``) and what host RAM it would need."""
  return {**_row(setting, point), "device_fits": bool(point["fits"]),
          "smallest_not_fitting": None, "host_limited_experts": None, "compiles": 1}


def migrate_host_alias(record: dict[str, Any]) -> dict[str, Any]:
  """A compile recorded before the report read XLA's host aliasing (its
  ``host_bytes`` has no ``alias``): the host arguments of the train step are
  exactly the offloaded state, which is donated and written back in place
  (``host_alias == host_argument``, checked for every offload switch by
  ``tests/test_offload_tpu.py``), so its host total is recomputed as
  arguments + outputs - aliased + temporaries. Marked ``host_alias_inferred``.
  """
  host = record["host_bytes"]
  if "alias" in host:
    return record
  host = report.memory_bytes(host["argument"], host["output"], host["argument"], host["temp"])
  off = dict(record["host_offload"], host_total_bytes=host["total"])
  cap = off.get("host_memory_bytes_per_chip")
  off["host_fits"] = None if not cap else bool(host["total"] <= cap)
  return dict(record, host_bytes=host, host_offload=off, host_alias_inferred=True)


def _load(path: str, topology: str) -> dict[tuple[str, int], dict[str, Any]]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    data = json.load(f)
  if data.get("fixed") != list(FIXED) or data.get("topology") != topology:
    return {}
  return {(c["setting"], c["num_experts"]): migrate_host_alias(c) for c in data["compiles"]}


def run(settings: Sequence[str], path: str = OUT, fresh: bool = False,
        max_compiles: int = MAX_COMPILES, topology: str = TOPOLOGY,
        start: Optional[tuple[int, int]] = None,
        points: Sequence[tuple[str, int]] = ()) -> dict[str, Any]:
  """Searches each setting, then compiles (or reuses) each extra
  ``(setting, experts)`` of ``points``, writing ``path`` after every compile;
  the JSON."""
  cache = {} if fresh else _load(path, topology)
  results: dict[str, Any] = {}

  def write() -> dict[str, Any]:
    base = results.get("none", {}).get("total_params")
    for row in results.values():
      row["params_ratio_to_none"] = (row["total_params"] / base
                                     if base and row.get("total_params") else None)
    data = {"topology": topology, "gin_files": list(GIN_FILES), "fixed": list(FIXED),
            "settings": {k: list(v) for k, v in SETTINGS.items()}, "step": STEP,
            "results": list(results.values()),
            "compiles": sorted(cache.values(), key=lambda c: (list(SETTINGS).index(
                c["setting"]), c["num_experts"]))}
    with open(path, "w") as f:
      json.dump(data, f, indent=1)
    return data

  def compile_and_save(setting: str, e: int) -> dict[str, Any]:
    record = compile_point(setting, e, topology)
    cache[(setting, e)] = record
    write()
    return record

  for setting in settings:
    found = search(setting, compile_and_save, cache, max_compiles, start)
    results[setting] = summarize(setting, found)
  for setting, e in points:
    record = cache.get((setting, e)) or compile_and_save(setting, e)
    results[f"{setting} @ {e}"] = point_row(setting, record)
  return write()


def _round(x: Optional[float], digits: int) -> str:
  return "-" if x is None else str(round(x, digits))


def table(data: dict[str, Any]) -> str:
  """The fit table (markdown) of a :func:`run` result."""
  gb = lambda n: "-" if n is None else f"{n / 2**30:.1f}"  # noqa: E731
  first = next((r for r in data["results"] if r.get("host_memory_bytes_per_chip")), {})
  hbm = next((c["hbm_bytes_per_chip"] for c in data["compiles"]), None)
  host_cap = first.get("host_memory_bytes_per_chip")
  rows = ["| setting | experts (fits; first that does not) | total params | x none | "
          f"device GiB/chip (of {gb(hbm)}) | host GiB/chip (fits {gb(host_cap)}?) | host-RAM-limited "
          "experts | host->device GiB/step | transfer s/step | roofline step s |",
          "|" + "---|" * 10]
  for r in data["results"]:
    if r.get("num_experts") is None:
      rows.append(f"| {r['setting']} | none fits | | | | | | | | |")
      continue
    ratio = r.get("params_ratio_to_none")
    if "device_fits" in r:   # one compile outside the search
      label = f"{r['setting']}, one compile"
      counts = (f"{r['num_experts']} (device {'fits' if r['device_fits'] else 'does not'}; "
                f"host {'does not' if r['host_fits'] is False else 'fits'})")
    else:
      label, counts = r["setting"], f"{r['num_experts']} ({r['smallest_not_fitting']})"
    rows.append(
        f"| {label} | {counts} | "
        f"{r['total_params'] / 1e9:.2f} B | {ratio:.2f} | {gb(r['device_bytes'])} | "
        f"{gb(r['host_bytes'])} ({'yes' if r['host_fits'] else 'no'}) | "
        f"{r['host_limited_experts'] or '-'} | {gb(r['host_to_device_bytes'])} | "
        f"{_round(r['transfer_s'], 2)} | {_round(r['roofline_step_s'], 3)} |")
  return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", action="store_true", help="print the JSON")
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--out", default=OUT)
  parser.add_argument("--fresh", action="store_true", help="recompile every point")
  parser.add_argument("--max_compiles", type=int, default=MAX_COMPILES,
                      help="compiles per setting (cached ones count)")
  parser.add_argument("--topology", default=TOPOLOGY,
                      help="moe-compile topology (another one wants its own --out)")
  parser.add_argument("--point", action="append", default=[],
                      help="also compile SETTING:EXPERTS (repeatable), e.g. "
                           "optimizer+params+host_update:1280")
  parser.add_argument("--start", default=None,
                      help="first two expert counts, e.g. 32,64 (default: per setting)")
  args = parser.parse_args(argv)
  settings = [s for s in args.settings.split(",") if s]
  unknown = set(settings) - set(SETTINGS)
  if unknown:
    parser.error(f"unknown settings {sorted(unknown)}; choose from {list(SETTINGS)}")
  start = tuple(int(x) for x in args.start.split(",")) if args.start else None
  if start is not None and len(start) != 2:
    parser.error(f"--start takes two counts such as 32,64, got {args.start!r}")
  points = []
  for spec in args.point:
    setting, _, experts = spec.rpartition(":")
    if setting not in SETTINGS or not experts.isdigit():
      parser.error(f"--point takes SETTING:EXPERTS with SETTING one of {list(SETTINGS)}, "
                   f"got {spec!r}")
    points.append((setting, int(experts)))
  data = run(settings, args.out, args.fresh, args.max_compiles, args.topology, start,
             points)
  print(json.dumps(data) if args.json else table(data))
  return 0


if __name__ == "__main__":
  sys.exit(main())
