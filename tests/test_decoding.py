"""Cached decoding equals full recomputation (teacher-forced logits)."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import SparseLayout, T5Config, build_model
from moe_jax.models import decoding

VOCAB = 12
MOE = MoeConfig(num_experts=4, num_selected_experts=2, d_ff=16, group_size=64,
                capacity_factor_train=4.0, capacity_factor_eval=4.0)
BASE = T5Config(vocab_size=VOCAB, d_model=16, num_heads=2, d_kv=8, d_ff=24,
                num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                relative_attention_num_buckets=8, relative_attention_max_distance=16)


def _init(config, *args):
  model = build_model(config)
  variables = jax.jit(lambda k: model.init(k, *args, enable_dropout=False))(
      jax.random.PRNGKey(0))
  return model, nn.unbox(variables["params"])


def _check_follows_argmax_or_force(out, logits, forced=None, allowed_rank=1):
  """Each generated token is within the top ``allowed_rank`` of the full
  (no-cache) logits at its position, until EOS; then only padding."""
  out, logits = np.asarray(out), np.asarray(logits)
  for b in range(out.shape[0]):
    ended = False
    for i in range(out.shape[1]):
      if forced is not None and forced[b, i]:
        assert out[b, i] == forced[b, i]
        continue
      if ended:
        assert out[b, i] == 0
        continue
      ranks = np.argsort(-logits[b, i])[:allowed_rank]
      assert out[b, i] in ranks, (b, i, out[b], ranks)
      ended = out[b, i] == decoding.EOS_ID


def test_encoder_decoder_greedy_with_scanned_moe_equals_full_recompute():
  config = dataclasses.replace(BASE, moe=MOE, scan_layers=True,
                               encoder_layout=SparseLayout("every", every=2),
                               decoder_layout=SparseLayout("every", every=2))
  rng = np.random.RandomState(0)
  enc = rng.randint(2, VOCAB, (3, 7)).astype(np.int32)
  enc[1, 4:] = 0
  length = 6
  dummy = np.ones((3, length), np.int32)
  model, params = _init(config, enc, dummy, dummy)
  out = jax.jit(lambda p: decoding.greedy_decode(
      model, p, encoder_input_tokens=enc, max_decode_length=length))(params)
  dec_in = np.concatenate([np.zeros((3, 1), np.int32), np.asarray(out)[:, :-1]], 1)
  full = jax.jit(lambda p: model.apply({"params": p}, enc, dec_in, np.ones_like(dec_in),
                                       enable_dropout=False))(params)
  _check_follows_argmax_or_force(out, full)


def test_decoder_only_prompts_prefill_and_sampling():
  config = dataclasses.replace(BASE, decoder_only=True)
  length = 7
  dummy = np.ones((2, length), np.int32)
  model, params = _init(config, dummy, dummy)
  prompt = np.array([[5, 6, 7], [8, 9, 0]], np.int32)       # lengths 3 and 2
  forced = np.zeros((2, length), np.int32)
  forced[:, :3] = prompt

  run = jax.jit(lambda p, prefill: decoding.greedy_decode(
      model, p, prompt_tokens=prompt, max_decode_length=length, prefill=prefill),
      static_argnums=1)
  with_prefill, without = run(params, True), run(params, False)
  np.testing.assert_array_equal(with_prefill, without)

  full = jax.jit(lambda p, seq: model.apply(
      {"params": p}, jnp.concatenate([jnp.zeros((2, 1), jnp.int32), seq[:, :-1]], 1),
      jnp.ones_like(seq), enable_dropout=False))
  _check_follows_argmax_or_force(with_prefill, full(params, with_prefill), forced)

  sampled = jax.jit(lambda p, key: decoding.sample_decode(
      model, p, prompt_tokens=prompt, max_decode_length=length, temperature=1.0,
      top_k=2, rng=key))(params, jax.random.PRNGKey(4))
  _check_follows_argmax_or_force(sampled, full(params, sampled), forced, allowed_rank=2)


def test_prefix_lm_decoding_equals_full_recompute():
  config = dataclasses.replace(BASE, decoder_only=True, prefix_lm=True,
                               moe=MOE, decoder_layout=SparseLayout("all"))
  length = 6
  dummy = np.ones((2, length), np.int32)
  model, params = _init(config, dummy, dummy)
  prompt = np.array([[5, 6], [8, 9]], np.int32)
  out = jax.jit(lambda p: decoding.greedy_decode(
      model, p, prompt_tokens=prompt, max_decode_length=length))(params)
  seq = np.asarray(out)
  dec_in = np.concatenate([np.zeros((2, 1), np.int32), seq[:, :-1]], 1)
  causal_attention = np.zeros_like(dec_in)
  causal_attention[:, :3] = 1          # BOS and the 2 prompt tokens
  full = jax.jit(lambda p: model.apply({"params": p}, dec_in, np.ones_like(dec_in),
                                       decoder_causal_attention=causal_attention,
                                       enable_dropout=False))(params)
  forced = np.zeros_like(seq)
  forced[:, :2] = prompt
  _check_follows_argmax_or_force(out, full, forced)


def test_beam_search_finds_brute_force_best():
  vocab, length, alpha = 5, 3, 0.6
  # Scanned layers: the cache's batch axis is 1 when beams are reordered.
  config = dataclasses.replace(BASE, vocab_size=vocab, scan_layers=True)
  enc = np.array([[3, 4, 2, 2]], np.int32)
  dummy = np.ones((1, length), np.int32)
  model, params = _init(config, enc, dummy, dummy)
  tokens, scores = jax.jit(lambda p: decoding.beam_search(
      model, p, encoder_input_tokens=enc, max_decode_length=length,
      beam_size=16, alpha=alpha))(params)

  # Brute force: every output of <= 3 tokens (ending at EOS or at the limit).
  cands = []
  for n in range(1, length + 1):
    for body in itertools.product([t for t in range(vocab) if t != 1], repeat=n - 1):
      cands.append(list(body) + [1] + [0] * (length - n))
  cands += [list(s) for s in itertools.product(
      [t for t in range(vocab) if t != 1], repeat=length)]
  cands = np.array(cands, np.int32)
  dec_in = np.concatenate([np.zeros((len(cands), 1), np.int32), cands[:, :-1]], 1)
  logits = jax.jit(lambda p: model.apply(
      {"params": p}, np.repeat(enc, len(cands), 0), dec_in, np.ones_like(dec_in),
      enable_dropout=False))(params)
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  ref = []
  for c, lp in zip(cands, logp):
    n = int(np.argmax(c == 1)) + 1 if (c == 1).any() else length
    total = sum(lp[i, c[i]] for i in range(n))
    ref.append(total / ((5.0 + n) / 6.0) ** alpha)
  # With 4 non-EOS tokens, 16 beams hold *every* live prefix of length <= 2, so
  # the search is exhaustive and its 16 results are exactly the global top 16.
  order = np.argsort(-np.array(ref))[:16]
  np.testing.assert_allclose(np.asarray(scores)[0], np.array(ref)[order], rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(tokens)[0, :3], cands[order[:3]])
