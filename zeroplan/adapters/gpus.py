"""Which GPU profile a command plans for: --gpu when given, else the probed GPU, else the default.

When the probed GPU has less free memory than its total (another process holds some), the plan
uses what is free."""

from __future__ import annotations

from dataclasses import dataclass, replace

from zeroplan.core.profiles import DEFAULT_GPU, GPUProfile, load_gpu, match_gpu_name


@dataclass(frozen=True)
class ChosenGPU:
    """The profile to plan for and a sentence saying where it came from."""

    profile: GPUProfile
    origin: str
    probed: bool = False  # found on this node by NVML (so this node's RAM is the node's RAM too)


def choose_gpu(name: str | None, probe=None) -> ChosenGPU:
    """Resolve the GPU profile. `probe` (for tests) replaces zeroplan.adapters.nvml.probe."""
    if name is not None:
        gpu = load_gpu(name)
        return ChosenGPU(gpu, f"GPU profile {gpu.name} (--gpu)")
    if probe is None:
        from zeroplan.adapters.nvml import probe
    result = probe()
    if not result.found:
        gpu = load_gpu(DEFAULT_GPU)
        return ChosenGPU(gpu, f"no GPU found ({result.reason}); using the default GPU profile {gpu.name}")
    first = result.gpus[0]
    matched = match_gpu_name(first.name)
    if matched is None:
        gpu = load_gpu(DEFAULT_GPU)
        return ChosenGPU(replace(gpu, name=first.name, memory_bytes=first.total_bytes),
                         f"probed {first.name} (no bundled profile: speeds of {gpu.name} assumed)", probed=True)
    origin = f"probed {first.name} ({len(result.gpus)} on this node)"
    if first.free_bytes < matched.memory_bytes:
        origin += (f"; planning with its free memory, {first.free_bytes / 2**30:.1f} of "
                   f"{first.total_bytes / 2**30:.1f} GiB")
        matched = replace(matched, memory_bytes=first.free_bytes)
    return ChosenGPU(matched, origin, probed=True)
