"""Wall-clock latency of `zeroplan recommend` and `zeroplan estimate`, each run as a fresh process.

    .venv/bin/python benchmarks/cli_latency.py --out reports/cli_latency

Every command goes through the installed console script (.venv/bin/zeroplan), exactly as a user
types it. Before the timed runs each command is run once untimed: that warm-up only fills the OS
file cache (the interpreter, typer, rich, torch and DeepSpeed files read from disk), so the timed
runs measure a warm machine, not a cold disk; nothing else carries over between processes. Each
timed run is a new process; the median, min and max wall seconds are reported.

The runs wait for a quiet machine: while the 1-minute load average is above --max-load the script
sleeps and looks again (up to --load-tries times), then runs anyway and says so. The load averages
before and after the runs are recorded beside the timings, since other jobs on a 2-core machine
move the numbers.

Also timed, as floors: `python -c pass` with the venv's interpreter (the cost of any Python
process on this machine) and `python -c "import deepspeed"` (torch and DeepSpeed imported, which
recommend's validation child and estimate's DeepSpeed-estimator column both pay).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
TARGET_RECOMMEND_MEDIAN_S = 1.5


def commands(tmp: Path) -> dict[str, list[str]]:
    """Name -> argv of each timed command; recommend writes its config under `tmp`."""
    zeroplan = str(VENV_BIN / "zeroplan")
    return {
        "recommend": [zeroplan, "recommend", "--model", "40b", "--gpus", "16", "--out", str(tmp / "ds.json")],
        "estimate": [zeroplan, "estimate", "--model", "40b", "--gpus", "16", "--stage", "3", "--json"],
        "python_startup": [str(VENV_BIN / "python"), "-c", "pass"],
        "import_deepspeed": [str(VENV_BIN / "python"), "-c", "import deepspeed"],
    }


def run_once(argv: list[str]) -> float:
    """Wall seconds of one fresh process; raises if it fails (a failing command is not a latency)."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return elapsed


def wait_for_quiet(max_load: float, tries: int, pause_s: float) -> list[float]:
    """The 1-minute load averages seen while waiting for one at or below max_load."""
    seen = []
    for attempt in range(tries):
        load = os.getloadavg()[0]
        seen.append(round(load, 2))
        if load <= max_load:
            break
        if attempt + 1 < tries:
            print(f"load average {load:.2f} > {max_load}; waiting {pause_s:.0f} s", file=sys.stderr)
            time.sleep(pause_s)
    return seen


def time_command(argv: list[str], repeats: int) -> dict:
    """One untimed warm-up (file cache only), then `repeats` timed fresh processes."""
    run_once(argv)
    times = [run_once(argv) for _ in range(repeats)]
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3), "runs_s": [round(t, 3) for t in times]}


def machine() -> dict:
    """nproc, CPU model, memory and Python of this machine."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "python": platform.python_version(),
            "platform": platform.platform()}


def render_readme(results: dict) -> str:
    """The report as markdown."""
    m = results["machine"]
    lines = [
        "# CLI latency", "",
        f"Measured {results['date_utc']} by `{results['script']}` on {m['nproc']} cores ({m['cpu_model']}), "
        f"Python {m['python']}.", "",
        f"Each command ran once untimed (a warm-up that only fills the OS file cache), then "
        f"{results['repeats']} timed runs as fresh processes through the installed console script. "
        f"1-minute load average before the runs: {results['load_before']} (waited while above "
        f"{results['max_load']}; seen while waiting: {results['loads_seen']}); after: {results['load_after']}.", "",
        "| command | median s | min s | max s |", "|---|---:|---:|---:|",
    ]
    for name, timing in results["timings"].items():
        lines.append(f"| `{' '.join(results['commands'][name])}` | {timing['median_s']:.3f} | "
                     f"{timing['min_s']:.3f} | {timing['max_s']:.3f} |")
    verdict = "meets" if results["recommend_meets_target"] else "misses"
    lines += ["", f"Target: recommend under {TARGET_RECOMMEND_MEDIAN_S} s median; this run {verdict} it.", ""]
    if results.get("notes"):
        lines += ["## Notes", "", results["notes"].strip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Time the commands and write README.md and results.json under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "cli_latency")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-load", type=float, default=1.0)
    parser.add_argument("--load-tries", type=int, default=6)
    parser.add_argument("--load-pause-s", type=float, default=30.0)
    parser.add_argument("--notes", type=Path, help="a markdown file whose text is added to the README")
    args = parser.parse_args(argv)
    from zeroplan.core.atomic import write_files_atomic

    seen = wait_for_quiet(args.max_load, args.load_tries, args.load_pause_s)
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        argvs = commands(Path(tmp))
        timings = {name: time_command(command, args.repeats) for name, command in argvs.items()}
        shown = {name: [a if not a.startswith(tmp) else "<tmp>/" + Path(a).name for a in command]
                 for name, command in argvs.items()}
    shown = {name: [Path(a).relative_to(ROOT).as_posix() if a.startswith(str(ROOT)) else a for a in command]
             for name, command in shown.items()}
    results = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "script": "benchmarks/cli_latency.py", "machine": machine(), "repeats": args.repeats,
        "warmup": "one untimed run per command before the timed runs; it only fills the OS file cache",
        "max_load": args.max_load, "loads_seen": seen, "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2), "commands": shown, "timings": timings,
        "target_recommend_median_s": TARGET_RECOMMEND_MEDIAN_S,
        "recommend_meets_target": timings["recommend"]["median_s"] < TARGET_RECOMMEND_MEDIAN_S,
        "notes": args.notes.read_text() if args.notes else "",
    }
    write_files_atomic({args.out / "results.json": json.dumps(results, indent=2) + "\n",
                        args.out / "README.md": render_readme(results)})
    print(json.dumps(timings, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
