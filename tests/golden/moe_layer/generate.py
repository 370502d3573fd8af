r"""Records the MoE layer's behaviour on fixed seeds (issue 20's freeze).

Run once *before* a change to the MoE layer and again after it; the test
``tests/test_moe_golden.py`` compares the layer of the working tree with
the recorded files::

    python tests/golden/moe_layer/generate.py            # (re)writes the .npz files

For every variant (the layer options of the tests and every model-level
method of ``moe_jax/experiments/multi30k.py``) it stores, unsharded:

* ``param/<path>``: a fingerprint of every parameter (paths and shapes are
  the checkpoint contract; the fingerprint pins the initializers);
* ``train/out``, ``eval/out``: the output (train mode with fixed RNG
  streams, and eval mode);
* ``train/sown/<path>``, ``eval/sown/<path>``: every sown intermediate;
* ``grad/<path>``: fingerprints of the gradients of ``sum(out ** 2)`` in
  train mode w.r.t. the params (and ``grad/x`` w.r.t. the layer input for
  layer variants).

A fingerprint (:func:`fingerprint`) is ``[sum, sum |a|, sum a^2, a . r]``
in float64 with a fixed random ``r``, plus the shape under ``<key>#shape``:
random floats do not compress, and four numbers move with any change.

``collectives.json`` holds the all-to-all / all-gather counts of the compiled
fwd+bwd step on 8 CPU devices for the meshes of the tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

HERE = os.path.dirname(os.path.abspath(__file__))
D, F = 16, 32
B, L = 4, 8

# name -> MoeConfig overrides (layer-level variants).
LAYER_VARIANTS = {
    "top1": dict(num_selected_experts=1),
    "top2": dict(),
    "top2_no_renorm": dict(renormalize_top_k=False),
    "top2_tight_capacity": dict(capacity_factor_train=0.5, capacity_factor_eval=0.75,
                                min_expert_capacity=1),
    "bpr": dict(priority="batch_prioritized", capacity_factor_train=0.5,
                min_expert_capacity=1),
    "random_priority": dict(priority="random", capacity_factor_train=0.5,
                            capacity_factor_eval=0.5, min_expert_capacity=1),
    "jitter": dict(jitter_noise=0.1),
    "router_bias": dict(router_bias=True),
    "experts_choose": dict(router_type="experts_choose", capacity_factor_train=1.0,
                           capacity_factor_eval=1.0, min_expert_capacity=1),
    "dropless": dict(dropless=True),
    "dropless_top1": dict(dropless=True, num_selected_experts=1),
    "expert_dropout": dict(expert_dropout_rate=0.4),
    "dropless_expert_dropout": dict(dropless=True, expert_dropout_rate=0.4),
    "gate_drop_fires": dict(gating_dropout_rate=1.0, gating_dropout_mode="gate_drop"),
    "gate_expert_drop_fires": dict(gating_dropout_rate=1.0,
                                   gating_dropout_mode="gate_expert_drop"),
    "gating_dropout_half": dict(gating_dropout_rate=0.5),
    "eom": dict(expert_output_masking_rate=0.3),
    "dropless_eom": dict(dropless=True, expert_output_masking_rate=0.3),
    "fom": dict(final_output_masking_rate=0.3),
    "clusters": dict(num_expert_clusters=2, cluster_expert_dropout_rate=0.3),
    "task_routing": dict(routing_level="task", num_route_ids=3, dropless=True),
    "task_routing_capacity": dict(routing_level="task", num_route_ids=3,
                                  capacity_factor_train=4.0, capacity_factor_eval=4.0),
    "bilevel": dict(bilevel_outer_size=2),
    "bilevel_random": dict(bilevel_outer_size=4, priority="random", jitter_noise=0.1),
    "dense_to_sparse": dict(router_type="dense_to_sparse", dts_anneal_steps=10),
    "dense_to_sparse_capacity": dict(router_type="dense_to_sparse",
                                     dts_train_capacity="capacity_factor"),
    "shared_core": dict(shared_core_rank=2),
    "plain_relu": dict(activations=("relu",)),
}

# name -> (T5Config overrides, MoeConfig overrides, layout overrides) for
# model-level methods (experiments/multi30k.py and tests).
MODEL_VARIANTS = {
    "baseline": ({}, {}, {}),
    "expert_dropout": ({"dropout_rate": 0.1}, {"expert_dropout_rate": 0.4}, {}),
    "gating_dropout": ({}, {"gating_dropout_rate": 0.2,
                            "gating_dropout_mode": "gate_expert_drop"}, {}),
    "eom": ({}, {"expert_output_masking_rate": 0.2}, {}),
    "fom": ({}, {"final_output_masking_rate": 0.2}, {}),
    "random_token_selection": ({}, {"priority": "random"}, {}),
    "moec": ({}, {"num_expert_clusters": 2, "cluster_expert_dropout_rate": 0.1}, {}),
    "cmr": ({}, {}, {"conditional_routing": "default"}),
    "dense_to_sparse_gate": ({}, {"router_type": "dense_to_sparse",
                                  "dts_anneal_steps": 150}, {}),
    "bilevel": ({}, {"bilevel_outer_size": 2}, {}),
    "residual_moe": ({}, {"num_selected_experts": 1}, {"residual": True}),
    "pyramid": ({}, {}, {"kind": "all", "num_experts": (4, 8)}),
    "task_routing": ({}, {"routing_level": "task", "num_route_ids": 7,
                          "dropless": True}, {}),
    "shared_core_experts": ({}, {"shared_core_rank": 4}, {}),
    "extra_dense": ({}, {}, {"extra_dense_mlp": True}),
    "scanned": ({"scan_layers": True, "num_encoder_layers": 4,
                 "num_decoder_layers": 4}, {}, {}),
    "decoder_only": ({"decoder_only": True}, {}, {}),
}

# (variant, mesh) pairs whose compiled collectives are recorded.
COLLECTIVE_CASES = [
    ("top2", {"data": 1, "expert": 8}),
    ("top2", {"data": 2, "expert": 4}),
    ("experts_choose", {"data": 2, "expert": 4}),
    ("dropless", {"data": 1, "expert": 8}),
    ("dropless", {"data": 4, "expert": 2}),
    ("gate_drop_fires", {"data": 2, "expert": 4}),
    ("bilevel", {"data": 2, "expert": 4}),
]


# Options added after the records were made, set to the behaviour the records
# have (the original dispatch and dropless exchange); their other values are
# checked against references in tests/test_dispatch.py and test_ep_exchange.py.
PINNED = dict(dispatch="scatter", dropless_exchange="all_gather")


def layer_config(overrides):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from moe_jax.layers.moe_config import MoeConfig  # pylint: disable=g-import-not-at-top
  base = dict(num_experts=8, num_selected_experts=2, d_ff=F, group_size=16,
              capacity_factor_train=1.25, capacity_factor_eval=2.0,
              min_expert_capacity=2, dropless_block_size=8)
  fields = {f.name for f in dataclasses.fields(MoeConfig)}
  base.update({k: v for k, v in PINNED.items() if k in fields})
  base.update(overrides)
  return MoeConfig(**base)


def layer_inputs():
  x = jax.random.normal(jax.random.key(0), (B, L, D), jnp.float32)
  mask = jnp.ones((B, L), jnp.int32).at[1, 6:].set(0).at[3, 3:].set(0)
  route_ids = jnp.broadcast_to(jnp.array([1, 2, 3, 1])[:, None], (B, L)) * mask
  return x, mask, route_ids


RNGS = lambda: {"dropout": jax.random.key(11), "jitter": jax.random.key(12),  # noqa: E731
                "routing": jax.random.key(13)}


def fingerprint(a) -> np.ndarray:
  """``<float64>[4]``: sum, sum of |a|, sum of squares, projection on a fixed r."""
  a = np.asarray(a, np.float64).reshape(-1)
  r = np.random.default_rng(a.size).standard_normal(a.size)
  return np.array([a.sum(), np.abs(a).sum(), np.square(a).sum(), a @ r])


def flat(tree, prefix, summarize=False):
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = prefix + jax.tree_util.keystr(path)
    if summarize:
      out[key] = fingerprint(leaf)
      out[key + "#shape"] = np.asarray(np.shape(leaf), np.int64)
    else:
      out[key] = np.asarray(leaf)
  return out


def make_layer(cfg):
  """The layer ``models/blocks.py`` builds for ``cfg`` (bi-level routing has
  its own layer since the redesign; before it, ``MoeLayer`` handled it)."""
  from moe_jax.layers.moe import MoeLayer  # pylint: disable=g-import-not-at-top
  if cfg.bilevel_outer_size:
    try:
      from moe_jax.layers.bilevel import BilevelMoeLayer  # pylint: disable=g-import-not-at-top
      return BilevelMoeLayer(cfg)
    except ImportError:
      pass
  return MoeLayer(cfg)


def record_layer(name, overrides):
  from moe_jax.layers import schedule  # pylint: disable=g-import-not-at-top
  cfg = layer_config(overrides)
  layer = make_layer(cfg)
  x, mask, route_ids = layer_inputs()
  kw = dict(padding_mask=mask)
  if cfg.routing_level == "task":
    kw["route_ids"] = route_ids
  params = nn.unbox(layer.init(jax.random.key(1), x, **kw))
  out = flat(params, "param/", summarize=True)

  def train(p, x):
    with schedule.training_step(jnp.asarray(3, jnp.int32)):
      return layer.apply(p, x, deterministic=False, rngs=RNGS(),
                         mutable=["intermediates"], **kw)

  y, state = train(params, x)
  out["train/out"] = np.asarray(y)
  out.update(flat(state.get("intermediates", {}), "train/sown/"))
  y_eval, state_eval = layer.apply(params, x, mutable=["intermediates"], **kw)
  out["eval/out"] = np.asarray(y_eval)
  out.update(flat(state_eval.get("intermediates", {}), "eval/sown/"))
  grads = jax.grad(lambda p, x: jnp.sum(jnp.square(train(p, x)[0])), argnums=(0, 1))(
      params, x)
  out.update(flat(grads[0], "grad/", summarize=True))
  out["grad/x"] = fingerprint(grads[1])
  return out


def model_config(t5_over, moe_over, layout_over):
  from moe_jax.layers.conditional import ConditionalRoutingConfig  # pylint: disable=g-import-not-at-top
  from moe_jax.models.config import SparseLayout, T5Config  # pylint: disable=g-import-not-at-top
  moe = layer_config(dict(dict(num_selected_experts=2, group_size=32), **moe_over))
  layout = dict(kind="every", every=2)
  layout.update(layout_over)
  if layout.get("conditional_routing") == "default":
    layout["conditional_routing"] = ConditionalRoutingConfig()
  t5 = dict(vocab_size=64, d_model=D, num_heads=2, d_kv=8, d_ff=F,
            num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0, moe=moe,
            encoder_layout=SparseLayout(**layout), decoder_layout=SparseLayout(**layout))
  t5.update(t5_over)
  return T5Config(**t5)


def model_batch(decoder_only):
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 64, (B, L)).astype(np.int32)
  enc[1, 6:] = 0
  dec_t = rng.integers(2, 64, (B, L)).astype(np.int32)
  dec_t[2, 5:] = 0
  dec_in = np.concatenate([np.zeros((B, 1), np.int32), dec_t[:, :-1]], axis=1)
  batch = {"decoder_input_tokens": dec_in, "decoder_target_tokens": dec_t}
  if not decoder_only:
    batch["encoder_input_tokens"] = enc
    ids = np.array([1, 3, 5, 7], np.int32)[:, None]
    batch["encoder_route_ids"] = np.broadcast_to(ids, (B, L)) * (enc > 0)
    batch["decoder_route_ids"] = np.broadcast_to(ids + 1 - (ids == 7) * 2, (B, L)) * (
        dec_t > 0)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def record_model(name, spec):
  from moe_jax import models  # pylint: disable=g-import-not-at-top
  from moe_jax.layers import schedule  # pylint: disable=g-import-not-at-top
  from moe_jax.training import train_state  # pylint: disable=g-import-not-at-top
  cfg = model_config(*spec)
  model = models.build_model(cfg)
  batch = model_batch(cfg.decoder_only)
  if cfg.moe.routing_level != "task":
    batch = {k: v for k, v in batch.items() if "route_ids" not in k}
  args, kwargs = train_state.model_inputs(batch)
  params = nn.unbox(model.init({"params": jax.random.key(1), **RNGS()}, *args,
                               **kwargs, enable_dropout=False))["params"]
  out = flat(params, "param/", summarize=True)

  def train(p):
    with schedule.training_step(jnp.asarray(40, jnp.int32)):
      return model.apply({"params": p}, *args, **kwargs, enable_dropout=True,
                         rngs=RNGS(), mutable=["intermediates"])

  logits, state = train(params)
  # Logits are [B, L, vocab]: their fingerprint and per-position max suffice.
  out["train/out"] = fingerprint(logits)
  out["train/out_max"] = np.asarray(jnp.max(logits, axis=-1))
  out.update(flat(state.get("intermediates", {}), "train/sown/"))
  logits_eval, state_eval = model.apply({"params": params}, *args, **kwargs,
                                        enable_dropout=False, mutable=["intermediates"])
  out["eval/out"] = fingerprint(logits_eval)
  out["eval/out_max"] = np.asarray(jnp.max(logits_eval, axis=-1))
  out.update(flat(state_eval.get("intermediates", {}), "eval/sown/"))
  grads = jax.grad(lambda p: jnp.sum(jnp.square(train(p)[0])))(params)
  out.update(flat(grads, "grad/", summarize=True))
  return out


def collectives(name, mesh_shape):
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  cfg = layer_config(LAYER_VARIANTS[name])
  layer = make_layer(cfg)
  x = jax.random.normal(jax.random.key(0), (16, L, D), jnp.float32)
  mesh = partitioning.make_mesh(mesh_shape)
  rules = partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    boxed = jax.eval_shape(layer.init, jax.random.key(1), x)
    shardings = partitioning.params_shardings(mesh, boxed, rules)
    params = jax.jit(lambda k: nn.unbox(layer.init(k, x)), out_shardings=shardings)(
        jax.random.key(1))
    xs = partitioning.logical_sharding(mesh, ("batch", "length", "embed"), rules)

    def loss(p, x):
      y = layer.apply(p, x, deterministic=False, rngs=RNGS(), mutable=["intermediates"])[0]
      return jnp.sum(jnp.square(y))

    hlo = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, xs)).lower(
        params, jax.device_put(x, xs)).compile().as_text()
  return {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(")
          for op in ("all-to-all", "all-gather", "reduce-scatter", "all-reduce")}


RECORDS = os.path.join(HERE, "records.npz")


def save_records(records: dict[str, dict[str, np.ndarray]], path: str = RECORDS) -> None:
  """All variants in one file: a float64 blob and a JSON index (key -> slice,
  shape, dtype); many small .npy members would cost more in headers than data."""
  index, chunks, offset = {}, [], 0
  for variant, arrays in sorted(records.items()):
    for key, a in sorted(arrays.items()):
      a = np.asarray(a)
      index[f"{variant}|{key}"] = [offset, list(a.shape), a.dtype.str]
      chunks.append(a.astype(np.float64).reshape(-1))
      offset += a.size
  np.savez_compressed(path, blob=np.concatenate(chunks),
                      index=np.frombuffer(json.dumps(index).encode(), np.uint8))


def load_records(path: str = RECORDS) -> dict[str, dict[str, np.ndarray]]:
  """Inverse of :func:`save_records`."""
  z = np.load(path)
  blob, index = z["blob"], json.loads(z["index"].tobytes().decode())
  out: dict[str, dict[str, np.ndarray]] = {}
  for name, (offset, shape, dtype) in index.items():
    variant, key = name.split("|", 1)
    size = int(np.prod(shape))
    out.setdefault(variant, {})[key] = blob[offset:offset + size].reshape(shape).astype(dtype)
  return out


def record_all(only=()) -> dict[str, dict[str, np.ndarray]]:
  records = {}
  for name, overrides in LAYER_VARIANTS.items():
    if not only or f"layer_{name}" in only:
      records[f"layer_{name}"] = record_layer(name, overrides)
      print("layer", name, flush=True)
  for name, spec in MODEL_VARIANTS.items():
    if not only or f"model_{name}" in only:
      records[f"model_{name}"] = record_model(name, spec)
      print("model", name, flush=True)
  return records


def main(argv):
  skip_collectives = "--skip_collectives" in argv
  only = set(argv) - {"--skip_collectives"}
  records = record_all(only)
  if only and os.path.exists(RECORDS):
    records = {**load_records(), **records}
  save_records(records)
  if not skip_collectives and (not only or "collectives" in only):
    table = {f"{n}@{','.join(f'{k}={v}' for k, v in m.items())}": collectives(n, m)
             for n, m in COLLECTIVE_CASES}
    with open(os.path.join(HERE, "collectives.json"), "w") as f:
      json.dump(table, f, indent=1, sort_keys=True)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
  main(sys.argv[1:])
