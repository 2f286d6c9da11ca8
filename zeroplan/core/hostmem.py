"""Host (CPU) memory per node: how much a plan may use, and where that figure came from.

Offloading the optimizer (and, under ZeRO-3, the parameters) moves their bytes into the node's RAM:
`MemoryBreakdown.cpu_bytes_per_node` counts them. A plan whose host bytes do not fit the node's
memory leaves `HOST_HEADROOM` free for the operating system, the data loader's workers and the
pinned staging buffers, like the GPU's headroom."""

from __future__ import annotations

from dataclasses import dataclass

from zeroplan.core.errors import InvalidInput
from zeroplan.core.profiles import GPUProfile

HOST_HEADROOM = 0.10
MAX_HOST_GIB = 1 << 20  # 1 PiB per node: anything larger is a typo


@dataclass(frozen=True)
class HostMemory:
    """A node's RAM in bytes and a sentence saying where the figure came from."""

    bytes_per_node: int
    origin: str

    @property
    def budget_bytes(self) -> int:
        """What offloaded model states may use: the node's RAM less HOST_HEADROOM."""
        return int(self.bytes_per_node * (1 - HOST_HEADROOM))

    def as_dict(self) -> dict:
        """The fields `recommend --json` documents under `host_memory`."""
        return {"bytes_per_node": self.bytes_per_node, "budget_bytes": self.budget_bytes,
                "headroom": HOST_HEADROOM, "origin": self.origin}


def host_memory(stated_gib: float | None, probed_bytes: int | None, gpu: GPUProfile) -> HostMemory:
    """The host memory to plan with: stated (--host-memory-gib, per node) over probed (this node's
    RAM, only when its GPU was probed too: planning for another machine must not use this one's)
    over the GPU profile's typical node (documented in the profile), so a figure is always stated."""
    if stated_gib is not None:
        if isinstance(stated_gib, bool) or not 0 < stated_gib <= MAX_HOST_GIB or stated_gib != stated_gib:
            raise InvalidInput(f"--host-memory-gib must be a positive number of GiB per node up to {MAX_HOST_GIB}, "
                               f"got {stated_gib}")
        return HostMemory(int(stated_gib * 2**30), f"{stated_gib:g} GiB per node (--host-memory-gib)")
    if probed_bytes:
        return HostMemory(probed_bytes, f"{probed_bytes / 2**30:,.0f} GiB per node (probed on this node)")
    if gpu.host_memory_bytes_per_node:
        return HostMemory(gpu.host_memory_bytes_per_node,
                          f"{gpu.host_memory_bytes_per_node / 2**30:,.0f} GiB per node, assumed from the GPU "
                          f"profile ({gpu.host_memory_source or gpu.name}); state yours with --host-memory-gib")
    return HostMemory(0, "unknown (the GPU profile names no typical node): offload plans are not checked "
                         "against host memory; state it with --host-memory-gib")


def host_fits(cpu_bytes_per_node: int, host: HostMemory | None) -> bool:
    """Whether a plan's offloaded bytes fit the node's budget (no figure: nothing to check)."""
    return host is None or not host.bytes_per_node or cpu_bytes_per_node <= host.budget_bytes
