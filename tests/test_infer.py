"""moe-infer: input files, tokenization, sharded decoding equals unsharded."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow as tf

from moe_jax import infer, models, partitioning
from moe_jax.evaluation import inference
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models.config import SparseLayout, T5Config


def test_read_inputs_lines_and_tfrecord(tmp_path):
  lines = tmp_path / "in.txt"
  lines.write_text("first line\nsecond\n", encoding="utf-8")
  assert infer.read_inputs(str(lines)) == ["first line", "second"]
  path = str(tmp_path / "in.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    for text in ("eins", "zwei"):
      ex = tf.train.Example(features=tf.train.Features(feature={
          "inputs": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))}))
      w.write(ex.SerializeToString())
  assert infer.read_inputs(path) == ["eins", "zwei"]
  with pytest.raises(ValueError, match="INFER_TFRECORD_FEATURE"):
    infer.read_inputs(path, feature="text")


class _CharVocab:
  """'a' -> 2 ... 'z' -> 27 (0 pad, 1 EOS); decodes any id."""

  def encode(self, text):
    return [ord(c) - 95 for c in text]

  def decode(self, ids):
    return "".join(chr(i + 95) for i in ids)


def test_encode_batch_truncates_keeping_eos():
  out = infer.encode_batch(["abcdef", "x"], _CharVocab(), length=4, rows=3)
  np.testing.assert_array_equal(out, [[2, 3, 4, 1], [25, 1, 0, 0], [0, 0, 0, 0]])


def test_sharded_decoding_equals_unsharded():
  config = T5Config(vocab_size=40, d_model=16, num_heads=2, d_kv=8, d_ff=16,
                    num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0,
                    moe=MoeConfig(num_experts=8, num_selected_experts=1, d_ff=8,
                                  group_size=64, capacity_factor_eval=8.0),
                    decoder_layout=SparseLayout("every"))
  model = models.build_model(config)
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 40, (8, 5)).astype(np.int32)
  rules = partitioning.standard_logical_rules()
  single = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  with partitioning.with_sharding(single, rules):
    params = jax.jit(lambda: nn.unbox(model.init(
        jax.random.PRNGKey(1), enc, enc, enc, enable_dropout=False)["params"]))()
  spec = inference.DecodeSpec(method="greedy")
  outputs = []
  for mesh in (single, partitioning.make_mesh({"data": 4, "expert": 2})):
    partitioner = partitioning.Partitioner(mesh, rules)
    _, shardings = inference.abstract_params(model, partitioner)
    placed = jax.device_put(jax.device_get(params), shardings)
    predictor = inference.Predictor(model, placed, partitioner, spec)
    outputs.append(predictor.predict(enc, max_decode_length=6))
  assert outputs[0].shape == (8, 6)
  np.testing.assert_array_equal(outputs[0], outputs[1])
  # decode_texts keeps input order across batches and drops padding rows.
  texts = list(infer.decode_texts(predictor, _CharVocab(), ["ab", "cd", "e"], 5, 8, 6))
  assert len(texts) == 3


def test_moe_infer_takes_the_model_from_the_runs_config(tmp_path, capsys):
  """A run directory (config.gin + step 3) and no model gin: the binary decodes."""
  import gin  # pylint: disable=g-import-not-at-top
  import tasks.synthetic  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from moe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints.params_only import save_params_checkpoint  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  gin_utils.parse_gin(["runs/quickstart.gin"], [f"MODEL_DIR = '{run}'"])
  run.mkdir()
  (run / "config.gin").write_text(gin.config_str())
  model = models.build_model(gin_utils.register_configurables()["T5Config"]())
  gin.clear_config()
  ones = np.ones((1, 4), np.int32)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ones, ones, ones,
                                               enable_dropout=False)["params"]))()
  save_params_checkpoint(str(run / "3" / "state"), jax.device_get(params))
  (tmp_path / "in.txt").write_text("xa one\nxa two\n")
  rc = infer.main(["--gin_file=runs/infer.gin", f"--gin.CHECKPOINT_PATH={run / '3'}",
                   "--gin.MIXTURE_OR_TASK_NAME=synthetic_translate_xa_xb",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 4}",
                   f"--gin.INFER_INPUT_FILE={tmp_path / 'in.txt'}",
                   f"--gin.INFER_OUTPUT_FILE={tmp_path / 'out.txt'}",
                   "--gin.INFER_BATCH_SIZE=8"])
  err = capsys.readouterr().err
  assert rc == 0, err
  assert f"moe-infer: model and data settings from {run / 'config.gin'}" in err
  assert len((tmp_path / "out.txt").read_text().splitlines()) == 2
