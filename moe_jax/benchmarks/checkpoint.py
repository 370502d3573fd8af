"""Benchmark: saving and restoring a ~1 GB sharded train state with Orbax.

    python -m moe_jax.benchmarks.checkpoint --json [--size_mb 1024 \
        --mesh data=2,expert=4 --devices 8 --dir /tmp/x --train_steps 5]

The state looks like an MoE train state: expert weights ``[experts, embed,
mlp]`` sharded over ``expert``, a dense embedding, and Adam's two moments
(so params are a third of the bytes). Prints one JSON line with:

* ``state_mb``: bytes of the train state / 2**20.
* ``save_s`` / ``save_mb_per_s``: a synchronous save, start to commit.
* ``restore_s`` / ``restore_mb_per_s``: restore onto the same shardings,
  until every array is ready.
* ``async_blocked_s``: how long ``CheckpointManager.save`` blocks the train
  loop when saving asynchronously (device -> host copy and bookkeeping);
  ``async_blocked_fraction`` = that / ``save_s``.
* ``async_commit_s``: from the start of the async save to its commit, while
  the loop keeps stepping and donating the saved buffers;
  ``steps_during_async_save`` steps ran meanwhile, their median
  ``train_step_during_save_s`` vs ``train_step_s`` without a save in flight
  (the background I/O competes with them for the host).
* ``async_values_ok``: the async checkpoint restores to the values at the
  save (per-leaf sums), although the loop donated those buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", action="store_true", help="print the JSON line only")
  p.add_argument("--size_mb", type=float, default=1024.0,
                 help="approximate train-state size (params + 2 Adam moments)")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--mesh", default="data=2,expert=4")
  p.add_argument("--devices", type=int, default=8,
                 help="CPU devices to emulate (ignored on GPU/TPU)")
  p.add_argument("--dir", default=None,
                 help="where to write (default: a fresh temporary directory)")
  p.add_argument("--train_steps", type=int, default=5,
                 help="timed steps of the toy train loop without a save")
  return p.parse_args(argv)


def _build_state(size_mb, experts, mesh):
  """A sharded ``{"params", "opt_state": {"mu", "nu"}, "step"}`` of float32."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  embed = 512
  # params ~ size/3: experts * 2 * embed * mlp (+ vocab * embed) floats.
  vocab = 8192
  param_floats = size_mb * 2**20 / 4 / 3
  mlp = max(64, int((param_floats - vocab * embed) / (experts * 2 * embed)) // 64 * 64)
  shapes = {"experts": {"wi": (experts, embed, mlp), "wo": (experts, mlp, embed)},
            "embedding": (vocab, embed)}
  specs = {"experts": {"wi": P("expert", "fsdp"), "wo": P("expert", None, "fsdp")},
           "embedding": P(("data", "fsdp", "expert"))}
  shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)

  def init(key):
    leaves, treedef = jax.tree_util.tree_flatten(
        shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [0.02 * jax.random.normal(k, s, jnp.float32)
                  for k, s in zip(keys, leaves)])

  params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  copy = jax.jit(lambda t, c: jax.tree_util.tree_map(lambda x: x * c, t),
                 out_shardings=shardings)
  state = {"params": params,
           "opt_state": {"mu": copy(params, 0.1), "nu": copy(params, 0.01)},
           "step": jax.device_put(jnp.int32(0), NamedSharding(mesh, P()))}
  return jax.block_until_ready(state)


def _nbytes(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def run(args) -> dict:
  if args.devices and "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import manager as manager_lib  # pylint: disable=g-import-not-at-top

  mesh = partitioning.make_mesh(partitioning.parse_mesh_spec(args.mesh))
  state = _build_state(args.size_mb, args.experts, mesh)
  mb = _nbytes(state) / 2**20
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  root = args.dir or tempfile.mkdtemp(prefix="moe_jax_ckpt_bench_")
  try:
    # Synchronous save: start to commit.
    sync_dir = os.path.join(root, "sync")
    with manager_lib.CheckpointManager(sync_dir, save_interval_steps=1,
                                       async_save=False) as ckpt:
      t0 = time.perf_counter()
      ckpt.save(1, state, {"position": 1})
      ckpt.wait_until_finished()
      save_s = time.perf_counter() - t0
    disk_mb = sum(os.path.getsize(os.path.join(r, f))
                  for r, _, fs in os.walk(sync_dir) for f in fs) / 2**20

    # Restore onto the same shardings.
    with manager_lib.CheckpointManager(sync_dir, save_interval_steps=1) as ckpt:
      t0 = time.perf_counter()
      restored, _ = ckpt.restore_or_none(abstract)
      jax.block_until_ready(restored)
      restore_s = time.perf_counter() - t0
    del restored

    # Async save while a toy train loop keeps stepping (donated state).
    step_fn = jax.jit(
        lambda s: jax.tree_util.tree_map(lambda x: x * 0.999 if x.ndim else x + 1, s),
        donate_argnums=0)
    state = jax.block_until_ready(step_fn(state))  # compile
    plain_steps = []
    for _ in range(max(1, args.train_steps)):
      t0 = time.perf_counter()
      state = jax.block_until_ready(step_fn(state))
      plain_steps.append(time.perf_counter() - t0)
    async_dir = os.path.join(root, "async")
    checksum = jax.jit(lambda t: [x.astype("float32").sum() for x in
                                  jax.tree_util.tree_leaves(t)])
    expected = [float(v) for v in checksum(state)]
    with manager_lib.CheckpointManager(async_dir, save_interval_steps=1,
                                       async_save=True) as ckpt:
      t_start = time.perf_counter()
      ckpt.save(2, state, {"position": 2})
      blocked_s = time.perf_counter() - t_start
      during = []
      while ckpt.is_saving_in_progress() or not during:
        t0 = time.perf_counter()
        state = jax.block_until_ready(step_fn(state))  # donates the saved buffers
        during.append(time.perf_counter() - t0)
      ckpt.wait_until_finished()
      commit_s = time.perf_counter() - t_start
    with manager_lib.CheckpointManager(async_dir, save_interval_steps=1) as ckpt:
      restored, _ = ckpt.restore_or_none(abstract)
      got = [float(v) for v in checksum(restored)]
    async_values_ok = all(abs(a - b) <= 1e-6 * max(1.0, abs(b))
                          for a, b in zip(got, expected))
    del restored
  finally:
    if args.dir is None:
      shutil.rmtree(root, ignore_errors=True)

  return {
      "benchmark": "checkpoint",
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "mesh": args.mesh,
      "state_mb": round(mb, 1),
      "disk_mb": round(disk_mb, 1),
      "save_s": round(save_s, 3),
      "save_mb_per_s": round(mb / save_s, 1),
      "restore_s": round(restore_s, 3),
      "restore_mb_per_s": round(mb / restore_s, 1),
      "async_blocked_s": round(blocked_s, 3),
      "async_blocked_fraction": round(blocked_s / save_s, 3),
      "async_commit_s": round(commit_s, 3),
      "train_step_s": round(statistics.median(plain_steps), 4),
      "steps_during_async_save": len(during),
      "train_step_during_save_s": round(statistics.median(during), 4),
      "async_values_ok": async_values_ok,
  }


def main(argv=None):
  args = _parse(sys.argv[1:] if argv is None else argv)
  result = run(args)
  if not args.json:
    for key, value in result.items():
      print(f"{key:>28}: {value}")
  else:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
