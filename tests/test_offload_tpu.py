"""Host offload and ZeRO sharding in the compiled TPU program (no TPU needed).

The train step of a small decoder-only Switch model is compiled through the
``moe-compile`` path (:func:`moe_jax.aot.step.run`) for a v5p-8 slice of
libtpu's compile-only devices (4 chips, mesh ``expert=4``), once per variant:
plain, optimizer state offloaded, parameters offloaded, ZeRO sharding. The
expected bytes are computed here from the abstract train state alone -- the
sum over leaves of the per-chip shard's element count times the item size --
and compared with XLA's ``memory_analysis()``. Every dimension of the model
is a multiple of TPU's (8, 128) tile, so XLA's buffers carry no layout
padding and the two counts must agree to the byte.
"""

import jax
import numpy as np
import pytest

from moe_jax.aot import platforms, step

pytestmark = pytest.mark.skipif(not platforms.libtpu_installed(),
                                reason='libtpu not installed (pip install -e ".[tpu]")')

GIN_FILES = ["models/tiny_switch.gin", "runs/pretrain.gin"]
# d_model 512, 8 heads x 128, d_ff 512; one scanned (dense, MoE) block of 128
# experts of d_ff 256 (32 per chip); AdamW (state as large as the params).
TILE_ALIGNED = [
    "T5Config.decoder_only = True", "TASK_FEATURE_LENGTHS = {'targets': 32}",
    "MESH_DATA = 1", "MESH_EXPERT = 4", "BATCH_SIZE = 8", "T5Config.scan_layers = True",
    "make_optimizer.name = 'adamw'", "T5Config.d_model = 512", "T5Config.num_heads = 8",
    "T5Config.d_kv = 128", "T5Config.d_ff = 512", "MoeConfig.d_ff = 256",
    "NUM_EXPERTS = 128", "T5Config.relative_attention_num_buckets = 128"]
VARIANTS = {
    "plain": [],
    "optimizer_state": ["OFFLOAD_OPTIMIZER_STATE = True"],
    "params": ["OFFLOAD_PARAMS = True"],
    "zero": ["train.zero_sharding = True"],
    "host_update": ["OFFLOAD_OPTIMIZER_STATE = True", "OPTIMIZER_UPDATE_ON_HOST = True"],
    "all_on_host": ["OFFLOAD_OPTIMIZER_STATE = True", "OFFLOAD_PARAMS = True",
                    "OPTIMIZER_UPDATE_ON_HOST = True"],
}


class _CompiledVariants(dict):
  """``{variant: (report, layout)}``, each variant compiled on first use and
  kept, so a run that deselects tests compiles only what the rest read."""

  def __missing__(self, name):
    result = step.run("v5p-8", 1, GIN_FILES, TILE_ALIGNED + VARIANTS[name], title=name)
    assert result.compiled is not None and result.report["fits"], result.summary
    self[name] = (result.report, result.experiment.layout)
    return self[name]


@pytest.fixture(scope="module")
def compiled():
  return _CompiledVariants()


def _leaves(tree):
  """``[(path names, leaf)]`` of a pytree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path), leaf)
          for path, leaf in flat]


def _shard_bytes(leaf, sharding) -> int:
  """Bytes of one chip's shard of ``leaf`` (``ShapeDtypeStruct``)."""
  return int(np.prod(sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize


def tree_bytes(abstract, shardings, keep=lambda path, leaf: True) -> int:
  """Per-chip bytes of the leaves of ``abstract`` that ``keep(path, leaf)``.

  Args:
    abstract: a pytree of ``jax.ShapeDtypeStruct``.
    shardings: the matching pytree of ``NamedSharding``.
  """
  pairs = zip(_leaves(abstract), jax.tree_util.tree_leaves(shardings))
  return sum(_shard_bytes(leaf, s) for (path, leaf), s in pairs if keep(path, leaf))


def _arrays(path, leaf):
  return leaf.ndim > 0          # step counts (scalars) stay on the device


def _dense(path, leaf):
  return "experts" not in path


def _resting(dev) -> int:
  """Device bytes that hold the state between steps (in, out, minus donated)."""
  return dev["argument"] + dev["output"] - dev["alias"]


@pytest.mark.parametrize("variant, tree, keep", [
    ("optimizer_state", "opt_state", _arrays), ("params", "params", _arrays)])
def test_offloaded_tree_bytes_move_from_device_to_host_arguments(compiled, variant, tree,
                                                                 keep):
  plain, plain_layout = compiled["plain"]
  rep, _ = compiled[variant]
  # The independent count: the tree of the *plain* layout (nothing offloaded).
  expected = tree_bytes(getattr(plain_layout.abstract, tree),
                        getattr(plain_layout.shardings, tree), keep)
  assert expected > 2**20
  assert plain["host_bytes"] == {"argument": 0, "temp": 0, "output": 0, "alias": 0,
                                 "total": 0}
  # Exactly the tree rests in host memory: in the arguments and (the new
  # state) in the outputs, which XLA writes into the donated host buffers,
  # so the host holds it once ...
  host = rep["host_bytes"]
  assert host["argument"] == host["output"] == host["alias"] == expected
  assert host["total"] == expected + host["temp"]
  assert rep["host_offload"]["host_total_bytes"] == host["total"]
  # ... and is gone from the device arguments and outputs.
  assert plain["device_bytes"]["argument"] - rep["device_bytes"]["argument"] == expected
  assert plain["device_bytes"]["output"] - rep["device_bytes"]["output"] == expected


@pytest.mark.parametrize("variant, tree", [("optimizer_state", "opt_state"),
                                           ("params", "params")])
def test_per_chip_device_bytes_drop_by_the_offloaded_amount(compiled, variant, tree):
  """The state's device bytes between steps drop by the offloaded tree, and
  every offloaded byte crosses the host link at least once each way per step."""
  plain, layout = compiled["plain"]
  rep, _ = compiled[variant]
  offloaded = tree_bytes(getattr(layout.abstract, tree), getattr(layout.shardings, tree),
                         _arrays)
  assert _resting(plain["device_bytes"]) - _resting(rep["device_bytes"]) == offloaded
  moved = rep["host_offload"]
  assert moved["host_to_device_bytes"] >= offloaded
  assert moved["device_to_host_bytes"] >= offloaded
  assert moved["transfer_s"] == pytest.approx(
      max(moved["host_to_device_bytes"], moved["device_to_host_bytes"])
      / moved["host_bytes_per_s"])
  assert rep["memory_settings"]["OFFLOAD_OPTIMIZER_STATE"] == (variant == "optimizer_state")
  assert rep["memory_settings"]["OFFLOAD_PARAMS"] == (variant == "params")
  assert plain["host_offload"]["host_to_device_bytes"] == 0


def _weights_and_adam(layout, keep) -> int:
  """Per-chip bytes of the kept params plus their AdamW ``mu`` and ``nu``."""
  state, shard = layout.abstract, layout.shardings
  return (tree_bytes(state.params, shard.params, keep)
          + tree_bytes(state.opt_state, shard.opt_state,
                       lambda p, l: keep(p, l) and _arrays(p, l)))


def test_zero_sharding_shrinks_dense_state_and_adds_all_gathers(compiled):
  plain, plain_layout = compiled["plain"]
  zero, zero_layout = compiled["zero"]
  assert zero["memory_settings"]["zero_sharding"] and not plain["memory_settings"][
      "zero_sharding"]
  dense_plain = _weights_and_adam(plain_layout, _dense)
  dense_zero = _weights_and_adam(zero_layout, _dense)
  # Embed dimensions shard over data*fsdp*expert = 4 chips: most dense bytes
  # are split four ways (tables without an embed axis are not).
  assert dense_zero < dense_plain / 2
  experts = lambda p, l: not _dense(p, l)  # noqa: E731
  assert _weights_and_adam(zero_layout, experts) == _weights_and_adam(plain_layout, experts)
  # XLA's argument bytes drop by exactly the dense state's drop.
  drop = plain["device_bytes"]["argument"] - zero["device_bytes"]["argument"]
  assert drop == dense_plain - dense_zero
  # The price: the sharded weights are gathered before use.
  gathers, plain_gathers = zero["collectives"]["all-gather"], plain["collectives"]["all-gather"]
  assert gathers["count"] > plain_gathers["count"] and gathers["bytes"] > plain_gathers["bytes"]


def test_the_host_update_keeps_the_optimizer_state_off_the_device(compiled):
  """OPTIMIZER_UPDATE_ON_HOST: the state rests where OFFLOAD_OPTIMIZER_STATE
  puts it, but it no longer crosses the host link (the device update streams
  all of it up and back each step): the host program reads the gradients
  and parameters from HBM and writes the new parameters back, and the
  device temporaries shrink."""
  _, layout = compiled["plain"]
  streamed, _ = compiled["optimizer_state"]
  host, _ = compiled["host_update"]
  opt_bytes = tree_bytes(layout.abstract.opt_state, layout.shardings.opt_state, _arrays)
  param_bytes = tree_bytes(layout.abstract.params, layout.shardings.params)
  assert opt_bytes == 2 * param_bytes   # AdamW: mu and nu
  assert host["host_bytes"]["argument"] == streamed["host_bytes"]["argument"] == opt_bytes
  # The host program writes the new state into the donated host buffers.
  assert host["host_bytes"]["alias"] == opt_bytes
  assert host["device_bytes"]["argument"] == streamed["device_bytes"]["argument"]
  assert streamed["host_offload"]["host_to_device_bytes"] >= opt_bytes
  moved = host["host_offload"]
  # Scalars (step count, norms) add a few bytes.
  assert moved["host_to_device_bytes"] == pytest.approx(param_bytes, abs=256)
  assert moved["device_to_host_bytes"] == pytest.approx(2 * param_bytes, abs=256)
  assert host["device_bytes"]["temp"] < streamed["device_bytes"]["temp"]
  assert host["memory_settings"]["OPTIMIZER_UPDATE_ON_HOST"]


def test_params_and_optimizer_state_on_the_host_with_the_host_update(compiled):
  """All three switches: the whole train state rests in host memory (once:
  the new state is written into the donated buffers), the device keeps no
  parameter or optimizer bytes between steps, the weights come up block by
  block (at least the parameters' bytes) and only the gradients go down (the
  host program already holds the parameters it updates)."""
  plain, layout = compiled["plain"]
  rep, _ = compiled["all_on_host"]
  host_update, _ = compiled["host_update"]
  param_bytes = tree_bytes(layout.abstract.params, layout.shardings.params, _arrays)
  opt_bytes = tree_bytes(layout.abstract.opt_state, layout.shardings.opt_state, _arrays)
  host = rep["host_bytes"]
  assert host["argument"] == host["output"] == host["alias"] == param_bytes + opt_bytes
  assert (_resting(plain["device_bytes"]) - _resting(rep["device_bytes"])
          == param_bytes + opt_bytes)
  moved = rep["host_offload"]
  assert moved["host_to_device_bytes"] >= param_bytes
  assert moved["device_to_host_bytes"] == pytest.approx(param_bytes, rel=0.01)
  assert (host_update["host_offload"]["device_to_host_bytes"]
          - moved["device_to_host_bytes"]) == pytest.approx(param_bytes, rel=0.01)
  assert rep["device_bytes"]["total"] < host_update["device_bytes"]["total"]
