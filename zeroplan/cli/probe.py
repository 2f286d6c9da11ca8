"""The GPUs of this node through NVML: names, memory, driver, CUDA and NVLink links."""

from __future__ import annotations

from zeroplan.cli import options as o


def probe_payload(result) -> dict:
    """The JSON object `probe --json` prints."""
    from zeroplan.core.profiles import match_gpu_name

    gpus = []
    for gpu in result.gpus:
        matched = match_gpu_name(gpu.name)
        gpus.append({"index": gpu.index, "name": gpu.name, "total_bytes": gpu.total_bytes,
                     "free_bytes": gpu.free_bytes, "used_bytes": gpu.used_bytes,
                     "nvlink_peers": list(gpu.nvlink_peers), "profile": matched.name if matched else None})
    return {"found": result.found, "count": len(gpus), "gpus": gpus, "driver_version": result.driver_version,
            "cuda_version": result.cuda_version, "reason": result.reason}


def command(json_out: o.Json = False):
    """The GPUs of this node through NVML: names, memory, driver, CUDA and NVLink links."""
    from zeroplan.adapters.nvml import probe

    payload = probe_payload(probe())
    if json_out:
        o.print_json(payload)
        return 0
    if not payload["found"]:
        print(f"no GPU found ({payload['reason']})")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{payload['count']} GPU(s), driver {payload['driver_version']}, CUDA {payload['cuda_version']}")
    for column in ("#", "name", "total GiB", "free GiB", "NVLink peers", "zeroplan profile"):
        table.add_column(column)
    for gpu in payload["gpus"]:
        table.add_row(str(gpu["index"]), gpu["name"], o.gib(gpu["total_bytes"]), o.gib(gpu["free_bytes"]),
                      ",".join(map(str, gpu["nvlink_peers"])) or "-", gpu["profile"] or "(none: default speeds)")
    Console().print(table)
    return 0
