"""PyTorch's CUDA caching allocator, replayed over a sequence of allocations and frees, to predict
the reserved-memory peak (what decides an out-of-memory error) from first principles.

The rules are those of c10/cuda/CUDACachingAllocator.cpp (PyTorch 2.x, `expandable_segments` off,
no `max_split_size_mb`):
- a request is rounded up to a multiple of 512 bytes (`round_size`);
- requests of at most 1 MiB come from the small pool (2 MiB segments), larger ones from the large
  pool; a new large segment is 20 MiB for requests under 10 MiB, else the request rounded up to a
  multiple of 2 MiB (`get_allocation_size`);
- a request takes the smallest cached free block of its pool and stream that is large enough
  (best fit, `get_free_block`), split when the remainder is over 1 MiB (large pool) or at least 512 bytes
  (small pool) (`should_split`); only when no block fits is a new segment cudaMalloc'ed;
- a freed block merges with free neighbours of the same segment; segments are never returned
  (`torch.cuda.empty_cache` is not called), except that a cudaMalloc that would pass the device
  frees every wholly free cached segment first and retries (`release_cached_blocks`).

So reserved memory only grows, and it grows when a large request finds the cached blocks too small
or split by smaller tensors that are still alive: the fragmentation that a fitted "blocks of
slack" factor used to stand for. Pure Python; a step of a few thousand events replays in
milliseconds.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MIB = 1024 * 1024
SMALL_REQUEST = 1 * MIB
SMALL_SEGMENT = 2 * MIB
MEDIUM_SEGMENT = 20 * MIB
MEDIUM_REQUEST = 10 * MIB
ROUND = 512
LARGE_ROUND = 2 * MIB
MAIN_STREAM, REDUCTION_STREAM = 0, 1
# cuBLAS's workspace per handle (CUBLAS_WORKSPACE_CONFIG's default :4096:8, 8 × 4 MiB), taken from
# the caching allocator at a thread's first matrix product and kept: one for the Python thread's
# forward, one for autograd's backward thread.
CUBLAS_WORKSPACE = 8 * 4 * MIB


def round_size(size: int) -> int:
    """`round_size`: at least 512 bytes, a multiple of 512."""
    return max(ROUND, -(-size // ROUND) * ROUND)


def segment_size(size: int) -> int:
    """`get_allocation_size`: the cudaMalloc made for a request no cached block can serve."""
    if size <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if size < MEDIUM_REQUEST:
        return MEDIUM_SEGMENT
    return -(-size // LARGE_ROUND) * LARGE_ROUND


class _Block:
    """A span of one segment; neighbours linked for merging on free."""

    __slots__ = ("segment", "offset", "size", "free", "prev", "next")

    def __init__(self, segment: int, offset: int, size: int):
        self.segment, self.offset, self.size, self.free = segment, offset, size, True
        self.prev: _Block | None = None
        self.next: _Block | None = None


def _absorb(left: "_Block", right: "_Block") -> None:
    """Merge `right` into its free neighbour `left` (same segment, `right` just after it)."""
    left.size += right.size
    left.next = right.next
    if right.next is not None:
        right.next.prev = left


@dataclass
class CachingAllocator:
    """A replay of the caching allocator; `reserved`/`allocated` are bytes, `peak_*` their highs."""

    capacity: int = 1 << 62
    reserved: int = 0
    allocated: int = 0
    peak_reserved: int = 0
    peak_allocated: int = 0
    # the peak since `track_from` (replay's): the training steps' peak without the engine's set-up
    tracked_peak_allocated: int = 0
    _free: dict = field(default_factory=dict)
    _live: dict = field(default_factory=dict)
    _segments: dict = field(default_factory=dict)
    _next_segment: int = 0

    def malloc(self, key: object, size: int, stream: int = 0) -> None:
        """Allocate `size` bytes under `key` (any hashable name, freed by `free(key)`) on `stream`:
        a cached block serves only requests of the stream it was allocated on (the BlockPool's
        ordering compares the stream first, so `get_free_block` never crosses streams)."""
        size = -(-size // ROUND) * ROUND or ROUND
        pool = (size <= SMALL_REQUEST, stream)
        block = self._take_free(pool, size) or self._new_segment(pool, size)
        block.free = False
        self._live[key] = (block, pool)
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        if self.allocated > self.tracked_peak_allocated:
            self.tracked_peak_allocated = self.allocated

    def free(self, key: object) -> None:
        """Return `key`'s block to the cache, merged with free neighbours of its segment."""
        block, pool = self._live.pop(key)
        self.allocated -= block.size
        block.free = True
        after = block.next
        if after is not None and after.free:
            self._unlist(pool, after)
            _absorb(block, after)
        before = block.prev
        if before is not None and before.free:
            self._unlist(pool, before)
            _absorb(before, block)
            block = before
        self._list(pool, block)

    def is_live(self, key: object) -> bool:
        """Whether `key` holds a block."""
        return key in self._live

    def _list(self, pool: tuple[bool, int], block: _Block) -> None:
        keys, blocks = self._free.setdefault(pool, ([], {}))
        index = (block.size, block.segment, block.offset)
        bisect.insort(keys, index)
        blocks[index] = block

    def _unlist(self, pool: tuple[bool, int], block: _Block) -> None:
        keys, blocks = self._free[pool]
        index = (block.size, block.segment, block.offset)
        del keys[bisect.bisect_left(keys, index)]
        del blocks[index]

    def _take_free(self, pool: tuple[bool, int], size: int) -> _Block | None:
        lists = self._free.get(pool)
        if lists is None:
            return None
        keys, blocks = lists
        position = bisect.bisect_left(keys, (size,))
        if position == len(keys):
            return None
        block = blocks.pop(keys.pop(position))
        remainder = block.size - size
        if remainder > (0 if pool[0] else SMALL_REQUEST) and remainder >= ROUND:
            rest = _Block(block.segment, block.offset + size, remainder)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            index = (remainder, rest.segment, rest.offset)
            bisect.insort(keys, index)
            blocks[index] = rest
        return block

    def _new_segment(self, pool: tuple[bool, int], size: int) -> _Block:
        grant = SMALL_SEGMENT if pool[0] else segment_size(size)
        if self.reserved + grant > self.capacity:
            self._release_cached()
        segment = self._next_segment
        self._next_segment += 1
        block = _Block(segment, 0, grant)
        self._segments[segment] = (block, pool)
        self.reserved += grant
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        self._list(pool, block)
        return self._take_free(pool, size)

    def _release_cached(self) -> None:
        """cudaMalloc failed: give back every segment that holds no live block, then retry."""
        for segment, (first, pool) in list(self._segments.items()):
            if first.free and first.next is None and first.offset == 0:
                self._unlist(pool, first)
                self.reserved -= first.size
                del self._segments[segment]


@dataclass
class Trace:
    """The ("malloc", key, bytes, stream) / ("free", key) events `replay` reads, recorded as a model
    of a step makes and drops tensors; requests under 1 MiB are left out (the small pool's 2 MiB
    segments hold them without moving the peak), and freeing a key not live is a no-op."""

    events: list = field(default_factory=list)
    live: set = field(default_factory=set)
    counter: int = 0
    persistent: dict = field(default_factory=dict)

    def once(self, name: str, size: int, stream: int = MAIN_STREAM) -> str:
        """A block made the first time it is asked for and never freed (a library's workspace)."""
        if name not in self.persistent:
            self.persistent[name] = self.malloc(name, size, stream)
        return self.persistent[name]

    def malloc(self, name: str, size: int, stream: int = MAIN_STREAM) -> str:
        self.counter += 1
        key = f"{name}#{self.counter}"
        if size >= SMALL_REQUEST:
            self.events.append(("malloc", key, size, stream))
            self.live.add(key)
        return key

    def free(self, *keys: str) -> None:
        for key in keys:
            if key in self.live:
                self.live.discard(key)
                self.events.append(("free", key))


def replay(events, capacity: int = 1 << 62, track_from: int = 0) -> CachingAllocator:
    """Run ("malloc", key, bytes, stream) / ("free", key) events through a fresh allocator;
    `tracked_peak_allocated` is the peak from event `track_from` on (what is live then included)."""
    allocator = CachingAllocator(capacity=capacity)
    for index, event in enumerate(events):
        if index == track_from:
            allocator.tracked_peak_allocated = allocator.allocated
        if event[0] == "malloc":
            allocator.malloc(event[1], event[2], event[3])
        else:
            allocator.free(event[1])
    return allocator
