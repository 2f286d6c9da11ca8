"""Command lines that start `zeroplan.runner.train` on every rank, and a helper that runs one spec.

torchrun (`python -m torch.distributed.run`) and DeepSpeed's launcher (`python -m
deepspeed.launcher.runner`) are both started through the current interpreter, so the command
works without either script being on PATH. One spec by hand:

    python -m zeroplan.runner.launch OUT_DIR model=1b stage=2 micro_batch=4 seq_len=8192 tiles=7 \
        frozen='["vision"]' world_size=1 [launcher=deepspeed]

(values are JSON where they parse as JSON, strings otherwise); prints the result JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from zeroplan.core.bounded import MAX_INPUT_BYTES, read_bounded
from zeroplan.core.errors import InvalidInput
from zeroplan.core.run import RunSpec

LAUNCHERS = ("torchrun", "deepspeed")
TRAIN_MODULE = "zeroplan.runner.train"


def free_port() -> int:
    """A TCP port free right now on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(spec: RunSpec, spec_path: str, result_path: str, launcher: str = "torchrun",
                   master_port: int | None = None) -> list[str]:
    """The argv that runs `spec` on `spec.world_size` local ranks (one process per GPU)."""
    port = str(master_port if master_port is not None else free_port())
    script = ["--spec", str(spec_path), "--result", str(result_path)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                str(spec.world_size), "--master_addr", "127.0.0.1", "--master_port", port,
                "-m", TRAIN_MODULE, *script]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(spec.world_size),
                "--master_port", port, "--module", TRAIN_MODULE, *script]
    raise InvalidInput(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")


def run_spec(spec: RunSpec, workdir: str | os.PathLike, launcher: str = "torchrun", timeout_s: float | None = None,
             env: dict | None = None) -> dict:
    """Write the spec under `workdir`, run it to the end, and return the result JSON (or a result
    with status "timeout"/"error" when the ranks wrote none). The log is workdir/run.log."""
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = folder / "spec.json", folder / "result.json", folder / "run.log"
    spec_path.write_text(spec.to_json(), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    command = launch_command(spec, str(spec_path), str(result_path), launcher)
    status = None
    with open(log_path, "wb") as log:
        try:
            completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                       env={**os.environ, **(env or {})})
            exit_code = completed.returncode
        except subprocess.TimeoutExpired:
            status, exit_code = "timeout", None
    if result_path.is_file():
        result = json.loads(read_bounded(result_path, MAX_INPUT_BYTES * 16, "result file"))
    else:
        result = {"status": status or "error", "reason": f"no result written (exit {exit_code}); see {log_path}"}
    result["exit_code"] = exit_code
    return result


def main(argv: list[str] | None = None) -> int:
    """Run one spec given as key=value pairs; print its result; exit 0 only when it is ok."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    fields, launcher = {}, "torchrun"
    for pair in args[1:]:
        key, _, text = pair.partition("=")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if key == "launcher":
            launcher = value
        else:
            fields[key] = value
    result = run_spec(RunSpec.from_dict(fields), args[0], launcher=launcher)
    print(json.dumps(result, indent=1, sort_keys=True, default=str))
    return 0 if result.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
