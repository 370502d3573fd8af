"""Upcycling a Hugging Face T5 (gated-gelu): the MoE model reproduces transformers' logits."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax import gin_utils, models, partitioning, upcycle  # noqa: E402
from moe_jax.checkpoints import restore, upcycling  # noqa: E402

VOCAB, D_MODEL = 64, 16


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  cfg = transformers.T5Config(
      vocab_size=VOCAB, d_model=D_MODEL, d_kv=8, d_ff=32, num_layers=2,
      num_decoder_layers=2, num_heads=2, relative_attention_num_buckets=8,
      relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
      pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, D_MODEL))
  model.config.tie_word_embeddings = False
  path = str(tmp_path_factory.mktemp("hf_t5"))
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def test_hf_upcycle_verify_and_transformers_logits(hf_dir, tmp_path, capsys):
  path, hf_model = hf_dir
  out = str(tmp_path / "moe")
  code = upcycle.main(["--dense_checkpoint", path, "--gin_file", "runs/sparse_upcycle.gin",
                       "--output", out, "--verify", "--gin.NUM_EXPERTS=4",
                       "--gin.MoeConfig.group_size=64",
                       "--gin.MoeConfig.capacity_factor_eval=4.0"])
  printed = capsys.readouterr()
  assert code == 0, printed.err
  assert "verify PASS" in printed.out
  info = json.load(open(os.path.join(out, "upcycle.json")))
  assert info["format"] == "hf" and info["step"] == 0 and info["verify"]["passed"]

  gin_utils.parse_gin(["runs/sparse_upcycle.gin", os.path.join(out, "upcycled_model.gin")],
                      [], finalize=False)
  cfg = gin_utils.register_configurables()["T5Config"]()
  assert cfg.relative_attention_max_distance == 20 and cfg.moe.num_experts == 4
  partitioner = partitioning.Partitioner.create({"data": 2, "expert": 4})
  abstract, sh = upcycling.abstract_params(cfg, partitioner)
  params = restore.restore_params(out, abstract, sh)

  rng = np.random.RandomState(0)
  enc = rng.randint(2, VOCAB, (8, 12)).astype(np.int32)  # 8 rows: one per batch shard
  enc[1, 7:] = 0
  enc[5, 3:] = 0
  tgt = rng.randint(2, VOCAB, (8, 10)).astype(np.int32)
  dec = np.concatenate([np.zeros((8, 1), np.int32), tgt[:, :-1]], axis=1)
  model = models.build_model(cfg)
  with partitioner.activate():
    ours = np.asarray(jax.jit(lambda p: model.apply(
        {"params": p}, enc, dec, tgt, enable_dropout=False))(params))
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(enc, dtype=torch.long),
                   attention_mask=torch.tensor(enc > 0),
                   decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
