"""Our T5 v1.1 matches Hugging Face transformers' T5 on the same weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moe_jax.checkpoints  # noqa: E402
import moe_jax.models  # noqa: E402

VOCAB, D_MODEL = 64, 16


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  cfg = transformers.T5Config(
      vocab_size=VOCAB, d_model=D_MODEL, d_kv=8, d_ff=24, num_layers=2,
      num_decoder_layers=3, num_heads=2, relative_attention_num_buckets=8,
      relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
      pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  # transformers 5 always ties lm_head to the embedding; give it its own
  # weights so the untied (T5 v1.1) path is really exercised.
  model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, D_MODEL))
  model.config.tie_word_embeddings = False
  path = str(tmp_path_factory.mktemp("hf_t5"))
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def _inputs():
  rng = np.random.RandomState(0)
  enc = rng.randint(2, VOCAB, (3, 30)).astype(np.int32)
  enc[1, 20:] = 0
  enc[2, 7:] = 0
  tgt = rng.randint(2, VOCAB, (3, 25)).astype(np.int32)
  tgt[0, 18:] = 0
  tgt[2, 3:] = 0
  dec = np.concatenate([np.zeros((3, 1), np.int32), tgt[:, :-1]], axis=1)
  return enc, dec, tgt


def test_logits_match_hf_including_padding(hf_dir):
  path, hf_model = hf_dir
  params, config = moe_jax.checkpoints.load_dense_t5(path, format="hf")
  assert config.activations == ("gelu", "linear") and not config.logits_via_embedding
  assert (config.num_encoder_layers, config.num_decoder_layers) == (2, 3)
  model = moe_jax.models.build_model(config)
  enc, dec, tgt = _inputs()
  ours = jax.jit(lambda p: model.apply({"params": p}, enc, dec, tgt,
                                       enable_dropout=False))(params)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(enc, dtype=torch.long),
                   attention_mask=torch.tensor(enc > 0),
                   decoder_input_ids=torch.tensor(dec, dtype=torch.long),
                   decoder_attention_mask=torch.tensor(tgt > 0)).logits.numpy()
  assert ours.shape == ref.shape and ours.dtype == jnp.float32
  # Every position, padded ones included (both mask padding on the key side).
  assert np.abs(np.asarray(ours) - ref).max() < 1e-4


def test_loaded_params_have_the_model_structure(hf_dir):
  path, _ = hf_dir
  params, config = moe_jax.checkpoints.load_dense_t5(path)
  model = moe_jax.models.build_model(config)
  tokens = jnp.ones((1, 4), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens,
                                               tokens, enable_dropout=False))
  expected = jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(abstract["params"]))
  got = jax.tree_util.tree_map(lambda x: x.shape, params)
  assert got == expected


def test_format_errors(tmp_path):
  with pytest.raises(ValueError, match="Unknown checkpoint format"):
    moe_jax.checkpoints.load_dense_t5(str(tmp_path), format="pickle")
  with pytest.raises(FileNotFoundError, match="save_pretrained"):
    moe_jax.checkpoints.load_dense_t5(str(tmp_path), format="hf")


def test_original_t5_config_is_tied_and_scaled():
  """A config without scale_decoder_outputs falls back to tie_word_embeddings."""
  from moe_jax.checkpoints.hf import config_from_hf
  base = {"vocab_size": 8, "d_model": 4, "num_heads": 1, "d_kv": 4, "d_ff": 8,
          "num_layers": 1, "feed_forward_proj": "relu"}
  tied = config_from_hf(dict(base))
  assert tied.logits_via_embedding and tied.activations == ("relu",)
  v11 = config_from_hf(dict(base, tie_word_embeddings=False,
                            feed_forward_proj="gated-gelu"))
  assert not v11.logits_via_embedding
  with pytest.raises(ValueError, match="feed_forward_proj"):
    config_from_hf(dict(base, feed_forward_proj="gated-banana"))
