"""T5X on-disk format: a test writer, the reader, and upcycling a T5X checkpoint.

The writer below follows T5X's layout independently of the reader: a msgpack
``checkpoint`` file holding ``{"target": params, "state": {...}}`` where
arrays of 256+ elements are replaced by relative tensorstore zarr specs and
written to ``target.<dotted.path>/`` directories; small ones stay inline.
Attention kernels have joined heads (``[d, h*kv]``), T5X norm names.
"""

import os

import numpy as np
import pytest
import tensorstore as ts
from flax import serialization

import moe_jax.checkpoints
from moe_jax import gin_utils, partitioning, upcycle
from moe_jax.checkpoints import formats, restore, t5x_format, tree_paths, upcycling

VOCAB, D, H, KV, F, BUCKETS, STEP = 64, 16, 2, 8, 32, 8, 1234
INLINE_MAX = 256


def t5x_target(seed=0):
  """Random dense T5 v1.1 parameters under T5X names ``{path: array}``."""
  rng = np.random.default_rng(seed)
  arr = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
  t = {"token_embedder/embedding": arr(VOCAB, D),
       "decoder/logits_dense/kernel": arr(D, VOCAB)}
  for stack in ("encoder", "decoder"):
    t[f"{stack}/relpos_bias/rel_embedding"] = arr(H, BUCKETS)
    t[f"{stack}/{stack}_norm/scale"] = arr(D)
    for i in range(2):
      p = f"{stack}/layers_{i}"
      attns = (["attention"] if stack == "encoder"
               else ["self_attention", "encoder_decoder_attention"])
      norms = (["pre_attention_layer_norm"] if stack == "encoder" else
               ["pre_self_attention_layer_norm", "pre_cross_attention_layer_norm"])
      for a in attns:
        for n in ("query", "key", "value"):
          t[f"{p}/{a}/{n}/kernel"] = arr(D, H * KV)
        t[f"{p}/{a}/out/kernel"] = arr(H * KV, D)
      for n in norms + ["pre_mlp_layer_norm"]:
        t[f"{p}/{n}/scale"] = arr(D)
      t[f"{p}/mlp/wi_0/kernel"] = arr(D, F)
      t[f"{p}/mlp/wi_1/kernel"] = arr(D, F)
      t[f"{p}/mlp/wo/kernel"] = arr(F, D)
  return t


def write_t5x_checkpoint(directory, target, step=STEP):
  """Writes ``target`` ({T5X path: array}) as a T5X checkpoint directory."""
  os.makedirs(directory, exist_ok=True)
  tree = {}

  def put(path, value):
    node = tree
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value

  for name, value in target.items():
    full = f"target/{name}"
    if value.size < INLINE_MAX:
      put(full, value)
      continue
    dirname = full.replace("/", ".")
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": dirname},
            "metadata": {"shape": list(value.shape), "chunks": list(value.shape),
                         "dtype": "<f4", "compressor": {"id": "gzip"}}}
    abs_spec = dict(spec, kvstore={"driver": "file",
                                   "path": os.path.join(directory, dirname)})
    ts.open(abs_spec, create=True, delete_existing=True).result().write(value).result()
    put(full, spec)
  put("state/step", np.asarray(step, np.int32))
  put("state/param_states/encoder/encoder_norm/scale/v", np.zeros(D, np.float32))
  with open(os.path.join(directory, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(tree))


@pytest.fixture(scope="module")
def t5x_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("t5x") / f"checkpoint_{STEP}")
  target = t5x_target()
  write_t5x_checkpoint(path, target)
  return path, target


def _ours(name):
  """Our unrolled param path for a T5X target path (written out by hand)."""
  stack, rest = name.split("/", 1)
  if not rest.startswith("layers_"):
    return name
  layer, rest = rest.split("/", 1)
  rest = (rest.replace("pre_attention_layer_norm", "pre_self_attention_norm")
          .replace("pre_self_attention_layer_norm", "pre_self_attention_norm")
          .replace("pre_cross_attention_layer_norm", "pre_cross_attention_norm")
          .replace("pre_mlp_layer_norm", "pre_mlp_norm"))
  if rest.startswith("attention/"):
    rest = "self_attention/" + rest[len("attention/"):]
  return f"{stack}/layers/{layer}/{rest}"


def _expected(name, value):
  if "attention/" in name and "/out/" in name:
    return value.reshape(H, KV, D)
  if "attention/" in name:
    return value.reshape(D, H, KV)
  return value


def test_reader_maps_names_shapes_and_step(t5x_dir):
  path, target = t5x_dir
  assert os.path.isdir(os.path.join(path, "target.encoder.layers_0.mlp.wi_0.kernel"))
  assert formats.detect_format(path) == "t5x"
  params, config = moe_jax.checkpoints.load_dense_t5(path, format="t5x")
  assert (config.vocab_size, config.d_model, config.num_heads, config.d_kv, config.d_ff,
          config.num_encoder_layers, config.num_decoder_layers,
          config.relative_attention_num_buckets) == (VOCAB, D, H, KV, F, 2, 2, BUCKETS)
  assert config.activations == ("gelu", "linear") and not config.logits_via_embedding
  assert t5x_format.read_t5x_step(path) == STEP
  flat = tree_paths.flatten_with_paths(params)
  assert len(flat) == len(target)
  for name, value in target.items():
    np.testing.assert_array_equal(flat[_ours(name)], _expected(name, value))
  # Query head h, feature j of T5X's joined column h*KV + j.
  q = target["encoder/layers_0/attention/query/kernel"]
  np.testing.assert_array_equal(
      flat["encoder/layers/layers_0/self_attention/query/kernel"][:, 1, 3], q[:, KV + 3])


def test_upcycle_t5x_checks_every_copied_tensor(t5x_dir, tmp_path, capsys):
  path, target = t5x_dir
  out = str(tmp_path / "moe")
  code = upcycle.main(["--dense_checkpoint", path, "--format", "auto",
                       "--gin_file", "runs/sparse_upcycle.gin", "--output", out,
                       "--gin.NUM_EXPERTS=4", "--gin.MoeConfig.group_size=64",
                       "--mesh", "data=2,expert=4"])
  assert code == 0, capsys.readouterr().err
  assert os.path.isdir(os.path.join(out, str(STEP), "state"))

  dense_cfg = formats.config_from_params(t5x_format.t5x_to_params(target))
  gin_utils.parse_gin(["runs/sparse_upcycle.gin", os.path.join(out, "upcycled_model.gin")],
                      [], finalize=False)
  sparse_cfg = gin_utils.register_configurables()["T5Config"]()
  assert sparse_cfg.moe.num_experts == 4 and sparse_cfg.d_model == dense_cfg.d_model
  abstract, sh = upcycling.abstract_params(sparse_cfg,
                                           partitioning.Partitioner.create({"data": 8}))
  params = restore.restore_params(out, abstract, sh)
  flat = {k: np.asarray(v) for k, v in tree_paths.flatten_with_paths(params).items()}

  checked = set()
  for name, value in target.items():
    ours = _ours(name)
    if "/layers_1/mlp/" in ours:  # layer 1 of each stack became an MoE layer
      experts = ours.replace("/mlp/", "/moe/experts/").rsplit("/kernel", 1)[0]
      assert flat[experts].shape == (4,) + value.shape
      for e in range(4):
        np.testing.assert_array_equal(flat[experts][e], value)
      checked.add(experts)
    else:
      np.testing.assert_array_equal(flat[ours], _expected(name, value))
      checked.add(ours)
  routers = {n for n in flat if n.endswith("/moe/router_kernel")}
  assert routers == {"encoder/layers/layers_1/moe/router_kernel",
                     "decoder/layers/layers_1/moe/router_kernel"}
  assert checked | routers == set(flat)


def test_missing_parameter_error_names_it(tmp_path):
  target = t5x_target()
  del target["decoder/layers_1/pre_mlp_layer_norm/scale"]
  path = str(tmp_path / "broken")
  write_t5x_checkpoint(path, target)
  with pytest.raises(t5x_format.T5xFormatError,
                     match="target/decoder/layers_1/pre_mlp_layer_norm/scale"):
    t5x_format.load_t5x_params(path)
  with pytest.raises(FileNotFoundError, match="msgpack"):
    t5x_format.read_t5x_tree(str(tmp_path))
