"""qlora_jax.hlo_report reads launches and bytes from XLA:GPU's scheduled HLO text (no jax needed).

The module below is a hand-cut excerpt in XLA:GPU's format: a while loop of 4 iterations whose body copies a slice
of a stacked weight out before a custom call (what a layer scan over a Pallas kernel compiles to), updates a
cache in place, and calls a kernel that states the bytes it reads.
"""

from __future__ import annotations

import pytest

from qlora_jax.hlo_report import KERNEL_BYTES_KEY, launch_report, parse_hlo
from tests.helpers import loop_with_trip_count

HLO = r"""
HloModule jit_step, entry_computation_layout={(u8[4,1024]{1,0}, bf16[4,8,16]{2,1,0})->bf16[4,8,16]{2,1,0}}

%fused_slice (param_0: u8[4,1024], param_1: s32[]) -> u8[1,1024] {
  %param_0 = u8[4,1024]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %constant_0 = s32[] constant(0)
  ROOT %dynamic-slice = u8[1,1024]{1,0} dynamic-slice(%param_0, %param_1, %constant_0), dynamic_slice_sizes={1,1024}
}

%fused_update (param_0.1: bf16[4,8,16], param_1.1: bf16[1,1,16], param_2: s32[]) -> bf16[4,8,16] {
  %param_0.1 = bf16[4,8,16]{2,1,0} parameter(0)
  %param_1.1 = bf16[1,1,16]{2,1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %constant_1 = s32[] constant(0)
  ROOT %dynamic-update-slice = bf16[4,8,16]{2,1,0} dynamic-update-slice(%param_0.1, %param_1.1, %param_2, %constant_1, %constant_1)
}

%fused_convert (param_0.2: f32[1,16]) -> bf16[1,1,16] {
  %param_0.2 = f32[1,16]{1,0} parameter(0)
  %convert = bf16[1,16]{1,0} convert(%param_0.2)
  ROOT %bitcast = bf16[1,1,16]{2,1,0} bitcast(%convert)
}

%body (arg_tuple: (s32[], u8[4,1024], bf16[4,8,16])) -> (s32[], u8[4,1024], bf16[4,8,16]) {
  %arg_tuple = (s32[], u8[4,1024]{1,0}, bf16[4,8,16]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg_tuple), index=0
  %weights = u8[4,1024]{1,0} get-tuple-element(%arg_tuple), index=1
  %cache = bf16[4,8,16]{2,1,0} get-tuple-element(%arg_tuple), index=2
  %slice_fusion = u8[1,1024]{1,0} fusion(%weights, %i), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(step)/while/body/dynamic_slice"}
  %kernel = f32[1,16]{1,0} custom-call(%slice_fusion), custom_call_target="__gpu$xla.gpu.triton", backend_config={grid_x = 1 : i32, serialized_metadata = "{\22@KEY@\22: \22[600, 64]\22}"}
  %whole = f32[1,16]{1,0} custom-call(%weights), custom_call_target="__gpu$xla.gpu.triton", backend_config={grid_x = 1 : i32}
  %convert_fusion = bf16[1,1,16]{2,1,0} fusion(%kernel), kind=kLoop, calls=%fused_convert
  %update = bf16[4,8,16]{2,1,0} fusion(%cache, %convert_fusion, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %tuple = (s32[], u8[4,1024]{1,0}, bf16[4,8,16]{2,1,0}) tuple(%next, %weights, %update)
}

%cond (arg_tuple.1: (s32[], u8[4,1024], bf16[4,8,16])) -> pred[] {
  %arg_tuple.1 = (s32[], u8[4,1024]{1,0}, bf16[4,8,16]{2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%arg_tuple.1), index=0
  %four = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.1, %four), direction=LT
}

ENTRY %main (stacked_weights: u8[4,1024], cache_k: bf16[4,8,16]) -> bf16[4,8,16] {
  %stacked_weights = u8[4,1024]{1,0} parameter(0)
  %cache_k = bf16[4,8,16]{2,1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], u8[4,1024]{1,0}, bf16[4,8,16]{2,1,0}) tuple(%zero, %stacked_weights, %cache_k)
  %while = (s32[], u8[4,1024]{1,0}, bf16[4,8,16]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %out = bf16[4,8,16]{2,1,0} get-tuple-element(%while), index=2
}
""".replace("@KEY@", KERNEL_BYTES_KEY)  # noqa: E501 (HLO lines as XLA writes them)


def test_parses_computations_shapes_and_the_entry():
    module = parse_hlo(HLO)
    assert module.entry.name == "main"
    body = module.computations["body"]
    assert str(body.by_name["arg_tuple"].shape) == "(s32[], u8[4,1024], bf16[4,8,16])"
    assert body.by_name["arg_tuple"].shape.nbytes == 4 + 4096 + 1024
    assert body.by_name["slice_fusion"].attribute("calls") == "fused_slice"
    with pytest.raises(ValueError, match="no ENTRY"):
        parse_hlo("HloModule nothing\n")


def test_launches_bytes_and_loops():
    report = launch_report(HLO)
    body = loop_with_trip_count(report, 4)
    assert report.trip_counts == {"body": 4}
    per_iteration = report.in_loop(body)
    by_name = {launch.name: launch for launch in per_iteration.launches}
    # seven launches an iteration: the loop counter's add and the condition's compare are launches too
    assert set(by_name) == {"slice_fusion", "kernel", "whole", "convert_fusion", "update", "next", "lt"}
    assert report.count == 4 * 7 and per_iteration.count == 7
    # a slice of the stack is read (one row), not the stack; and it is a copy of a slice of an ENTRY parameter
    assert (by_name["slice_fusion"].bytes_read, by_name["slice_fusion"].bytes_written) == (1024 + 4, 1024)
    assert by_name["slice_fusion"].copy and by_name["slice_fusion"].slice_of == ("stacked_weights",)
    # the kernel states its bytes; another reads its operand whole
    assert (by_name["kernel"].bytes_read, by_name["kernel"].bytes_written) == (600, 64)
    assert (by_name["whole"].bytes_read, by_name["whole"].bytes_written) == (4096, 64)
    assert by_name["whole"].kind == "__gpu$xla.gpu.triton" and not by_name["whole"].copy
    # in place: the update is read and written, the cache is neither read nor rewritten
    assert (by_name["update"].bytes_read, by_name["update"].bytes_written) == (32 + 4, 32)
    assert not by_name["update"].copy and not by_name["update"].slice_of
    assert [launch.name for launch in report.slice_copies] == ["slice_fusion"]
    assert report.bytes_read == 4 * per_iteration.bytes_read
    assert "slice_fusion" in report.table()
