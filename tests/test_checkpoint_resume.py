"""Resume is exact: 20 steps straight == 10 steps, SIGTERM, resume to 20.

Runs the real training loop (moe_jax.training.loop.train) on a tiny sparse
decoder-only T5 (one MoE layer with 4 experts, dropout on, so the RNG must
resume too) over a 2x4 mesh. The
first leg receives a real SIGTERM while it fetches batch 10; the loop saves
step 10 and stops. The second leg starts from a fresh data iterator in the
same model directory, resumes from step 10 and trains to 20. Losses of steps
11-20 must be bitwise identical to the straight run's, and the examples fed
to those steps the same.
"""

import os
import signal

import jax
import numpy as np
import pytest

from moe_jax import models, partitioning
from moe_jax.checkpoints import preemption
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.training import loop, optimizers, train_state

BATCH, LENGTH, VOCAB = 8, 8, 64


class _Examples:
  """Deterministic batches with JSON ``get_state``/``set_state``.

  Batch ``i`` holds examples ``i*BATCH .. i*BATCH+7``; each example's tokens
  are a hash of its id, so the ids fed to the model can be read back.
  """

  def __init__(self, signal_at_batch=None):
    self.position = 0
    self.seen = []              # example ids, in order
    self.signal_at_batch = signal_at_batch

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])

  def __iter__(self):
    return self

  def __next__(self):
    ids = np.arange(self.position * BATCH, (self.position + 1) * BATCH)
    self.position += 1
    if self.signal_at_batch is not None and self.position == self.signal_at_batch:
      os.kill(os.getpid(), signal.SIGTERM)   # preemption during step 10
    self.seen.extend(int(i) for i in ids)
    tokens = (np.abs(ids[:, None] * 7919 + np.arange(LENGTH)[None, :] * 104729)
              % (VOCAB - 2) + 2).astype(np.int32)
    return {"decoder_input_tokens": np.concatenate(
                [np.zeros((BATCH, 1), np.int32), tokens[:, :-1]], axis=1),
            "decoder_target_tokens": tokens,
            "decoder_loss_weights": np.ones((BATCH, LENGTH), np.int32)}


# The aux-loss-free variant: its selection bias (a non-trainable parameter
# moved by a rule each step) must resume exactly too.
MOE_VARIANTS = {"plain": {}, "aux_free_bias": dict(expert_bias_update_rate=0.01,
                                                   score_function="sigmoid")}


def _setup(variant="plain"):
  cfg = models.T5Config(
      vocab_size=VOCAB, d_model=16, num_heads=2, d_kv=8, d_ff=32,
      num_encoder_layers=0, num_decoder_layers=1, dropout_rate=0.1,
      decoder_only=True,
      moe=MoeConfig(num_experts=4, num_selected_experts=2, d_ff=16, group_size=16,
                    min_expert_capacity=2, **MOE_VARIANTS[variant]),
      decoder_layout=models.SparseLayout(kind="all"))
  model = models.build_model(cfg)
  tx = optimizers.make_optimizer(
      "adamw", schedule=optimizers.make_schedule("constant", 1e-2, warmup_steps=0))
  partitioner = partitioning.Partitioner.create({"data": 2, "expert": 4})
  shapes = train_state.dummy_batch(BATCH, {"targets": LENGTH})
  return train_state.StateLayout.create(model, tx, partitioner, shapes)



def _run(model_dir, data, variant="plain"):
  cfg = loop.LoopConfig(train_steps=20, log_period=1000, checkpoint_period=4,
                        keep_checkpoints=2, seed=3)
  return loop.train(_setup(variant), data, cfg, model_dir=model_dir,
                    log_fn=lambda _: None)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("variant", sorted(MOE_VARIANTS))
def test_resume_after_sigterm_matches_straight_run(tmp_path, compilation_cache, variant):  # pylint: disable=redefined-outer-name,unused-argument
  _run_ = lambda d, data: _run(d, data, variant)  # noqa: E731
  straight_data = _Examples()
  straight = _run_(str(tmp_path / "straight"), straight_data)
  assert len(straight.losses) == 20 and not straight.stopped_early

  resumed_dir = str(tmp_path / "resumed")
  first_data = _Examples(signal_at_batch=10)
  # The loop installs its own handler over this one; this one only keeps a
  # loop that forgot to from letting SIGTERM kill the whole test session.
  with preemption.PreemptionHandler() as fallback:
    first = _run_(resumed_dir, first_data)
  assert fallback.signal_count == 0, "the training loop did not catch SIGTERM"
  assert first.stopped_early and len(first.losses) == 10
  assert sorted(int(d) for d in os.listdir(resumed_dir) if d.isdigit()) == [8, 10]
  np.testing.assert_array_equal(first.losses, straight.losses[:10])

  second_data = _Examples()      # fresh iterator: the checkpoint moves it to batch 10
  second = _run_(resumed_dir, second_data)
  assert not second.stopped_early and len(second.losses) == 10
  # Bitwise-identical losses for steps 11-20, and the same examples.
  np.testing.assert_array_equal(np.asarray(second.losses), np.asarray(straight.losses[10:]))
  assert second_data.seen == straight_data.seen[10 * BATCH:]
  assert first_data.seen + second_data.seen == straight_data.seen
  # The final states agree too.
  assert int(second.state.step) == int(straight.state.step) == 20
  for a, b in zip(jax.tree_util.tree_leaves(second.state.params),
                  jax.tree_util.tree_leaves(straight.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if variant == "aux_free_bias":  # the bias moved, and resumed where it was
    bias = np.asarray(straight.state.params["decoder"]["layers"]["layers_0"]["moe"][
        "expert_bias"])
    assert np.abs(bias).max() > 0
