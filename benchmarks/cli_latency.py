"""Wall-clock latency of `zeroplan recommend` and `zeroplan estimate`, each run as a fresh process.

    .venv/bin/python benchmarks/cli_latency.py --out reports/cli_latency

Every command goes through the installed console script (.venv/bin/zeroplan), exactly as a user
types it. Before the timed runs each command is run once untimed: that warm-up fills the OS file
cache (the interpreter, typer, rich, torch and DeepSpeed files read from disk), so the timed runs
measure a warm machine, not a cold disk. Each timed run is a new process; the median, min and max
wall seconds are reported.

zeroplan remembers between runs the configs DeepSpeed accepted and its allocator replays
(zeroplan.adapters.cache). Each zeroplan command is timed both ways: "asked before" runs share one
cache folder, which the warm-up fills (the same question asked again: another --out, --json, a
rerun in CI); "first time" runs each get a new, empty cache folder (a question never asked on this
machine: every replay computed, DeepSpeed imported to validate).

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


# name -> (argv, cache): "before" shares a cache folder with the warm-up, "first" gets an empty one
# per run, None is not zeroplan.
def commands(tmp: Path) -> dict[str, tuple[list[str], str | None]]:
    """Name -> (argv, cache) of each timed command; recommend writes its config under `tmp`."""
    zeroplan = str(VENV_BIN / "zeroplan")
    recommend = [zeroplan, "recommend", "--model", "40b", "--gpus", "16", "--out", str(tmp / "ds.json"), "--force"]
    estimate = [zeroplan, "estimate", "--model", "40b", "--gpus", "16", "--stage", "3", "--json"]
    return {
        "recommend": (recommend, "before"),
        "recommend_first_time": (recommend, "first"),
        "estimate": (estimate, "before"),
        "estimate_first_time": (estimate, "first"),
        "python_startup": ([str(VENV_BIN / "python"), "-c", "pass"], None),
        "import_deepspeed": ([str(VENV_BIN / "python"), "-c", "import deepspeed"], None),
    }


def run_once(argv: list[str], cache_dir: str | None = None) -> float:
    """Wall seconds of one fresh process (zeroplan's cache in `cache_dir`, a new empty folder when
    None); raises if it fails (a failing command is not a latency)."""
    with tempfile.TemporaryDirectory() as empty:
        env = {**os.environ, "ZEROPLAN_CACHE_DIR": cache_dir or empty}
        env.pop("ZEROPLAN_CACHE", None)
        start = time.perf_counter()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, cwd=ROOT, env=env)
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


def time_command(argv: list[str], cache: str | None, repeats: int) -> dict:
    """One untimed warm-up, then `repeats` timed fresh processes; with `cache` "before" they share
    the warm-up's cache folder, else each has an empty one."""
    with tempfile.TemporaryDirectory() as shared:
        kept = shared if cache == "before" else None
        run_once(argv, kept)
        times = [run_once(argv, kept) for _ in range(repeats)]
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
        f"Each command ran once untimed (a warm-up that fills the OS file cache and, asked before, "
        f"zeroplan's own), then "
        f"{results['repeats']} timed runs as fresh processes through the installed console script. "
        f"1-minute load average before the runs: {results['load_before']} (waited while above "
        f"{results['max_load']}; seen while waiting: {results['loads_seen']}); after: {results['load_after']}.", "",
        "zeroplan's cache (zeroplan.adapters.cache): *asked before*, the runs share the folder the "
        "warm-up filled; *first time*, each run starts with an empty one.", "",
        "| command | cache | median s | min s | max s |", "|---|---|---:|---:|---:|",
    ]
    cache_words = {"before": "asked before", "first": "first time", None: ""}
    for name, timing in results["timings"].items():
        lines.append(f"| `{' '.join(results['commands'][name])}` | {cache_words[results['caches'][name]]} | "
                     f"{timing['median_s']:.3f} | {timing['min_s']:.3f} | {timing['max_s']:.3f} |")
    verdict = "meets" if results["recommend_meets_target"] else "misses"
    first = results["timings"]["recommend_first_time"]["median_s"]
    lines += ["", f"Target: recommend under {TARGET_RECOMMEND_MEDIAN_S} s median; asked before, this run {verdict} "
              f"it; a first-time question took {first:.2f} s median (DeepSpeed's import, timed above, is its floor).",
              ""]
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
        timings = {name: time_command(command, cache, args.repeats) for name, (command, cache) in argvs.items()}
        shown = {name: [a if not a.startswith(tmp) else "<tmp>/" + Path(a).name for a in command]
                 for name, (command, _) in argvs.items()}
    shown = {name: [Path(a).relative_to(ROOT).as_posix() if a.startswith(str(ROOT)) else a for a in command]
             for name, command in shown.items()}
    results = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "script": "benchmarks/cli_latency.py", "machine": machine(), "repeats": args.repeats,
        "warmup": "one untimed run per command before the timed runs (fills the OS file cache and, asked before, zeroplan's)",
        "max_load": args.max_load, "loads_seen": seen, "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2), "commands": shown,
        "caches": {name: cache for name, (_, cache) in argvs.items()}, "timings": timings,
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
