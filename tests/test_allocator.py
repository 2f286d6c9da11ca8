"""The caching-allocator replay follows CUDACachingAllocator's rules: rounding, segment sizes, best
fit with splitting, merging on free, per-stream pools, release of free segments when full."""

import subprocess
import sys

from zeroplan.core.allocator import MIB, CachingAllocator, Trace, replay, round_size, segment_size


def test_request_rounding_and_segment_sizes():
    assert round_size(1) == 512 and round_size(513) == 1024
    assert segment_size(100 * 1024) == 2 * MIB          # small pool
    assert segment_size(3 * MIB) == 20 * MIB            # 1-10 MiB requests share 20 MiB segments
    assert segment_size(11 * MIB + 1) == 12 * MIB       # larger ones: rounded up to 2 MiB


def test_freed_blocks_are_cached_not_returned():
    allocator = CachingAllocator()
    allocator.malloc("a", 100 * MIB)
    allocator.free("a")
    allocator.malloc("b", 60 * MIB)   # split from the cached 100 MiB block: no new segment
    assert allocator.reserved == 100 * MIB and allocator.allocated == 60 * MIB


def test_best_fit_takes_the_smallest_block_that_fits():
    allocator = CachingAllocator()
    for key, size in (("big", 200 * MIB), ("small", 50 * MIB), ("keep", 30 * MIB)):
        allocator.malloc(key, size)
    allocator.free("big")
    allocator.free("small")
    allocator.malloc("x", 40 * MIB)   # goes to the 50 MiB block, leaving the 200 MiB one whole
    allocator.malloc("y", 190 * MIB)
    assert allocator.reserved == 280 * MIB


def test_a_block_split_by_a_live_tensor_cannot_serve_a_large_request():
    allocator = CachingAllocator()
    allocator.malloc("a", 100 * MIB)
    allocator.free("a")
    allocator.malloc("small", 20 * MIB)   # splits the cached segment; 80 MiB left
    allocator.malloc("large", 100 * MIB)  # does not fit the 80 MiB remainder: a new segment
    assert allocator.reserved == 200 * MIB
    allocator.free("small")               # merges back into one free 100 MiB block
    allocator.malloc("again", 100 * MIB)
    assert allocator.reserved == 200 * MIB


def test_blocks_of_another_stream_are_not_reused():
    allocator = CachingAllocator()
    allocator.malloc("side", 100 * MIB, stream=1)
    allocator.free("side")
    allocator.malloc("main", 100 * MIB, stream=0)
    assert allocator.reserved == 200 * MIB


def test_full_device_releases_wholly_free_segments():
    allocator = CachingAllocator(capacity=150 * MIB)
    allocator.malloc("a", 100 * MIB)
    allocator.free("a")
    allocator.malloc("b", 120 * MIB)
    assert allocator.reserved == 120 * MIB and allocator.peak_reserved == 120 * MIB


def test_trace_drops_small_requests_and_replays():
    trace = Trace()
    tiny = trace.malloc("tiny", 4096)
    big = trace.malloc("big", 50 * MIB)
    trace.free(tiny, big)
    allocator = replay(trace.events)
    assert allocator.peak_allocated == 50 * MIB and allocator.allocated == 0


def test_pure_core_does_not_import_torch():
    code = ("import sys; import zeroplan.core.memory, zeroplan.core.allocator, zeroplan.core.step_events, zeroplan.lab.records; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_engine_set_up_allocates_what_the_h100_runs_recorded():
    """The replayed DeepSpeed set-up (zeroplan.core.zero_events) peaks where torch's counter did before
    the first step (init_peak_allocated_bytes), for every stage, frozen tower and LoRA case."""
    import glob
    import json
    from dataclasses import replace

    from zeroplan.lab.calibrate import points_from_records
    from zeroplan.core.memory import _most_loaded_rank_states, communication_buffer_bytes
    from zeroplan.lab.records import record_profile
    from zeroplan.core.zero_events import ZeroEvents

    checked = 0
    for path in sorted(glob.glob("reports/h100_*/results.jsonl")):
        for line in open(path):
            record = json.loads(line)
            for point in points_from_records([record]):
                if point.plan.world_size != 1:
                    continue
                profile = record_profile(record)
                states = _most_loaded_rank_states(profile, replace(point.shape, micro_batch=1, grad_ckpt=False, ckpt_layers=None),
                                                  point.plan)
                trace = Trace()
                ZeroEvents(trace, profile, point.shape, point.plan, states,
                           communication_buffer_bytes(profile, point.plan, states.partition_elems)).init()
                measured = record["init_peak_allocated_bytes"]
                assert abs(replay(trace.events).peak_allocated - measured) <= 0.025 * measured, record["point_id"]
                checked += 1
    assert checked >= 60
