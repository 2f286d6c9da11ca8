"""What CPU offload runs at on this node: pinned and pageable host<->device copy bandwidth, and
DeepSpeed's CPU Adam throughput (elements per second at the node's thread count). The step-time
model's offload terms take these figures; measure them on your own node, they depend on its CPU,
memory channels and PCIe topology.

    python benchmarks/host_offload.py --out host_offload.json [--adam-elems 500000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone


def copy_bandwidth(torch, nbytes: int, pinned: bool, repeats: int = 5) -> dict:
    """GB/s of one host->device and one device->host copy of `nbytes`, median of `repeats`."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, copy in (("h2d", lambda: device.copy_(host, non_blocking=pinned)),
                       ("d2h", lambda: host.copy_(device, non_blocking=pinned))):
        copy()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            copy()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[f"{name}_gbps"] = nbytes / statistics.median(times) / 1e9
    return out


def cpu_adam_throughput(torch, elems: int, repeats: int = 3) -> dict:
    """Elements per second of DeepSpeedCPUAdam's step over one fp32 tensor of `elems`."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    param = torch.nn.Parameter(torch.zeros(elems, dtype=torch.float32))
    param.grad = torch.full_like(param, 1e-3)
    optimizer = DeepSpeedCPUAdam([param], lr=1e-5)
    optimizer.step()  # the first step allocates the moments
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"adam_elems": elems, "adam_step_s": seconds, "adam_elems_per_s": elems / seconds,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--copy-bytes", type=int, default=1 << 30)
    parser.add_argument("--adam-elems", type=int, default=500_000_000)
    args = parser.parse_args()
    import torch

    result = {"device": torch.cuda.get_device_name(0), "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__}
    result["pinned"] = copy_bandwidth(torch, args.copy_bytes, pinned=True)
    result["pageable"] = copy_bandwidth(torch, args.copy_bytes, pinned=False)
    result.update(cpu_adam_throughput(torch, args.adam_elems))
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
