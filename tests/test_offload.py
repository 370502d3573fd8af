"""Host offload changes where the train state lives, never the numbers.

On the 8 CPU devices (memory kinds ``device`` and ``pinned_host``: the
program is the real offloaded one, no memory is saved) a tiny decoder-only
Switch model (a dense and an MoE layer scanned as one block, dropout on,
FSDP x expert mesh) trains a few steps with each switch -- optimizer state
(Adafactor), parameters (AdamW), and everything together (both plus the
``"offload"`` remat policy) -- and must give the non-offloaded run's losses
and parameters bit for bit: the offloaded step runs the same operations on
device copies of the same values. The exception is the remat policy: the
backward pass recomputes the forward inside itself, where XLA fuses (and so
rounds) some float32 sums differently, so parameters after the ``"offload"``
policy agree to 1e-6 (losses still agree exactly here). A run stopped by
SIGTERM and resumed, alternating offload on and off, matches the straight
run. The compiled memory itself is checked on TPU compile-only devices
(``test_offload_tpu.py``).
"""

import os
import signal

import jax
import numpy as np
import pytest

from moe_jax import models, partitioning
from moe_jax.checkpoints import preemption
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import host_offload
from moe_jax.training import experiment, loop, offload, optimizers, train_state, train_step

BATCH, LENGTH, VOCAB, STEPS = 8, 8, 64, 3
MESH = {"fsdp": 2, "expert": 4}
EVERYTHING = offload.OffloadConfig(optimizer_state=True, params=True)


def _model(remat: str = "none"):
  return models.build_model(models.T5Config(
      vocab_size=VOCAB, d_model=16, num_heads=2, d_kv=8, d_ff=32,
      num_encoder_layers=0, num_decoder_layers=2, dropout_rate=0.1, decoder_only=True,
      moe=MoeConfig(num_experts=4, num_selected_experts=2, d_ff=16, group_size=16,
                    min_expert_capacity=2),
      decoder_layout=models.SparseLayout(kind="every", every=2), scan_layers=True,
      remat_policy=remat))


def _layout(config=offload.OffloadConfig(), remat="none", opt="adamw"):
  tx = optimizers.make_optimizer(
      opt, schedule=optimizers.make_schedule("constant", 1e-2, warmup_steps=0))
  shapes = train_state.dummy_batch(BATCH, {"targets": LENGTH})
  return train_state.StateLayout.create(_model(remat), tx,
                                        partitioning.Partitioner.create(MESH), shapes,
                                        offload=config)


def _batch(i):
  rng = np.random.default_rng(i)
  b = {k: rng.integers(2, VOCAB, (BATCH, LENGTH)).astype(np.int32)
       for k in ("decoder_input_tokens", "decoder_target_tokens")}
  b["decoder_loss_weights"] = np.ones((BATCH, LENGTH), np.int32)
  return b


def _memory_kinds(tree):
  return {a.sharding.memory_kind for a in jax.tree_util.tree_leaves(tree)}


def _train(layout):
  """Losses of STEPS steps and the final state (checked: still where it rests)."""
  state = layout.init(seed=1)
  step = train_step.jitted_train_step(layout, train_step.LossConfig())
  losses = []
  with layout.partitioner.activate():
    for i in range(STEPS):
      state, m = step(state, layout.partitioner.global_batch(_batch(i)))
      losses.append(float(m["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def reference():
  """Non-offloaded losses and final params per optimizer (remat off)."""
  return {opt: _train(_layout(opt=opt)) for opt in ("adamw", "adafactor")}


@pytest.mark.parametrize("opt, config, remat", [
    ("adafactor", offload.OffloadConfig(optimizer_state=True), "none"),
    ("adamw", offload.OffloadConfig(params=True), "none"),
    ("adamw", EVERYTHING, "offload"),
    ("adamw", offload.OffloadConfig(optimizer_state=True, update_on_host=True), "none"),
    ("adamw", offload.OffloadConfig(optimizer_state=True, params=True,
                                    update_on_host=True), "none"),
], ids=["optimizer_state-adafactor", "params-adamw", "everything-adamw",
        "host_update-adamw", "host_update_params-adamw"])
def test_offloaded_training_equals_non_offloaded(reference, opt, config, remat):
  layout = _layout(config, remat, opt)
  losses, state = _train(layout)
  want_losses, want_state = reference[opt]
  exact = remat == "none"   # the same operations on the same values
  if exact:
    assert losses == want_losses
  else:  # recomputed forward: XLA may fuse float32 sums differently
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(state.params),
                  jax.tree_util.tree_leaves(want_state.params)):
    if exact:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  # Between steps the trees rest where the switches say.
  assert _memory_kinds(state.params) == ({"pinned_host"} if config.params else {"device"})
  if config.optimizer_state:
    arrays = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim]
    scalars = [x for x in jax.tree_util.tree_leaves(state.opt_state) if not x.ndim]
    assert _memory_kinds(arrays) == {"pinned_host"}
    assert _memory_kinds(scalars) <= {"device"}   # step counts stay on device


def test_a_host_update_needs_the_optimizer_state_on_the_host():
  with pytest.raises(ValueError, match="set OFFLOAD_OPTIMIZER_STATE=True too"):
    offload.OffloadConfig(update_on_host=True)


def test_an_optimizer_that_cannot_update_on_the_host_is_named_with_the_fix():
  layout = _layout(offload.OffloadConfig(optimizer_state=True, update_on_host=True),
                   opt="adafactor")
  step = train_step.jitted_train_step(layout, train_step.LossConfig())
  with layout.partitioner.activate(), pytest.raises(
      ValueError, match="make_optimizer.name=.*adamw.*OPTIMIZER_UPDATE_ON_HOST=False"):
    step.lower(layout.init(seed=1), layout.partitioner.global_batch(_batch(0)))


def test_the_host_update_is_a_host_computation_in_the_program():
  """The update ops carry XLA's host compute type; the device update has none
  (what that saves in HBM is measured on TPU: tests/test_offload_tpu.py)."""
  hlo = {}
  for on_host in (True, False):
    layout = _layout(offload.OffloadConfig(optimizer_state=True, update_on_host=on_host))
    step = train_step.jitted_train_step(layout, train_step.LossConfig())
    with layout.partitioner.activate():
      hlo[on_host] = step.lower(layout.init(seed=1),
                                layout.partitioner.global_batch(_batch(0))).as_text()
  assert hlo[True].count('_xla_compute_type = "host"') > 0
  assert hlo[False].count('_xla_compute_type = "host"') == 0


def test_layers_fetch_their_own_params_and_the_rest_moves_up_front():
  layout = _layout(EVERYTHING)
  names = [tuple(str(k.key) for k in path) for path, _ in
           jax.tree_util.tree_flatten_with_path(layout.abstract.params)[0]]
  streamed = {n for n in names if host_offload.is_streamed(n)}
  assert all("layers" in n for n in streamed)
  experts = [n for n in names if "experts" in n]
  assert experts and set(experts) <= streamed   # the bulk moves per scanned block
  assert {n for n in names if n not in streamed} == {
      ("token_embedder", "embedding"), ("decoder", "relpos_bias", "rel_embedding"),
      ("decoder", "decoder_norm", "scale"), ("decoder", "logits_dense", "kernel")}


class _Examples:
  """Batch i is _batch(i); JSON position; SIGTERM while fetching batch ``signal_at``."""

  def __init__(self, signal_at=None):
    self.position, self.signal_at = 0, signal_at

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])

  def __iter__(self):
    return self

  def __next__(self):
    self.position += 1
    if self.position == self.signal_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return _batch(self.position - 1)



def _run(layout, model_dir, data, steps=6):
  cfg = loop.LoopConfig(train_steps=steps, log_period=1000, checkpoint_period=2,
                        keep_checkpoints=2, seed=1)
  with preemption.PreemptionHandler() as fallback:
    result = loop.train(layout, data, cfg, model_dir=model_dir, log_fn=lambda _: None)
  assert fallback.signal_count == 0, "the training loop did not catch SIGTERM"
  return result


@pytest.mark.slow  # end-to-end; pytest -m slow
@pytest.mark.filterwarnings("ignore")
def test_sigterm_and_resume_with_offload_switched_on_and_off(tmp_path, compilation_cache):  # pylint: disable=redefined-outer-name,unused-argument
  """Offloaded to step 2 (SIGTERM), resumed without offload to step 4
  (SIGTERM), resumed with offload to 6: the straight non-offloaded run's losses."""
  plain, offloaded = _layout(), _layout(EVERYTHING)
  straight = _run(plain, str(tmp_path / "straight"), _Examples())
  model_dir = str(tmp_path / "legs")
  first = _run(offloaded, model_dir, _Examples(signal_at=3))
  second = _run(plain, model_dir, _Examples(signal_at=5))
  third = _run(offloaded, model_dir, _Examples())
  assert first.stopped_early and second.stopped_early and not third.stopped_early
  assert first.losses + second.losses + third.losses == straight.losses
  assert _memory_kinds(third.state.params) == {"pinned_host"}
  for a, b in zip(jax.tree_util.tree_leaves(third.state.opt_state),
                  jax.tree_util.tree_leaves(straight.state.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _DeviceWithoutHost:
  platform = "fake"

  def addressable_memories(self):
    class _Memory:
      kind = "device"
    return [_Memory()]


@pytest.mark.parametrize("config, remat, switch", [
    (offload.OffloadConfig(optimizer_state=True), "none", "OFFLOAD_OPTIMIZER_STATE"),
    (offload.OffloadConfig(params=True), "none", "OFFLOAD_PARAMS"),
    (offload.OffloadConfig(), "offload", "remat_policy"),
])
def test_a_backend_without_host_memory_is_refused_naming_the_switch(config, remat, switch):
  with pytest.raises(ValueError, match=switch) as e:
    offload.check_supported(config, [_DeviceWithoutHost()], remat)
  message = str(e.value)
  assert "pinned_host" in message and ("=False" in message or "'none'" in message)
  offload.check_supported(offload.OffloadConfig(), [_DeviceWithoutHost()], "none")


def test_zero_sharding_rules_shard_dense_weights_over_every_batch_axis():
  zero = partitioning.standard_logical_rules(zero_sharding=True)
  plain = partitioning.standard_logical_rules()
  batch_axes = partitioning.BATCH_MESH_AXES
  spec = lambda axes, rules: partitioning.logical_to_spec(axes, rules)  # noqa: E731
  assert spec(("embed", "mlp"), zero) == jax.sharding.PartitionSpec(batch_axes, "model")
  assert spec(("embed", "mlp"), plain) == jax.sharding.PartitionSpec("fsdp", "model")
  # Expert weights: experts on 'expert', embed on 'fsdp' -- with and without ZeRO.
  for rules in (zero, plain):
    assert spec(("expert", "embed", "mlp"), rules) == jax.sharding.PartitionSpec(
        "expert", "fsdp", "model")
    # Activations keep their batch sharding.
    assert spec(("batch", "length", "embed"), rules) == jax.sharding.PartitionSpec(
        batch_axes, None, None)
  assert partitioning.Partitioner.create(MESH, zero_sharding=True).zero_sharding
  assert not partitioning.Partitioner.create(MESH).zero_sharding


def test_zero_sharding_needs_d_model_divisible_by_the_batch_shards():
  cfg = models.T5Config(vocab_size=VOCAB, d_model=12, num_heads=2, d_kv=8, d_ff=32,
                        num_encoder_layers=1, num_decoder_layers=1)
  with pytest.raises(experiment.ConfigError, match="zero_sharding=False"):
    experiment.build_experiment(cfg, "unused", {"inputs": 8, "targets": 8}, 8, 1,
                                mesh_shape={"data": 8}, zero_sharding=True)


def test_start_up_line_names_the_switches(monkeypatch):
  cfg = models.T5Config(vocab_size=VOCAB, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                        num_encoder_layers=1, num_decoder_layers=1)
  exp = experiment.build_experiment(
      cfg, "unused", {"inputs": 8, "targets": 8}, 8, 1, mesh_shape={"data": 8},
      offload_optimizer_state=True, measure_peak_flops=False, tensorboard=False)
  monkeypatch.setattr(experiment.train_iterator, "get_train_iterator",
                      lambda *a, **k: iter(()))
  monkeypatch.setattr(experiment.loop, "train", lambda *a, **k: None)
  lines = []
  exp.run(log_fn=lines.append)
  assert ("OFFLOAD_OPTIMIZER_STATE=True OFFLOAD_PARAMS=False OPTIMIZER_UPDATE_ON_HOST=False "
          "remat_policy=none zero_sharding=False") in lines[0]
  assert exp.layout.offload == offload.OffloadConfig(optimizer_state=True)
