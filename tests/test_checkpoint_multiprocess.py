"""Two processes (gloo over 127.0.0.1, 4 CPU devices each) checkpoint together.

Both processes build one global 8-device mesh (data=2, expert=4), save a
sharded state through moe_jax.checkpoints.manager, each writing only its own
shards, then restore it onto data=4, expert=2. The pytest process (8 local
devices) then reads the same checkpoint and compares with NumPy.

Run as a script (``python tests/test_checkpoint_multiprocess.py worker ID
PORT DIR``) this file is one worker.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)


def _reference():
  rng = np.random.default_rng(5)
  return {"params": {"moe": {"wi": rng.standard_normal((8, 8, 4)).astype(np.float32)},
                     "embedding": rng.standard_normal((16, 8)).astype(np.float32)},
          "step": np.asarray(9, np.int32)}


_SPECS_SAVE = {"params/moe/wi": ("expert", "data"), "params/embedding": (("data", "expert"),),
               "step": ()}
_SPECS_RESTORE = {"params/moe/wi": ("expert",), "params/embedding": ("data",), "step": ()}


def _sharding_tree(mesh, tree, specs):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import tree_paths  # pylint: disable=g-import-not-at-top
  names = list(tree_paths.flatten_with_paths(tree))
  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(tree),
      [NamedSharding(mesh, P(*specs[n])) for n in names])


def _worker(process_id, port, directory):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=process_id,
                             initialization_timeout=120)
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import manager as manager_lib  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import tree_paths  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 2 and jax.device_count() == 8
  assert jax.local_device_count() == 4
  ref = _reference()
  mesh = partitioning.make_mesh({"data": 2, "expert": 4})
  shardings = _sharding_tree(mesh, ref, _SPECS_SAVE)
  # Each process supplies only the slices its own devices hold.
  state = jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
      ref, shardings)
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    assert ckpt.save(9, state, {"position": 9 * 16})
    ckpt.wait_until_finished()
  mesh2 = partitioning.make_mesh({"data": 4, "expert": 2})
  shardings2 = _sharding_tree(mesh2, ref, _SPECS_RESTORE)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), ref, shardings2)
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    assert ckpt.latest_step() == 9
    restored, data_state = ckpt.restore_or_none(abstract, shardings2)
  ok = {}
  ref_flat = tree_paths.flatten_with_paths(ref)
  for name, leaf in tree_paths.flatten_with_paths(restored).items():
    assert not leaf.is_fully_addressable or name == "step"
    ok[name] = (leaf.sharding.mesh.shape == mesh2.shape and all(
        np.array_equal(np.asarray(s.data), ref_flat[name][s.index])
        for s in leaf.addressable_shards))
  print("RESULT " + json.dumps({"process": process_id, "data_state": data_state,
                                "ok": ok}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
  sys.path.insert(0, _REPO)
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  sys.exit(0)

# ---------------------------------------------------------------------------
# pytest side.

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from moe_jax import partitioning  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from moe_jax.checkpoints import manager as manager_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from moe_jax.checkpoints import tree_paths  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_save_and_restore_sharded_checkpoint(tmp_path):
  directory = str(tmp_path / "model")
  port = _free_port()
  env = dict(os.environ)
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "worker", str(i), str(port), directory],
      env=env, cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=240)
      outputs.append((proc.returncode, out, err))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for rc, out, err in outputs:
    assert rc == 0, err[-4000:]
  results = [json.loads(line[len("RESULT "):]) for _, out, _ in outputs
             for line in out.splitlines() if line.startswith("RESULT ")]
  assert sorted(r["process"] for r in results) == [0, 1]
  for r in results:
    assert r["data_state"] == {"position": 144}
    assert all(r["ok"].values()), r
  # Each process wrote its own shard files.
  state_dir = os.path.join(directory, "9", "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))

  # The single-process (8 local devices) view of the same checkpoint.
  ref = _reference()
  mesh = partitioning.make_mesh({"data": 2, "expert": 4})
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), ref)
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    restored, _ = ckpt.restore_or_none(abstract)
  ref_flat = tree_paths.flatten_with_paths(ref)
  for name, leaf in tree_paths.flatten_with_paths(restored).items():
    np.testing.assert_array_equal(np.asarray(leaf), ref_flat[name])
