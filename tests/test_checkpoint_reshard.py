"""Restoring a checkpoint onto a different mesh (moe_jax.checkpoints.manager).

Saved on 8 devices as data=2,expert=4; restored on data=4,expert=2 (same
process) and on a 4-device data=2,expert=2 mesh (a subprocess with its own
XLA_FLAGS). Values are compared with the NumPy arrays the state was built
from, shard by shard.

Run as a script (``python tests/test_checkpoint_reshard.py restore4 DIR OUT``)
this file is the 4-device child.
"""

import json
import os
import subprocess
import sys

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)


def _reference_state():
  rng = np.random.default_rng(3)
  return {
      "params": {"moe": {"wi": rng.standard_normal((4, 8, 16)).astype(np.float32),
                         "wo": rng.standard_normal((4, 16, 8)).astype(np.float32)},
                 "embedding": rng.standard_normal((32, 8)).astype(np.float32)},
      "opt_state": {"mu": {"wi": rng.standard_normal((4, 8, 16)).astype(np.float32)}},
      "step": np.asarray(17, np.int32),
  }


# Mesh-axis specs per leaf; applied to any mesh whose axes have these names.
_SPECS = {"params/moe/wi": ("expert", "data"), "params/moe/wo": ("expert",),
          "params/embedding": (("data", "expert"),), "opt_state/mu/wi": ("expert",),
          "step": ()}


def _shardings(mesh, tree):
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import tree_paths  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  names = list(tree_paths.flatten_with_paths(tree))
  leaves = [NamedSharding(mesh, P(*_SPECS[n])) for n in names]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), leaves)


def _abstract(ref, shardings):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), ref, shardings)


def _child_restore4(directory, out_dir):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import manager as manager_lib  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import tree_paths  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4, jax.devices()
  mesh = partitioning.make_mesh({"data": 2, "expert": 2})
  ref = _reference_state()
  shardings = _shardings(mesh, ref)
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    state, data_state = ckpt.restore_or_none(_abstract(ref, shardings), shardings)
  report = {"devices": jax.device_count(), "data_state": data_state, "leaves": {}}
  arrays = {}
  for name, leaf in tree_paths.flatten_with_paths(state).items():
    report["leaves"][name] = {
        "spec": [list(a) if isinstance(a, tuple) else a for a in leaf.sharding.spec],
        "mesh": dict(leaf.sharding.mesh.shape),
        "shards_ok": all(
            np.array_equal(np.asarray(s.data), np.asarray(leaf)[s.index])
            for s in leaf.addressable_shards),
        "num_shards": len({str(s.index) for s in leaf.addressable_shards}),
    }
    arrays[name.replace("/", ".")] = np.asarray(leaf)
  np.savez(os.path.join(out_dir, "restored.npz"), **arrays)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "restore4":
  sys.path.insert(0, _REPO)
  _child_restore4(sys.argv[2], sys.argv[3])
  sys.exit(0)

# ---------------------------------------------------------------------------
# pytest side (8 devices from conftest).

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from moe_jax import partitioning  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from moe_jax.checkpoints import manager as manager_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from moe_jax.checkpoints import tree_paths  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def saved_on_2x4(tmp_path_factory):
  directory = tmp_path_factory.mktemp("reshard")
  mesh = partitioning.make_mesh({"data": 2, "expert": 4})
  ref = _reference_state()
  shardings = _shardings(mesh, ref)
  state = jax.tree_util.tree_map(jax.device_put, ref, shardings)
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    assert ckpt.save(17, state, {"examples_seen": 544})
  return str(directory), ref


def test_restore_on_data4_expert2(saved_on_2x4):
  directory, ref = saved_on_2x4
  mesh = partitioning.make_mesh({"data": 4, "expert": 2})
  shardings = _shardings(mesh, ref)
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    state, data_state = ckpt.restore_or_none(_abstract(ref, shardings), shardings)
  assert data_state == {"examples_seen": 544}
  ref_flat = tree_paths.flatten_with_paths(ref)
  for name, leaf in tree_paths.flatten_with_paths(state).items():
    assert leaf.sharding.mesh.shape == mesh.shape, name
    assert leaf.sharding.spec == P(*_SPECS[name]), name
    np.testing.assert_array_equal(np.asarray(leaf), ref_flat[name])
    for shard in leaf.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), ref_flat[name][shard.index])
  wi = state["params"]["moe"]["wi"]
  # expert=2 over 4 experts, data=4 over 8 rows: each shard is [2, 2, 16].
  assert {s.data.shape for s in wi.addressable_shards} == {(2, 2, 16)}


def test_restore_on_four_devices_in_subprocess(saved_on_2x4, tmp_path):
  directory, ref = saved_on_2x4
  env = dict(os.environ)
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "restore4", directory, str(tmp_path)],
      env=env, cwd=_REPO, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(tmp_path / "report.json") as f:
    report = json.load(f)
  assert report["devices"] == 4
  assert report["data_state"] == {"examples_seen": 544}
  restored = np.load(tmp_path / "restored.npz")
  for name, want in tree_paths.flatten_with_paths(ref).items():
    info = report["leaves"][name]
    assert info["mesh"] == {"data": 2, "fsdp": 1, "expert": 2, "model": 1}, name
    expected_spec = [list(a) if isinstance(a, tuple) else a for a in _SPECS[name]]
    assert info["spec"] == expected_spec, name
    assert info["shards_ok"], name
    np.testing.assert_array_equal(restored[name.replace("/", ".")], want)
  # wi is split 2 ways over experts and 2 over embed rows: 4 distinct shards.
  assert report["leaves"]["params/moe/wi"]["num_shards"] == 4
