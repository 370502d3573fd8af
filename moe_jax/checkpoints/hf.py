"""Reads a dense Hugging Face T5 checkpoint (config.json + safetensors).

Only numpy and the ``safetensors`` package are used (no torch). HF stores
``torch.nn.Linear`` weights as ``[out_features, in_features]``; ours are
``[in, out]`` kernels with heads split out:

=============================================  =====================================
HF name                                        moe_jax param (per stack/layer)
=============================================  =====================================
shared.weight [vocab, d]                       token_embedder/embedding
{enc|dec}.block.0.layer.0.SelfAttention.        {encoder|decoder}/relpos_bias/rel_embedding
  relative_attention_bias.weight [buckets, h]    [h, buckets]
...SelfAttention.{q,k,v}.weight [h*kv, d]      layers_i/self_attention/{query,key,value}/kernel [d, h, kv]
...SelfAttention.o.weight [d, h*kv]            layers_i/self_attention/out/kernel [h, kv, d]
decoder ...layer.1.EncDecAttention.*           layers_i/encoder_decoder_attention/*
...DenseReluDense.{wi_0,wi_1,wi,wo}.weight     layers_i/mlp/{wi_0,wi_1,wi,wo}/kernel (transposed)
...layer_norm.weight                           pre_*_norm/scale
{enc|dec}oder.final_layer_norm.weight          {encoder_norm|decoder_norm}/scale
lm_head.weight [vocab, d]                      decoder/logits_dense/kernel [d, vocab]
=============================================  =====================================
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from moe_jax.models.config import T5Config

_FEED_FORWARD = {
    "gated-gelu": ("gelu", "linear"),
    "gated-gelu_new": ("gelu", "linear"),
    "gated-relu": ("relu", "linear"),
    "gated-silu": ("silu", "linear"),
    "relu": ("relu",),
    "gelu": ("gelu",),
    "gelu_new": ("gelu",),
    "silu": ("silu",),
}


def config_from_hf(hf: dict[str, Any], **overrides) -> T5Config:
  """``T5Config`` from a HF T5 ``config.json`` dict."""
  proj = hf.get("feed_forward_proj", "relu")
  if proj not in _FEED_FORWARD:
    raise ValueError(f"feed_forward_proj={proj!r} is not supported; expected one of "
                     f"{sorted(_FEED_FORWARD)}.")
  if hf.get("is_encoder_decoder", True) is False:
    raise ValueError("Only encoder-decoder HF T5 checkpoints are supported.")
  num_layers = int(hf["num_layers"])
  kwargs = dict(
      vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]),
      num_heads=int(hf["num_heads"]), d_kv=int(hf["d_kv"]), d_ff=int(hf["d_ff"]),
      num_encoder_layers=num_layers,
      num_decoder_layers=int(hf.get("num_decoder_layers") or num_layers),
      activations=_FEED_FORWARD[proj],
      dropout_rate=float(hf.get("dropout_rate", 0.1)),
      relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
      logits_via_embedding=_scales_logits(hf),
      layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)))
  kwargs.update(overrides)
  return T5Config(**kwargs)


def _scales_logits(hf: dict[str, Any]) -> bool:
  """Whether HF multiplies the decoder output by ``d_model**-0.5`` before lm_head.

  transformers >= 5 records it as ``scale_decoder_outputs``; older configs
  use ``tie_word_embeddings`` (T5 v1.1 checkpoints say ``false``: unscaled).
  """
  if "scale_decoder_outputs" in hf:
    return bool(hf["scale_decoder_outputs"])
  return bool(hf.get("tie_word_embeddings", True))


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(
        f"No *.safetensors file in {path}. Save the HF model with "
        "save_pretrained(path, safe_serialization=True).")
  tensors = {}
  for f in files:
    tensors.update(load_file(f))
  return tensors


def params_from_hf(tensors: dict[str, np.ndarray], config: T5Config) -> dict:
  """Our (unboxed, unrolled) param tree from HF tensor names -> numpy arrays."""
  def get(name):
    if name not in tensors:
      raise KeyError(f"HF checkpoint lacks tensor {name!r}; is it a T5 "
                     "(T5ForConditionalGeneration) checkpoint?")
    return np.asarray(tensors[name], np.float32)

  h, kv, d = config.num_heads, config.d_kv, config.d_model

  def attention(prefix):
    return {
        "query": {"kernel": get(f"{prefix}.q.weight").T.reshape(d, h, kv)},
        "key": {"kernel": get(f"{prefix}.k.weight").T.reshape(d, h, kv)},
        "value": {"kernel": get(f"{prefix}.v.weight").T.reshape(d, h, kv)},
        "out": {"kernel": get(f"{prefix}.o.weight").T.reshape(h, kv, d)},
    }

  def mlp(prefix):
    names = ("wi",) if len(config.activations) == 1 else ("wi_0", "wi_1")
    out = {n: {"kernel": get(f"{prefix}.{n}.weight").T} for n in names}
    out["wo"] = {"kernel": get(f"{prefix}.wo.weight").T}
    return out

  def norm(name):
    return {"scale": get(name)}

  def stack(kind, num_layers):
    out = {}
    for i in range(num_layers):
      p = f"{kind}.block.{i}.layer"
      layer = {
          "pre_self_attention_norm": norm(f"{p}.0.layer_norm.weight"),
          "self_attention": attention(f"{p}.0.SelfAttention"),
      }
      mlp_idx = 1
      if kind == "decoder":
        layer["pre_cross_attention_norm"] = norm(f"{p}.1.layer_norm.weight")
        layer["encoder_decoder_attention"] = attention(f"{p}.1.EncDecAttention")
        mlp_idx = 2
      layer["pre_mlp_norm"] = norm(f"{p}.{mlp_idx}.layer_norm.weight")
      layer["mlp"] = mlp(f"{p}.{mlp_idx}.DenseReluDense")
      out[f"layers_{i}"] = layer
    stack_params = {
        "layers": out,
        "relpos_bias": {"rel_embedding": get(
            f"{kind}.block.0.layer.0.SelfAttention.relative_attention_bias.weight").T},
        f"{kind}_norm": norm(f"{kind}.final_layer_norm.weight"),
    }
    return stack_params

  embed_name = next((n for n in ("shared.weight", "encoder.embed_tokens.weight")
                     if n in tensors), "shared.weight")
  params = {
      "token_embedder": {"embedding": get(embed_name)},
      "encoder": stack("encoder", config.num_encoder_layers),
      "decoder": stack("decoder", config.num_decoder_layers),
  }
  if not config.logits_via_embedding:
    # Untied and unscaled (T5 v1.1). A tied but unscaled checkpoint (no
    # lm_head.weight stored) gets a copy of the embedding as its kernel.
    lm_head = get("lm_head.weight") if "lm_head.weight" in tensors else get(embed_name)
    params["decoder"]["logits_dense"] = {"kernel": np.ascontiguousarray(lm_head.T)}
  return params


def load_hf_t5(path: str, **config_overrides) -> tuple[dict, T5Config]:
  """``(params, config)`` from a HF T5 directory (config.json + safetensors)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: pass the directory written by "
                            "save_pretrained().")
  with open(config_path) as f:
    hf_config = json.load(f)
  tensors = _read_safetensors(path)
  if "lm_head.weight" in tensors and _scales_logits(hf_config):
    raise NotImplementedError(
        "This checkpoint has its own lm_head.weight *and* scales decoder outputs by "
        "d_model**-0.5; moe_jax ties scaling to shared embeddings "
        "(T5Config.logits_via_embedding). Set scale_decoder_outputs=false or drop "
        "lm_head.weight if it equals shared.weight.")
  config = config_from_hf(hf_config, **config_overrides)
  if config.scan_layers:
    raise ValueError("Load the HF checkpoint with scan_layers=False, then convert "
                     "with moe_jax.models.blocks.unrolled_to_scanned if needed.")
  return params_from_hf(tensors, config), config
