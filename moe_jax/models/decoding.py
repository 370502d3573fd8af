"""Autoregressive decoding with a KV cache: greedy, temperature/top-k sampling,
beam search with a length penalty. Works for ``EncoderDecoderModel`` and
``DecoderOnlyModel``.

Conventions (T5X): decoder inputs start with token 0 (BOS); token 1 is EOS;
0 is padding in the outputs after EOS. A decoder-only prompt is the first
tokens of the target, ``<int>[batch, prompt_length]`` right-padded with 0;
prompt tokens are forced, generation continues after each example's prompt.

Prefill: the cache is filled for the positions every example knows (BOS plus
the shortest prompt) in one parallel pass, then one token per step. Both
paths give the same tokens as decoding without prefill. MoE layers run with
``deterministic=True``, i.e. their eval capacity factor.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

EOS_ID = 1
NEG_INF = -1e7


@dataclasses.dataclass(frozen=True)
class _Stepper:
  """``step(tokens <int>[b, n], cache, prefix) -> (logits <f32>[b, n, V], cache)``."""
  step: Callable[..., tuple[jax.Array, Any]]
  init_cache: Callable[[], Any]
  batch_axis: int  # axis of the batch in the cache arrays (1 under nn.scan)


def _stepper(model, params, max_len: int, batch: int,
             encoder_input_tokens: Optional[jax.Array], repeat: int = 1,
             encoder_route_ids: Optional[jax.Array] = None,
             decoder_route_ids: Optional[jax.Array] = None) -> _Stepper:
  cfg = model.config
  variables = {"params": params}
  # Task-level routing: one decoder route id per example, <int>[b] -> per beam,
  # broadcast over each step's tokens.
  dec_ids = (None if decoder_route_ids is None else
             jnp.repeat(jnp.asarray(decoder_route_ids, jnp.int32), repeat, axis=0))
  route = lambda tokens: (None if dec_ids is None  # noqa: E731
                          else jnp.broadcast_to(dec_ids[:, None], tokens.shape))
  if encoder_input_tokens is not None:
    if cfg.decoder_only:
      raise ValueError("encoder_input_tokens given to a decoder-only model; pass "
                       "prompt_tokens instead.")
    enc = jnp.asarray(encoder_input_tokens, jnp.int32)
    encoded = model.apply(variables, enc, encoder_route_ids=encoder_route_ids,
                          enable_dropout=False, method=model.encode)
    enc = jnp.repeat(enc, repeat, axis=0)
    encoded = jnp.repeat(encoded, repeat, axis=0)

    def call(cache, tokens, prefix):
      del prefix
      v = dict(variables, cache=cache) if cache is not None else variables
      return model.apply(v, encoded, enc, tokens, decoder_route_ids=route(tokens),
                         enable_dropout=False, decode=True,
                         max_decode_length=max_len, method=model.decode,
                         mutable=["cache"])
  else:
    if not cfg.decoder_only:
      raise ValueError("An encoder-decoder model needs encoder_input_tokens.")

    def call(cache, tokens, prefix):
      v = dict(variables, cache=cache) if cache is not None else variables
      return model.apply(v, tokens, None, decoder_causal_attention=prefix,
                         decoder_route_ids=route(tokens),
                         enable_dropout=False, decode=True, max_decode_length=max_len,
                         mutable=["cache"])

  def init_cache():
    dummy = jnp.zeros((batch * repeat, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: call(None, dummy, None)[1]["cache"])
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def step(tokens, cache, prefix=None):
    logits, mutated = call(cache, tokens, prefix)
    return logits, mutated["cache"]

  return _Stepper(step, init_cache, 1 if cfg.scan_layers else 0)


def _prompt_buffer(prompt_tokens, batch: int, max_len: int):
  """``seq <int>[b, max_len + 1]`` (BOS then prompt), forced ``<bool>[b, max_len + 1]``,
  and the number of positions known for every example (static)."""
  seq = np.zeros((batch, max_len + 1), np.int32)
  forced = np.zeros((batch, max_len + 1), bool)
  forced[:, 0] = True
  common = 1
  if prompt_tokens is not None:
    prompt = np.asarray(prompt_tokens, np.int32)
    if prompt.shape[1] >= max_len:
      raise ValueError(f"prompt length {prompt.shape[1]} leaves no room to generate "
                       f"in max_decode_length={max_len}; raise max_decode_length.")
    lengths = (prompt > 0).sum(axis=1)
    for b, n in enumerate(lengths):
      if not (prompt[b, :n] > 0).all():
        raise ValueError("prompt_tokens must be right-padded with 0 (no 0 inside).")
      seq[b, 1:n + 1] = prompt[b, :n]
      forced[b, 1:n + 1] = True
    common = 1 + int(lengths.min())
  return jnp.asarray(seq), jnp.asarray(forced), common


def _prefix_mask(model, batch, length):
  """Prefix LM: the prefilled positions (BOS + prompt) attend bidirectionally."""
  if not model.config.prefix_lm:
    return None
  return jnp.ones((batch, length), jnp.int32)


def _check_prefix_prompts(model, prompt_tokens, prefill):
  if model.config.prefix_lm and prompt_tokens is not None:
    lengths = (np.asarray(prompt_tokens) > 0).sum(axis=1)
    if len(set(lengths.tolist())) > 1 or not prefill:
      raise ValueError("Prefix-LM decoding needs prefill=True and prompts of equal "
                       "length (the prompt is attended bidirectionally in one pass); "
                       "group prompts by length.")


def sample_decode(model, params, *, max_decode_length: int,
                  encoder_input_tokens: Optional[jax.Array] = None,
                  prompt_tokens: Optional[jax.Array] = None,
                  temperature: float = 1.0, top_k: int = 0,
                  rng: Optional[jax.Array] = None, prefill: bool = True,
                  eos_id: int = EOS_ID,
                  encoder_route_ids: Optional[jax.Array] = None,
                  decoder_route_ids: Optional[jax.Array] = None) -> jax.Array:
  """Temperature / top-k sampling (``temperature=0``: greedy).

  Args:
    model, params: an ``EncoderDecoderModel`` or ``DecoderOnlyModel`` and its params.
    max_decode_length: output length ``L`` (including any prompt).
    encoder_input_tokens: ``<int>[b, s]`` (encoder-decoder).
    prompt_tokens: ``<int>[b, p]`` forced first target tokens (decoder-only).
    top_k: sample among the ``k`` most likely tokens (0: all).
    rng: PRNG key (required if ``temperature > 0``).
    encoder_route_ids: ``<int>[b, s]`` and decoder_route_ids: ``<int>[b]`` (one
      id per example): task-level MoE routing (``routing_level="task"``).

  Returns:
    ``<int32>[b, L]``: prompt + generated tokens, 0 after EOS.
  """
  if encoder_input_tokens is not None:
    batch = encoder_input_tokens.shape[0]
  elif prompt_tokens is not None:
    batch = prompt_tokens.shape[0]
  else:
    raise ValueError("Give encoder_input_tokens or prompt_tokens (their batch size "
                     "sets the decode batch).")
  if temperature > 0 and rng is None:
    raise ValueError("temperature > 0 needs rng=jax.random.PRNGKey(...).")
  _check_prefix_prompts(model, prompt_tokens, prefill)
  max_len = max_decode_length
  stepper = _stepper(model, params, max_len, batch, encoder_input_tokens,
                     encoder_route_ids=encoder_route_ids,
                     decoder_route_ids=decoder_route_ids)
  seq, forced, common = _prompt_buffer(prompt_tokens, batch, max_len)
  cache = stepper.init_cache()
  rng = jax.random.PRNGKey(0) if rng is None else rng

  def choose(logits, key):
    logits = logits.astype(jnp.float32)
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
      kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
      logits = jnp.where(logits < kth, NEG_INF, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)

  def write(seq, done, i, logits, key):
    """Puts the token for position ``i + 1`` (from logits at ``i``)."""
    token = choose(logits, key)
    forced_next = forced[:, i + 1]
    token = jnp.where(forced_next, seq[:, i + 1], jnp.where(done, 0, token))
    done = done | ((token == eos_id) & ~forced_next)
    return seq.at[:, i + 1].set(token), done

  done = jnp.zeros((batch,), bool)
  start = 0
  if prefill and common > 1:
    prefix = _prefix_mask(model, batch, common)
    logits, cache = stepper.step(seq[:, :common], cache, prefix)
    rng, key = jax.random.split(rng)
    seq, done = write(seq, done, common - 1, logits[:, -1], key)
    start = common

  def body(state):
    i, seq, done, cache, rng = state
    token = jax.lax.dynamic_slice_in_dim(seq, i, 1, axis=1)
    logits, cache = stepper.step(token, cache)
    rng, key = jax.random.split(rng)
    seq, done = write(seq, done, i, logits[:, 0], key)
    return i + 1, seq, done, cache, rng

  def cond(state):
    i, _, done, _, _ = state
    return (i < max_len) & ~jnp.all(done & ~forced[:, jnp.minimum(i + 1, max_len)])

  state = (jnp.asarray(start, jnp.int32), seq, done, cache, rng)
  _, seq, _, _, _ = jax.lax.while_loop(cond, body, state)
  return seq[:, 1:]


greedy_decode = functools.partial(sample_decode, temperature=0.0)
greedy_decode.__doc__ = "Greedy decoding: ``sample_decode`` with ``temperature=0``."


def brevity_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT length penalty ``((5 + length) / 6) ** alpha`` (T5X's beam search)."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _gather_beams(tree, beam_index, batch, beams, batch_axis):
  """Reorders beams: ``beam_index <int>[b, k]`` picks, per example, source beams."""
  flat_index = (jnp.arange(batch)[:, None] * beams + beam_index).reshape(-1)

  def gather(x):
    if x.ndim <= batch_axis or x.shape[batch_axis] != batch * beams:
      return x
    return jnp.take(x, flat_index, axis=batch_axis)

  return jax.tree_util.tree_map(gather, tree)


def beam_search(model, params, *, max_decode_length: int, beam_size: int = 4,
                alpha: float = 0.6, encoder_input_tokens: Optional[jax.Array] = None,
                prompt_tokens: Optional[jax.Array] = None, eos_id: int = EOS_ID,
                encoder_route_ids: Optional[jax.Array] = None,
                decoder_route_ids: Optional[jax.Array] = None,
                ) -> tuple[jax.Array, jax.Array]:
  """Beam search; a finished hypothesis scores ``log p / brevity_penalty(len)``.

  Hypotheses still alive after ``max_decode_length`` tokens compete with the
  finished ones under the same penalty. Decoder-only prompts must all have the
  same length (they are prefilled and forced). Route ids as in
  :func:`sample_decode` (the decoder's are repeated for every beam).

  Returns:
    ``(tokens <int32>[b, beam_size, L], scores <float32>[b, beam_size])``, best first.
  """
  if encoder_input_tokens is not None:
    batch = encoder_input_tokens.shape[0]
  elif prompt_tokens is not None:
    batch = prompt_tokens.shape[0]
  else:
    raise ValueError("Give encoder_input_tokens or prompt_tokens.")
  max_len, k = max_decode_length, beam_size
  seq0, _, common = _prompt_buffer(prompt_tokens, batch, max_len)
  if prompt_tokens is not None:
    lengths = (np.asarray(prompt_tokens) > 0).sum(axis=1)
    if len(set(lengths.tolist())) > 1:
      raise ValueError("beam_search needs decoder-only prompts of equal length.")
  stepper = _stepper(model, params, max_len, batch, encoder_input_tokens, repeat=k,
                     encoder_route_ids=encoder_route_ids,
                     decoder_route_ids=decoder_route_ids)
  cache = stepper.init_cache()
  seqs = jnp.repeat(seq0[:, None], k, axis=1)                  # [b, k, L+1]
  if common > 1:
    prefix = _prefix_mask(model, batch * k, common)
    logits, cache = stepper.step(seqs.reshape(batch * k, -1)[:, :common], cache, prefix)
    last = logits[:, -1]
  else:
    last = None
  live_logp = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  fin_seqs = jnp.zeros_like(seqs)
  fin_scores = jnp.full((batch, k), NEG_INF, jnp.float32)
  start = common - 1

  def expand(i, seqs, live_logp, fin_seqs, fin_scores, cache, logits):
    vocab = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
    cand = (live_logp[:, :, None] + logp).reshape(batch, k * vocab)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * k)
    beam, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(seqs, beam[:, :, None], axis=1)
    cand_seqs = cand_seqs.at[:, :, i + 1].set(token)
    is_eos = token == eos_id
    # Finished candidates: this step emitted EOS (length i + 1 - prompt).
    gen_len = jnp.asarray(i + 2 - common, jnp.float32)
    new_fin = jnp.where(is_eos, top_logp / brevity_penalty(gen_len, alpha), NEG_INF)
    all_scores = jnp.concatenate([fin_scores, new_fin], axis=1)
    all_seqs = jnp.concatenate([fin_seqs, cand_seqs], axis=1)
    fin_scores, idx = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(all_seqs, idx[:, :, None], axis=1)
    # Live candidates: the best k that did not end.
    live_cand = jnp.where(is_eos, NEG_INF, top_logp)
    live_logp, idx = jax.lax.top_k(live_cand, k)
    seqs = jnp.take_along_axis(cand_seqs, idx[:, :, None], axis=1)
    src_beam = jnp.take_along_axis(beam, idx, axis=1)
    cache = _gather_beams(cache, src_beam, batch, k, stepper.batch_axis)
    return seqs, live_logp, fin_seqs, fin_scores, cache

  if last is not None:
    seqs, live_logp, fin_seqs, fin_scores, cache = expand(
        start, seqs, live_logp, fin_seqs, fin_scores, cache, last)
    start += 1

  def body(i, state):
    seqs, live_logp, fin_seqs, fin_scores, cache = state
    tokens = jax.lax.dynamic_slice_in_dim(seqs.reshape(batch * k, -1), i, 1, axis=1)
    logits, cache = stepper.step(tokens, cache)
    return expand(i, seqs, live_logp, fin_seqs, fin_scores, cache, logits[:, 0])

  seqs, live_logp, fin_seqs, fin_scores, cache = jax.lax.fori_loop(
      start, max_len, body, (seqs, live_logp, fin_seqs, fin_scores, cache))
  # Unfinished hypotheses compete at full length.
  live_scores = live_logp / brevity_penalty(jnp.asarray(max_len + 1 - common), alpha)
  all_scores = jnp.concatenate([fin_scores, live_scores], axis=1)
  all_seqs = jnp.concatenate([fin_seqs, seqs], axis=1)
  scores, idx = jax.lax.top_k(all_scores, k)
  out = jnp.take_along_axis(all_seqs, idx[:, :, None], axis=1)
  return out[:, :, 1:], scores
