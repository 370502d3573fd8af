"""Host<->device traffic read from HLO text (``moe_jax.aot.host_memory``).

The module below is written by hand in the form XLA:TPU prints for a
scanned block whose weights rest in host memory: an async read of one
layer's slice of a host-resident stack, and an async write of a device
gradient slice into a host stack. The expected bytes are the slices'
element counts times 4 (float32), worked out here.
"""

from moe_jax.aot import host_memory

HOST = "{2,1,0:T(8,128)S(5)}"
DEV = "{2,1,0:T(8,128)}"
ASYNC_SLICES = f"""HloModule jit_step, is_scheduled=true

ENTRY %main.1 (p0: f32[3,512,512], p1: f32[1,512,256]) -> f32[3,512,256] {{
  %p0 = f32[3,512,512]{HOST} parameter(0)
  %p1 = f32[1,512,256]{DEV} parameter(1)
  %g = f32[3,512,256]{HOST} parameter(2)
  %c = s32[]{{:T(128)}} constant(0)
  %ds = ((f32[3,512,512]{HOST}, s32[]{{:T(128)}}, s32[]{{:T(128)}}, s32[]{{:T(128)}}), f32[1,512,512]{DEV}, u32[]{{:S(2)}}) dynamic-slice-start(%p0, %c, %c, %c), dynamic_slice_sizes={{1,512,512}}
  %dsd = f32[1,512,512]{DEV} dynamic-slice-done(%ds)
  %dus = ((f32[3,512,256]{HOST}, f32[1,512,256]{DEV}, s32[]{{:T(128)}}, s32[]{{:T(128)}}, s32[]{{:T(128)}}), f32[3,512,256]{HOST}, u32[]{{:S(2)}}) dynamic-update-slice-start(%g, %p1, %c, %c, %c)
  ROOT %dusd = f32[3,512,256]{HOST} dynamic-update-slice-done(%dus)
}}
"""


def test_async_slices_of_host_stacks_are_counted_once_each_way():
  moved = host_memory.transfers(ASYNC_SLICES)
  assert moved["host_to_device"] == {"count": 1, "bytes": 512 * 512 * 4}
  assert moved["device_to_host"] == {"count": 1, "bytes": 512 * 256 * 4}


def test_slices_within_one_memory_space_are_not_transfers():
  same = ASYNC_SLICES.replace("S(5)", "")
  moved = host_memory.transfers(same)
  assert moved["host_to_device"]["count"] == moved["device_to_host"]["count"] == 0
