"""The compiled-HLO reader: shapes, collectives per step, loop trip counts.

Byte counts are worked by hand from the shapes in each snippet (the lines are
in the form libtpu prints them: operands by name, TPU layouts, async pairs,
tuple results with ``/*index=N*/`` comments).
"""

import pytest

from moe_jax.aot import hlo


@pytest.mark.parametrize("shape, expected", [
    ("bf16[8,128]{1,0:T(8,128)(2,1)}", 8 * 128 * 2),
    ("f32[]{:T(128)}", 4),
    ("(f32[4]{0}, s32[]{:T(128)})", 4 * 4 + 4),
    ("f32[<=16]{0}", 16 * 4),
    ("pred[3]", 3),
    ("s4[10]", 5),
    ("f8e4m3fn[4,4]", 16),
    ("token[]", 0),
    ("((bf16[2,3]), u32[], token[])", 2 * 3 * 2 + 4),
])
def test_shape_bytes_by_hand(shape, expected):
  assert hlo.shape_bytes(shape) == expected


def _module(entry_body: str, extra: str = "") -> str:
  return (f"HloModule m, entry_computation_layout={{(f32[8]{{0}})->f32[8]{{0}}}}\n\n"
          f"{extra}\nENTRY %main (p: f32[8]) -> f32[8] {{\n{entry_body}\n}}\n")


ADD = ("%add (x: f32[], y: f32[]) -> f32[] {\n"
       "  %x = f32[] parameter(0)\n  %y = f32[] parameter(1)\n"
       "  ROOT %s = f32[] add(%x, %y)\n}\n")


def test_all_to_all_operand_bytes():
  text = _module(
      "  %reshape.1 = bf16[4,2,640]{2,1,0:T(2,128)(2,1)} parameter(0)\n"
      "  ROOT %all-to-all = bf16[4,2,640]{2,1,0:T(2,128)(2,1)} all-to-all(%reshape.1), "
      "channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, "
      "dimensions={0}, metadata={op_name=\"jit(train_step)/moe/dispatch\"}")
  stats = hlo.collective_stats(text)
  assert stats["all-to-all"] == {"count": 1, "bytes": 4 * 2 * 640 * 2}  # 10240
  assert stats["all-reduce"] == {"count": 0, "bytes": 0}


def test_tuple_all_reduce_sums_its_operands():
  text = _module(
      "  %a = s32[8]{0:T(128)} parameter(0)\n"
      "  %b = f32[16,4]{1,0} parameter(1)\n"
      "  %c = f32[]{:T(128)} parameter(2)\n"
      "  ROOT %all-reduce.96 = (s32[8]{0:T(128)}, f32[16,4]{1,0}, /*index=2*/f32[]{:T(128)}) "
      "all-reduce(%a, %b, %c), channel_id=95, replica_groups={{0,1,2,3}}, "
      "use_global_device_ids=true, to_apply=%add", ADD)
  # 8*4 + 16*4*4 + 4 = 32 + 256 + 4
  assert hlo.collective_stats(text)["all-reduce"] == {"count": 1, "bytes": 292}


def test_async_pairs_count_once():
  text = _module(
      "  %x = bf16[256,512]{1,0} parameter(0)\n"
      "  %g = f32[1024]{0} parameter(1)\n"
      "  %p = bf16[8,128]{1,0} parameter(2)\n"
      "  %ags = (bf16[256,512]{1,0}, bf16[1024,512]{1,0}) all-gather-start(%x), "
      "channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}\n"
      "  %agd = bf16[1024,512]{1,0} all-gather-done(%ags)\n"
      "  %ars = f32[1024]{0} all-reduce-start(%g), to_apply=%add\n"
      "  %ard = f32[1024]{0} all-reduce-done(%ars)\n"
      "  %cps = (bf16[8,128]{1,0}, bf16[8,128]{1,0}, u32[], u32[]) "
      "collective-permute-start(%p), source_target_pairs={{0,1},{1,0}}\n"
      "  ROOT %cpd = bf16[8,128]{1,0} collective-permute-done(%cps)", ADD)
  stats = hlo.collective_stats(text)
  assert stats["all-gather"] == {"count": 1, "bytes": 1024 * 512 * 2}   # the output
  assert stats["all-reduce"] == {"count": 1, "bytes": 1024 * 4}
  assert stats["collective-permute"] == {"count": 1, "bytes": 8 * 128 * 2}


def test_reduce_scatter_and_ragged_all_to_all():
  text = _module(
      "  %x = f32[1024,128]{1,0} parameter(0)\n"
      "  %in = bf16[32,128]{1,0} parameter(1)\n"
      "  %out = bf16[64,128]{1,0} parameter(2)\n"
      "  %o = s64[4]{0} parameter(3)\n"
      "  %rs = f32[256,128]{1,0} reduce-scatter(%x), replica_groups={{0,1,2,3}}, "
      "dimensions={0}, to_apply=%add\n"
      "  ROOT %r = bf16[64,128]{1,0} ragged-all-to-all(%in, %out, %o, %o, %o, %o), "
      "replica_groups={{0,1,2,3}}", ADD)
  stats = hlo.collective_stats(text)
  assert stats["reduce-scatter"] == {"count": 1, "bytes": 1024 * 128 * 4}
  assert stats["ragged-all-to-all"] == {"count": 1, "bytes": 32 * 128 * 2}


def test_async_start_wrapping_a_collective_counts_it_once():
  wrapped = ("%wrapped_all_to_all (p0: f32[8,16]) -> f32[8,16] {\n"
             "  %p0 = f32[8,16]{1,0} parameter(0)\n"
             "  ROOT %a2a = f32[8,16]{1,0} all-to-all(%p0), dimensions={0}\n}\n")
  text = _module(
      "  %x = f32[8,16]{1,0} parameter(0)\n"
      "  %as = ((f32[8,16]{1,0}), f32[8,16]{1,0}, u32[]) async-start(%x), "
      "calls=%wrapped_all_to_all\n"
      "  ROOT %ad = f32[8,16]{1,0} async-done(%as), calls=%wrapped_all_to_all", wrapped)
  assert hlo.collective_stats(text)["all-to-all"] == {"count": 1, "bytes": 8 * 16 * 4}


def test_cross_slice_send_recv_is_one_dcn_all_reduce():
  attrs = ('is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name='
           '"xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.145_0",'
           '_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type="ALL_REDUCE"}')
  text = _module(
      "  %g = f32[48,8,128]{2,1,0:T(8,128)} parameter(0)\n"
      "  %tok = token[] after-all()\n"
      f"  %send.17 = (f32[48,8,128]{{2,1,0:T(8,128)}}, u32[], token[]) send(%g, %tok), "
      f"channel_id=5, {attrs}\n"
      f"  %recv.17 = (f32[48,8,128]{{2,1,0:T(8,128)}}, u32[], token[]) recv(%tok), "
      f"channel_id=6, {attrs}\n"
      "  %sd = token[] send-done(%send.17), channel_id=5\n"
      "  ROOT %rd = (f32[48,8,128]{2,1,0:T(8,128)}, token[]) recv-done(%recv.17), channel_id=6")
  stats = hlo.collective_stats(text)
  assert stats["dcn-all-reduce"] == {"count": 1, "bytes": 48 * 8 * 128 * 4}
  assert stats["all-reduce"]["count"] == 0


def test_operands_printed_with_shapes():
  text = _module("  ROOT %ar = (f32[16]{0}, f32[4]{0}) all-reduce(f32[16]{0} %x, "
                 "f32[4]{0} %y), to_apply=%add", ADD)
  assert hlo.collective_stats(text)["all-reduce"] == {"count": 1, "bytes": 80}


# A scan of 6 layers in the form XLA leaves it: counter in tuple element 0,
# initialized from a copied constant 0, condition `counter < 6`.
LOOP = """
%body (param: (s32[], bf16[64,256], bf16[6,256,256])) -> (s32[], bf16[64,256], bf16[6,256,256]) {
  %param = (s32[]{:T(128)}, bf16[64,256]{1,0}, bf16[6,256,256]{2,1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%param), index=0
  %h = bf16[64,256]{1,0} get-tuple-element(%param), index=1
  %w = bf16[6,256,256]{2,1,0} get-tuple-element(%param), index=2
  %mm = bf16[64,256]{1,0} fusion(%h, %w, %i), kind=kOutput, calls=%fused_mm
  %a2a = bf16[64,256]{1,0} all-to-all(%mm), dimensions={0}
  %one = s32[] constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  ROOT %t = (s32[]{:T(128)}, bf16[64,256]{1,0}, bf16[6,256,256]{2,1,0}) tuple(%next, %a2a, %w)
}

%fused_mm (fp0: bf16[64,256], fp1: bf16[6,256,256], fp2: s32[]) -> bf16[64,256] {
  %fp0 = bf16[64,256]{1,0} parameter(0)
  %fp1 = bf16[6,256,256]{2,1,0} parameter(1)
  %fp2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  %ds = bf16[1,256,256]{2,1,0} dynamic-slice(%fp1, %fp2, %zero, %zero), dynamic_slice_sizes={1,256,256}
  %wi = bf16[256,256]{1,0} bitcast(%ds)
  ROOT %conv = bf16[64,256]{1,0} convolution(%fp0, %wi), dim_labels=bf_io->bf
}

%cond (cparam: (s32[], bf16[64,256], bf16[6,256,256])) -> pred[] {
  %cparam = (s32[]{:T(128)}, bf16[64,256]{1,0}, bf16[6,256,256]{2,1,0}) parameter(0)
  %ci = s32[]{:T(128)} get-tuple-element(%cparam), index=0
  %limit = s32[]{:T(128)} constant(6)
  ROOT %lt = pred[]{:T(512)} compare(%ci, %limit), direction=LT
}

ENTRY %main (h0: bf16[64,256], w0: bf16[6,256,256]) -> bf16[64,256] {
  %h0 = bf16[64,256]{1,0} parameter(0)
  %w0 = bf16[6,256,256]{2,1,0} parameter(1)
  %c0 = s32[]{:T(128)} constant(0)
  %start = s32[]{:T(128)} copy(%c0)
  %init = (s32[]{:T(128)}, bf16[64,256]{1,0}, bf16[6,256,256]{2,1,0}) tuple(%start, %h0, %w0)
  %loop = (s32[]{:T(128)}, bf16[64,256]{1,0}, bf16[6,256,256]{2,1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[64,256]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_collectives_in_a_loop_count_once_per_iteration():
  result = hlo.analyze(LOOP)
  assert result.loops == {"loop": 6}
  assert result.collectives["all-to-all"] == {"count": 6, "bytes": 6 * 64 * 256 * 2}


def test_loop_extra_flops_and_bytes_by_hand():
  result = hlo.analyze(LOOP)
  # Cost analysis counted the body once; 5 more iterations of:
  #   matmul 2 x (64 x 256 outputs) x 256 contracted;
  #   fusion: reads h (64x256 bf16), the one-layer slice of w (256x256 bf16)
  #   and the s32 index, writes 64x256 bf16; all-to-all reads and writes
  #   64x256 bf16; the add reads two s32 scalars and writes one.
  # And the condition runs 7 times, not once: 6 more compares reading two s32
  # and writing a pred.
  assert result.loop_extra_flops == 5 * 2 * 64 * 256 * 256
  per_iteration = ((64 * 256 * 2 + 256 * 256 * 2 + 4 + 64 * 256 * 2)
                   + 2 * 64 * 256 * 2 + 3 * 4)
  assert result.loop_extra_bytes == 5 * per_iteration + 6 * (4 + 4 + 1)


def test_trip_count_from_known_trip_count_and_unknown_loops():
  known = LOOP.replace("condition=%cond, body=%body",
                       'condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}')
  assert hlo.analyze(known).collectives["all-to-all"]["count"] == 4
  unknown = LOOP.replace("compare(%ci, %limit)", "compare(%ci, %ci)")
  result = hlo.analyze(unknown)
  assert result.unknown_loops == ["loop"]
  assert result.collectives["all-to-all"]["count"] == 1  # counted once, flagged


def test_not_an_hlo_module():
  with pytest.raises(ValueError, match="ENTRY"):
    hlo.analyze("module @jit_f { func.func public @main() }")


def test_batched_matmul_written_as_dilated_convolution_by_hand():
  """The TPU compiler writes attention's [batch 4, heads 12] batched matmul
  (512x512 scores times 512x64 values) as a convolution whose two "spatial"
  dimensions are the batch dimensions, dilated so one window tap is real."""
  text = _module(
      "  %s = bf16[4,12,512,512]{2,3,1,0} parameter(0)\n"
      "  %v = bf16[4,512,12,64]{1,3,2,0} parameter(1)\n"
      "  ROOT %c = bf16[4,12,512,64]{2,3,1,0} convolution(%s, %v), "
      "window={size=4x12 stride=3x11 lhs_dilate=4x12}, dim_labels=01fb_0i1o->01bf")
  module = hlo.parse_module(text)
  conv = module.by_name["c"]
  assert hlo._matmul_flops(module, conv) == 2 * (4 * 12) * 512 * 512 * 64
  plain = _module(
      "  %a = f32[32,64]{1,0} parameter(0)\n  %w = f32[64,16]{1,0} parameter(1)\n"
      "  ROOT %c = f32[32,16]{1,0} convolution(%a, %w), dim_labels=bf_io->bf")
  module = hlo.parse_module(plain)
  assert hlo._matmul_flops(module, module.by_name["c"]) == 2 * 32 * 16 * 64
  dot = _module(
      "  %a = f32[8,32,64]{2,1,0} parameter(0)\n  %w = f32[8,64,16]{2,1,0} parameter(1)\n"
      "  ROOT %d = f32[8,32,16]{2,1,0} dot(%a, %w), lhs_batch_dims={0}, "
      "lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}")
  module = hlo.parse_module(dot)
  assert hlo._matmul_flops(module, module.by_name["d"]) == 2 * 8 * 32 * 16 * 64
