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

from bisect import bisect_left, insort
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


# Sizes and offsets are multiples of ROUND (512 bytes). In those units a free block's place in
# its pool is ordered as the allocator's BlockComparator orders it (size, then segment, then
# offset), packed in one integer (each in its own bit field) so that sorting and searching compare
# machine words.
_OFFSET_BITS, _SEGMENT_BITS = 40, 24
_SIZE_SHIFT = _OFFSET_BITS + _SEGMENT_BITS


class _Block:
    """A span of one segment; neighbours linked for merging on free. `pool` is its pool's free
    list: the order keys of the free blocks, sorted, and the blocks by key."""

    __slots__ = ("segment", "offset", "size", "free", "prev", "next", "key", "pool")

    def __init__(self, segment: int, offset: int, size: int, pool: tuple[list, dict]):
        self.segment, self.offset, self.size, self.free, self.pool = segment, offset, size, True, pool
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.key = _order(size, segment, offset)


def _order(size: int, segment: int, offset: int) -> int:
    """A free block's place in its pool's free list."""
    return ((size >> 9) << _SIZE_SHIFT) | (segment << _OFFSET_BITS) | (offset >> 9)


def _unlist(block: _Block) -> None:
    """Take a free block off its pool's free list."""
    keys, blocks = block.pool
    del keys[bisect_left(keys, block.key)]
    del blocks[block.key]


def _absorb(left: _Block, right: _Block) -> None:
    """Merge `right` into `left`, its neighbour just before it in the segment."""
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
    # the free lists by (stream, small or large pool)
    _pools: dict = field(default_factory=dict)
    _live: dict = field(default_factory=dict)
    _segments: dict = field(default_factory=dict)
    _next_segment: int = 0

    def malloc(self, key: object, size: int, stream: int = 0) -> None:
        """Allocate `size` bytes under `key` (any hashable name, freed by `free(key)`) on `stream`:
        a cached block serves only requests of the stream it was allocated on (the BlockPool's
        ordering compares the stream first, so `get_free_block` never crosses streams)."""
        size = -(-size // ROUND) * ROUND or ROUND
        small = size <= SMALL_REQUEST
        pool = self._pools.get((stream, small))
        if pool is None:
            pool = self._pools[(stream, small)] = ([], {})
        # get_free_block: the smallest free block of the pool that holds `size` (ties: the lower
        # segment, then the lower offset), split when the remainder is worth keeping
        keys, blocks = pool
        position = bisect_left(keys, (size >> 9) << _SIZE_SHIFT)
        if position < len(keys):
            block = blocks.pop(keys.pop(position))
        else:
            block = self._new_segment(pool, size, small)
        remainder = block.size - size
        if remainder > (0 if small else SMALL_REQUEST) and remainder >= ROUND:  # should_split
            rest = _Block(block.segment, block.offset + size, remainder, pool)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            insort(keys, rest.key)
            blocks[rest.key] = rest
        block.free = False
        self._live[key] = block
        allocated = self.allocated = self.allocated + block.size
        if allocated > self.tracked_peak_allocated:
            self.tracked_peak_allocated = allocated
            if allocated > self.peak_allocated:
                self.peak_allocated = allocated

    def free(self, key: object) -> None:
        """Return `key`'s block to the cache, merged with free neighbours of its segment."""
        block = self._live.pop(key)
        self.allocated -= block.size
        block.free = True
        after = block.next
        if after is not None and after.free:
            _unlist(after)
            _absorb(block, after)
        before = block.prev
        if before is not None and before.free:
            _unlist(before)
            _absorb(before, block)
            block = before
        block.key = index = _order(block.size, block.segment, block.offset)
        keys, blocks = block.pool
        insort(keys, index)
        blocks[index] = block

    def is_live(self, key: object) -> bool:
        """Whether `key` holds a block."""
        return key in self._live

    def _new_segment(self, pool: tuple[list, dict], size: int, small: bool) -> _Block:
        """No cached block fits: cudaMalloc a segment (`get_allocation_size`) to take `size` from."""
        grant = SMALL_SEGMENT if small else segment_size(size)
        if self.reserved + grant > self.capacity:
            self._release_cached()
        segment = self._next_segment
        self._next_segment += 1
        block = _Block(segment, 0, grant, pool)
        self._segments[segment] = block
        self.reserved += grant
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        return block

    def _release_cached(self) -> None:
        """cudaMalloc failed: give back every segment that holds no live block, then retry."""
        for segment, first in list(self._segments.items()):
            if first.free and first.next is None and first.offset == 0:
                _unlist(first)
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
    malloc, free = allocator.malloc, allocator.free
    parts = (events[:track_from], events[track_from:]) if track_from < len(events) else (events,)
    for number, part in enumerate(parts):
        if number == 1:
            allocator.tracked_peak_allocated = allocator.allocated
        for event in part:
            if event[0] == "malloc":
                malloc(event[1], event[2], event[3])
            else:
                free(event[1])
    return allocator
