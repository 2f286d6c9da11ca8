"""NVML adapter (nvidia-ml-py): what GPUs this node has. Never raises: no NVML, no driver or an
NVML error all mean 'no GPU found', with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProbedGPU:
    """One GPU as NVML sees it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    nvlink_peers: tuple[int, ...] = ()


@dataclass(frozen=True)
class ProbeResult:
    """The node's GPUs, driver and CUDA versions, or why none were found."""

    gpus: tuple[ProbedGPU, ...] = ()
    driver_version: str = ""
    cuda_version: str = ""
    reason: str = ""
    nvlink_links: dict[int, int] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        """Whether at least one GPU answered."""
        return bool(self.gpus)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvlink_peers(pynvml, handle, pci_bus_ids: dict[str, int]) -> tuple[int, ...]:
    peers = []
    for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                continue
            remote = _text(pynvml.nvmlDeviceGetNvLinkRemotePciInfo_v2(handle, link).busId)
        except Exception:  # noqa: BLE001 - NVML raises its own error class per missing feature
            continue
        peer = pci_bus_ids.get(remote.lower())
        if peer is not None:
            peers.append(peer)
    return tuple(sorted(set(peers)))


def probe() -> ProbeResult:
    """Query NVML; any failure becomes a ProbeResult with no GPUs and the reason."""
    try:
        import pynvml
    except ImportError:
        return ProbeResult(reason="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as error:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return ProbeResult(reason=f"NVML unavailable: {_text(error) or type(error).__name__}")
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        bus_ids = {_text(pynvml.nvmlDeviceGetPciInfo(h).busId).lower(): i for i, h in enumerate(handles)}
        gpus = []
        for index, handle in enumerate(handles):
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(ProbedGPU(index=index, name=_text(pynvml.nvmlDeviceGetName(handle)),
                                  total_bytes=int(memory.total), free_bytes=int(memory.free),
                                  used_bytes=int(memory.used),
                                  nvlink_peers=_nvlink_peers(pynvml, handle, bus_ids)))
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}"
        if not gpus:
            return ProbeResult(driver_version=driver, cuda_version=cuda_text, reason="NVML found no GPU")
        return ProbeResult(gpus=tuple(gpus), driver_version=driver, cuda_version=cuda_text)
    except Exception as error:  # noqa: BLE001 - any NVML error means we cannot trust the probe
        return ProbeResult(reason=f"NVML query failed: {_text(error) or type(error).__name__}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a half-initialised NVML may fail too
            pass
