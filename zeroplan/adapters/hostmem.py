"""This node's RAM, read from /proc/meminfo (Linux). Never raises: no file or no MemTotal line
means 'not probed' (None)."""

from __future__ import annotations

from pathlib import Path

from zeroplan.adapters.gpus import ChosenGPU
from zeroplan.core.hostmem import HostMemory, host_memory

MEMINFO = Path("/proc/meminfo")


def probe_host_bytes(meminfo: Path = MEMINFO) -> int | None:
    """MemTotal in bytes, or None where it cannot be read."""
    try:
        text = meminfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "MemTotal:" and parts[1].isdigit():
            return int(parts[1]) * 1024  # the kernel writes kB meaning KiB
    return None


def node_host_memory(stated_gib: float | None, chosen: ChosenGPU) -> HostMemory:
    """The host memory to plan with (core.hostmem.host_memory): this node's RAM is read only when
    the GPU was probed here too, so planning with --gpu for another cluster does not use it."""
    probed = probe_host_bytes() if stated_gib is None and chosen.probed else None
    return host_memory(stated_gib, probed, chosen.profile)
