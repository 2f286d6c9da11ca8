"""Fuzz every zeroplan verb in-process with hostile arguments and files; write a summary.

Each invocation goes through `zeroplan.cli.main.main(argv)` in a fresh working folder and is held
to the CLI's contract: no traceback and no exception escaping main, an exit status the verb may
give (0; 1 only for `generate --check` drift; 2 for an error; 3 for recommend/validate "does not
fit"), every error exactly one line on stderr, and nothing written (nor any folder created) when
the command fails. The same strategies drive tests/test_fuzz_cli.py (a fast CI run); this script
runs them for many more invocations:

    .venv/bin/python benchmarks/fuzz_cli.py --invocations 10000 --out reports/fuzz

Two things are replaced so the run stays in-process and never trains: `bench` never launches a
point (zeroplan.lab.bench.run_process answers "error" at once), and recommend's DeepSpeed validation
runs in this process instead of a child (the same validate_config the child calls).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
VERBS = ("estimate", "recommend", "generate", "validate", "probe", "bench", "report", "calibrate", "rehearse")
EXIT_CODES = {verb: {0, 2} for verb in VERBS}
EXIT_CODES["recommend"] |= {3}
EXIT_CODES["validate"] |= {3}
EXIT_CODES["rehearse"] |= {1, 3}  # a rank failed / does not fit (on a GPU node; without one, 2)
EXIT_CODES["estimate"] |= {3}  # the plan does not fit (issue 16: the same statuses as recommend and validate)
TRACEBACK_MARK = "Traceback (most recent call last)"
DETAIL_PREFIX = "  "  # recommend's nothing-fits lines after the first: node RAM, verified hints


def _json_says_nothing_fits(stdout: str) -> bool:
    """recommend --json when nothing fits: one JSON object on stdout whose `fits` is false."""
    try:
        payload = json.loads(stdout)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("fits") is False


@dataclass(frozen=True)
class GenFile:
    """A file made up for one invocation: written into its working folder before the run and
    replaced in argv by its path."""

    suffix: str
    content: bytes


@dataclass
class Outcome:
    """One invocation and what was wrong with it (`problems` empty when it kept the contract)."""

    verb: str
    argv: list[str]
    exit_code: int | None
    stdout: str
    stderr: str
    escaped: str = ""
    written_on_failure: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- hostile files, made once per run

VALID_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 8,
    "bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "overlap_comm": True},
    "gradient_clipping": 1.0,
}
VALID_RECORD = {"point_id": "p0", "model": "tiny", "stage": 2, "status": "ok", "micro_batch": 1, "seq_len": 64,
                "tiles": 2, "grad_ckpt": True, "world_size": 1, "measured_peak_allocated_bytes": 1 << 30,
                "predicted_peak_bytes": 1 << 30, "tokens_per_s": 100.0}
VALID_SWEEP = ('name = "fz"\nlauncher = "torchrun"\ntimeout_s = 30\n[grid]\nmodels = ["tiny"]\nstages = [0, 3]\n'
               'seq_len = [64]\ntiles = [2]\n[run]\nsteps = 2\nwarmup_steps = 1\nworld_size = 1\n')
# Four finished H100 runs (reports/h100_microbatch): enough for calibrate's fits to run.
CALIBRATION_RESULTS = ROOT / "reports/h100_microbatch/results.jsonl"
VALID_SPEC = '[[config]]\nmodel = "tiny"\ngpus = 2\nstage = 2\nmicro_batch = 1\ngradient_accumulation = 2\nseq_len = 512\n'


def make_fixtures(folder: Path) -> dict[str, Path]:
    """The shared input files: valid ones (so runs reach deep code) and hostile ones."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny = (ROOT / "zeroplan/profiles/models/tiny-internvl.toml").read_text()
    files = {
        "model.toml": tiny,
        "gpu.toml": (ROOT / "zeroplan/profiles/gpus/h100-80gb.toml").read_text(),
        "ds.json": json.dumps(VALID_DS_CONFIG),
        "results.jsonl": json.dumps(VALID_RECORD) + "\n" + json.dumps({**VALID_RECORD, "point_id": "p1", "stage": 3}) + "\n",
        "sweep.toml": VALID_SWEEP,
        "spec.toml": VALID_SPEC,
        "empty.json": "",
        "empty.toml": "",
        "deep.json": "[" * 200_000 + "]" * 200_000,
        "deep_object.json": '{"a":' * 100_000 + "1" + "}" * 100_000,
        "deep.toml": "a = " + "[" * 100_000 + "]" * 100_000 + "\n",
        "deep_table.toml": "a = " + "{b = " * 5_000 + "1" + "}" * 5_000 + "\n",
        "huge_int.json": '{"train_batch_size": ' + "9" * 5000 + "}",
        "huge_int.toml": "x = " + "9" * 5000 + "\n",
        "huge_int.jsonl": '{"point_id": "p", "stage": ' + "9" * 5000 + "}\n",
        "huge_float.json": '{"train_batch_size": 1e999, "zero_optimization": {"stage": -1e999}}',
        "nan.json": '{"train_batch_size": NaN, "gradient_clipping": Infinity}',
        "wrong_types.json": json.dumps({"train_batch_size": "eight", "zero_optimization": [1, 2],
                                        "bf16": "yes", "gradient_accumulation_steps": True}),
        "wrong_types.toml": 'name = 3\naliases = "x"\n[llm]\nhidden_size = "big"\n[[config]]\nmodel = 8\ngpus = "x"\n',
        "array.json": "[1, 2, 3]",
        "duplicate.json": '{"train_batch_size": 8, "train_batch_size": 16}',
        "not_utf8.json": b"\xff\xfe\x00{\x80\x81",
        "binary.toml": bytes(range(256)) * 64,
        "binary.jsonl": bytes(range(256)) * 64,
        "torn.jsonl": json.dumps(VALID_RECORD) + '\n{"point_id": "torn',
        "plain.txt": "a regular file: paths under it cannot be created\n",
        "calib.jsonl": CALIBRATION_RESULTS.read_bytes(),
        "config_no_newline.json": json.dumps(VALID_DS_CONFIG),
    }
    for name, content in files.items():
        path = folder / name
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
    with open(folder / "ten_mb.json", "wb") as handle:
        handle.write(b'{"a": "' + b"x" * (10 * 1024 * 1024) + b'"}')
    (folder / "a_folder").mkdir(exist_ok=True)
    if not (folder / "fifo.jsonl").exists():
        os.mkfifo(folder / "fifo.jsonl")  # a reader that opens it blocking hangs: none may
    for first, second in (("loop_a.json", "loop_b.json"), ("loop_a.toml", "loop_b.toml")):
        for link, target in ((first, second), (second, first)):
            if not (folder / link).is_symlink():
                os.symlink(folder / target, folder / link)
    paths = {name: folder / name for name in files}
    paths.update({name: folder / name for name in ("ten_mb.json", "a_folder", "loop_a.json", "loop_a.toml",
                                                    "fifo.jsonl")})
    return paths


# ---------------------------------------------------------------- strategies

SURROGATES = ["\udcff", "\udc80abc"]  # undecodable bytes in argv arrive as lone surrogates


def _text():
    chars = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
    return st.one_of(
        st.text(chars, max_size=12),
        st.text(chars, min_size=300, max_size=3000),
        st.sampled_from(["", " ", "-", "--", "ü∞💥", "名前", "a" * 10_000, "../../etc/passwd", "$(id)", "`id`",
                         "'; rm -rf /", "%s%n", "{0}", "[bold]x[/bold]", "\n", "a\nb", "\r\n", "\t", *SURROGATES]),
    )


def _numbers():
    return st.one_of(
        st.integers(-2**70, 2**70).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(["0", "-1", "-0", "1e400", "nan", "NaN", "inf", "-inf", "9" * 400, "0x10", "1_000",
                         "1.5", " 8", "8 ", "٣", "²", "None", "true"]),
    )


def _hostile_value():
    return st.one_of(_text(), _numbers())


def _paths(fixtures: dict[str, Path], *names: str):
    return st.sampled_from([str(fixtures[name]) for name in names])


def _hostile_paths(fixtures: dict[str, Path]):
    """Input paths that must each end in one clear line."""
    names = ("empty.json", "empty.toml", "deep.json", "deep_object.json", "deep.toml", "deep_table.toml",
             "huge_int.json", "huge_int.toml", "huge_int.jsonl", "huge_float.json", "nan.json", "wrong_types.json",
             "wrong_types.toml", "array.json", "duplicate.json", "not_utf8.json", "binary.toml", "binary.jsonl",
             "torn.jsonl", "plain.txt", "ten_mb.json", "a_folder", "loop_a.json", "loop_a.toml", "fifo.jsonl",
             "config_no_newline.json")
    return st.one_of(
        _paths(fixtures, *names),
        st.sampled_from(["missing.json", "missing.toml", "no/such/dir/x.jsonl", str(fixtures["plain.txt"]) + "/x.json",
                         "/dev/zero", "/dev/null"]),
        _text(),
    )


def _out_paths(fixtures: dict[str, Path]):
    """Output paths: ordinary ones in the working folder and ones that cannot be written."""
    plain = str(fixtures["plain.txt"])
    return st.one_of(
        st.sampled_from(["out.json", "sub/dir/out.json", "out", "sub/out"]),
        st.sampled_from([plain + "/x.json", plain + "/sub/x", plain, str(fixtures["a_folder"]), "", ".", "..",
                         "x" * 300 + ".json", "ü∞/💥.json", str(fixtures["loop_a.json"])]),
    )


def _mutated_json(base: dict):
    """A valid JSON object with one value (or the whole) replaced by something hostile."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(allow_nan=True),
                     st.text(max_size=20), st.lists(st.integers(), max_size=3), st.just({"x": {"y": []}}))

    @st.composite
    def build(draw):
        data = dict(base)
        key = draw(st.sampled_from(sorted(data) + ["unknown_key", ""]))
        data[key] = draw(leaf)
        if draw(st.booleans()):
            data.pop(draw(st.sampled_from(sorted(data))), None)
        text = json.dumps(data, allow_nan=True)
        if draw(st.integers(0, 9)) == 0:
            cut = draw(st.integers(0, len(text)))
            text = text[:cut]
        return text.encode()

    return build()


def _mutated_toml(base: str):
    """A valid TOML text with one line replaced, dropped or duplicated, or junk appended."""

    @st.composite
    def build(draw):
        lines = base.splitlines()
        index = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["replace_value", "drop", "duplicate", "append"]))
        if action == "replace_value" and "=" in lines[index]:
            key = lines[index].split("=", 1)[0]
            value = draw(st.sampled_from(["-1", "0", "1e400", "nan", "inf", '"x"', "[]", "{}", "true", "9" * 30,
                                          '"' + "ü" * 50 + '"', "[1, \"a\"]", "[[[]]]", "-9223372036854775809"]))
            lines[index] = f"{key}= {value}"
        elif action == "drop":
            del lines[index]
        elif action == "duplicate":
            lines.insert(index, lines[index])
        else:
            lines.append(draw(st.sampled_from(["[grid]", "[[config]]", "junk", "x = ", "models = [\"1b\"]",
                                                "launcher = \"$(id)\"", "name = \"../../x.json\""])))
        return ("\n".join(lines) + "\n").encode()

    return build()


def _hostile_leaf():
    return st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(allow_nan=True),
                     st.sampled_from([0, -1, 10**9, 10**12, 1e12, 1e9, 1e300, "x", "", "1", [], {}, [1, "a"]]),
                     st.text(max_size=20))


def _mutated_results():
    """The four calibration runs with one of them damaged: a top-level field or a spec field
    replaced (null, a string, zero, 1e12 steps, a world of 1e9...) or dropped, the spec replaced
    by a string, or the line cut."""
    base = [json.loads(line) for line in CALIBRATION_RESULTS.read_text().splitlines() if line.strip()]

    @st.composite
    def build(draw):
        records = [dict(record, spec=dict(record["spec"])) for record in base]
        target = records[draw(st.integers(0, len(records) - 1))]
        where = draw(st.sampled_from(["top", "spec", "spec", "whole_spec", "drop"]))
        if where == "top":
            key = draw(st.sampled_from(["measured_peak_allocated_bytes", "measured_peak_reserved_bytes",
                                        "nvml_peak_used_bytes", "step_time_s", "tiles_per_sample", "step_tiles",
                                        "model", "status", "point_id", "gpu_profile", "device"]))
            target[key] = draw(_hostile_leaf())
        elif where == "spec":
            key = draw(st.sampled_from(sorted(target["spec"]) + ["unknown"]))
            target["spec"][key] = draw(_hostile_leaf())
        elif where == "whole_spec":
            target["spec"] = draw(st.one_of(st.text(max_size=10), st.none(), st.integers(), st.just([])))
        else:
            target.pop(draw(st.sampled_from(sorted(target))), None)
        text = "\n".join(json.dumps(record, allow_nan=True) for record in records) + "\n"
        if draw(st.integers(0, 9)) == 0:
            text = text[:draw(st.integers(0, len(text)))]
        return text.encode()

    return build()


def _gen(suffix: str, content):
    return content.map(lambda data: GenFile(suffix, data))


def _input_file(fixtures, valid_names: tuple[str, ...], generated):
    return st.one_of(_paths(fixtures, *valid_names), _hostile_paths(fixtures), generated)


@dataclass(frozen=True)
class Option:
    """An option of a verb: its flag, good values and hostile ones (None: a flag with no value)."""

    flag: str
    good: st.SearchStrategy | None = None
    bad: st.SearchStrategy | None = None
    required: bool = False


def _options(fixtures: dict[str, Path]) -> dict[str, tuple[list, list[Option]]]:
    """Per verb: (positional (good, hostile) strategy pairs, options)."""
    small = st.sampled_from(["1", "2", "4", "8"])
    model = st.one_of(st.sampled_from(["tiny", "1b", "2b", "8b", "78b", "40b", "InternVL2_5-8B"]),
                      _paths(fixtures, "model.toml"))
    model_bad = st.one_of(_hostile_value(), _hostile_paths(fixtures),
                          _gen(".toml", _mutated_toml((ROOT / "zeroplan/profiles/models/tiny-internvl.toml").read_text())),
                          _gen(".json", _mutated_json({"name": "x", "vision": "tiny-vit", "downsample_ratio": 0.5})))
    gpu = st.one_of(st.sampled_from(["h100-80gb", "a100-40gb", "rtx4090", "H100", "l40s"]), _paths(fixtures, "gpu.toml"))
    gpu_bad = st.one_of(_hostile_value(), _hostile_paths(fixtures),
                        _gen(".toml", _mutated_toml((ROOT / "zeroplan/profiles/gpus/h100-80gb.toml").read_text())))
    num, text = _numbers(), _hostile_value()
    cluster = [Option("--gpus", st.sampled_from(["1", "2", "8", "16", "64"]), num),
               Option("--nodes", st.sampled_from(["1", "2"]), num),
               Option("--gpus-per-node", st.sampled_from(["4", "8"]), num),
               Option("--gpu", gpu, gpu_bad)]
    shape = [Option("--seq-len", st.sampled_from(["512", "4096", "8192"]), num),
             Option("--tiles", st.sampled_from(["1", "7", "12"]), num),
             Option("--freeze", st.sampled_from(["vision", "llm", "projector", "vision,llm"]), text),
             Option("--lora-rank", st.sampled_from(["0", "8", "64"]), num)]
    offload = st.sampled_from(["none", "cpu", "nvme"])
    json_flag = Option("--json")
    ds_json = _gen(".json", _mutated_json(VALID_DS_CONFIG))
    jsonl_gen = st.one_of(_gen(".jsonl", _mutated_json(VALID_RECORD).map(lambda b: b + b"\n")),
                          _gen(".jsonl", st.binary(max_size=200)))
    return {
        "estimate": ([], [Option("--model", model, model_bad, required=True), *cluster, *shape,
                          Option("--stage", st.sampled_from(["0", "1", "2", "3"]), num),
                          Option("--micro-batch", small, num), Option("--grad-ckpt"), Option("--no-grad-ckpt"),
                          Option("--offload-optimizer", offload, text), Option("--offload-params", offload, text),
                          Option("--reduce-bucket", st.just("500000000"), num),
                          Option("--prefetch-bucket", st.just("50000000"), num),
                          Option("--max-live", st.just("1000000000"), num),
                          Option("--persistence", st.just("100000"), num), json_flag]),
        "recommend": ([], [Option("--model", model, model_bad, required=True), *cluster, *shape,
                           Option("--global-batch", st.sampled_from(["8", "16", "128"]), num),
                           Option("--headroom", st.sampled_from(["0.05", "0.1", "0"]), num),
                           Option("--no-offload"), Option("--flavour", st.sampled_from(["concrete", "hf"]), text),
                           Option("--out", st.sampled_from(["ds.json", "cfg/ds.json"]), _out_paths(fixtures),
                                  required=True), json_flag]),
        "generate": ([], [Option("--out", st.sampled_from(["configs", "a/b"]), _out_paths(fixtures), required=True),
                          Option("--flavour", st.sampled_from(["concrete", "hf"]), text),
                          Option("--spec", _paths(fixtures, "spec.toml"),
                                 _input_file(fixtures, ("spec.toml",), _gen(".toml", _mutated_toml(VALID_SPEC))),
                                 required=True),
                          Option("--check")]),
        "validate": ([(_paths(fixtures, "ds.json"), st.one_of(_hostile_paths(fixtures), ds_json))],
                     [Option("--model", model, model_bad, required=True), *cluster, *shape,
                      Option("--micro-batch", small, num), Option("--grad-accum", small, num),
                      Option("--grad-ckpt"), Option("--no-grad-ckpt"), json_flag]),
        "probe": ([], [json_flag]),
        "rehearse": ([], [Option("--model", model, model_bad, required=True),
                          Option("--gpus", st.sampled_from(["1", "8", "64"]), num, required=True),
                          Option("--gpu", gpu, gpu_bad), *shape,
                          Option("--config", _paths(fixtures, "ds.json"), st.one_of(_hostile_paths(fixtures), ds_json)),
                          Option("--stage", st.sampled_from(["0", "1", "2", "3"]), num),
                          Option("--micro-batch", small, num), Option("--grad-accum", small, num),
                          Option("--ranks", st.sampled_from(["0", "0,7", "3"]), text),
                          Option("--steps", st.sampled_from(["2", "4"]), num),
                          Option("--results", st.sampled_from(["r.jsonl"]), _out_paths(fixtures)), json_flag]),
        "bench": ([], [Option("--results", st.sampled_from(["results.jsonl", "r/results.jsonl"]),
                              st.one_of(_out_paths(fixtures), _hostile_paths(fixtures)), required=True),
                       Option("--sweep", _paths(fixtures, "sweep.toml"),
                              _input_file(fixtures, ("sweep.toml",), _gen(".toml", _mutated_toml(VALID_SWEEP)))),
                       Option("--dry-run", required=True),
                       Option("--launcher", st.sampled_from(["torchrun", "deepspeed"]), text),
                       Option("--timeout-s", st.sampled_from(["30", "0.5"]), num),
                       Option("--model", st.sampled_from(["tiny", "1b,2b", "tiny,1b"]), model_bad),
                       Option("--stages", st.sampled_from(["0,1,2,3", "2"]), text),
                       Option("--micro-batch", st.sampled_from(["1", "1,2"]), text),
                       Option("--grad-ckpt", st.sampled_from(["on", "on,off"]), text),
                       Option("--offload", st.sampled_from(["none", "optimizer", "optimizer+params"]), text),
                       Option("--seq-len", st.sampled_from(["64", "4096"]), text),
                       Option("--tiles", st.sampled_from(["2", "7"]), text),
                       Option("--frozen", st.sampled_from(["none", "vision", "vision+projector"]), text),
                       Option("--lora-rank", st.sampled_from(["0", "8"]), text),
                       Option("--gpus", st.sampled_from(["1", "2"]), num),
                       Option("--steps", st.sampled_from(["2", "8"]), num),
                       Option("--warmup-steps", st.sampled_from(["1", "3"]), num),
                       Option("--gpu", gpu, gpu_bad),
                       Option("--attn", st.sampled_from(["sdpa", "eager"]), text)]),
        "report": ([(_paths(fixtures, "results.jsonl", "torn.jsonl"), st.one_of(_hostile_paths(fixtures), jsonl_gen))],
                   [Option("--out", st.sampled_from(["rep", "a/b/rep"]), _out_paths(fixtures))]),
        "calibrate": ([(st.one_of(_paths(fixtures, "calib.jsonl"), _gen(".jsonl", _mutated_results())), st.one_of(_hostile_paths(fixtures), jsonl_gen,
                                                                    _gen(".jsonl", _mutated_results())))],
                      [Option("--gpu", st.one_of(st.sampled_from(["h100", "h100-80gb"]), _paths(fixtures, "gpu.toml")),
                              gpu_bad, required=True),
                       Option("--out", st.sampled_from(["cal.toml", "p/cal.toml"]),
                              st.one_of(_out_paths(fixtures), st.sampled_from(["x.toml/y.toml", "'q\"u.toml"]))),
                       json_flag]),
    }


def argv_strategy(verb: str, fixtures: dict[str, Path]):
    """argv lists for one verb: mostly-valid options with some replaced by hostile values, left
    out, given twice, unknown options, a trailing option missing its value, stray words."""
    positionals, options = _options(fixtures)[verb]
    unknown = st.sampled_from(["--bogus", "--model-name", "-x", "--json=yes", "--", "--out=", "--help"])

    @st.composite
    def build(draw):
        hostile = draw(st.sampled_from([0, 0, 0, 1, 1, 1, 2, 3, 6]))  # how many things go wrong
        bad = set(draw(st.lists(st.integers(0, len(options)), max_size=hostile))) if hostile else set()
        words: list = []
        for good, bad_value in positionals:
            if len(options) in bad:
                if draw(st.booleans()):
                    words.append([draw(bad_value)])
            else:
                words.append([draw(good)])
        for index, option in enumerate(options):
            if index in bad:
                mode = draw(st.sampled_from(["bad", "bad", "omit"]))
            else:
                mode = "good" if option.required or draw(st.booleans()) else "omit"
            if mode == "omit":
                continue
            if option.good is None:  # a flag
                words.append([option.flag] if mode == "good" else [option.flag, draw(_hostile_value())])
            else:
                value = draw(option.good if mode == "good" or option.bad is None else option.bad)
                words.append([option.flag, value])
        if hostile and draw(st.integers(0, 5)) == 0:
            words.append([draw(unknown)])
        if hostile and draw(st.integers(0, 7)) == 0:
            words.append([draw(_hostile_value())])
        words = draw(st.permutations(words)) if draw(st.booleans()) else words
        argv = [verb] + [word for group in words for word in group]
        if hostile and draw(st.integers(0, 7)) == 0 and options:
            argv.append(draw(st.sampled_from(options)).flag)  # option value missing
        return argv
    return build()


# ---------------------------------------------------------------- running one invocation


def _snapshot(*folders: Path) -> dict[str, tuple]:
    """Every entry under the folders (files, folders, links) with size and mtime."""
    seen: dict[str, tuple] = {}
    for folder in folders:
        for base, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = os.path.join(base, name)
                stat = os.lstat(path)
                seen[path] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    return seen


def _materialize(argv: list, workdir: Path) -> list[str]:
    out = []
    for index, word in enumerate(argv):
        if isinstance(word, GenFile):
            path = workdir / f"input_{index}{word.suffix}"
            path.write_bytes(word.content)
            out.append(str(path))
        else:
            out.append(word)
    return out


def _stream() -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", newline="\n")


def _read(stream: io.TextIOWrapper) -> str:
    stream.flush()
    return stream.buffer.getvalue().decode("utf-8", errors="replace")


def invoke(argv: list, scratch: Path, fixtures_dir: Path) -> Outcome:
    """Run main(argv) in a fresh folder under `scratch` with stdout/stderr captured the way a
    terminal would take them (UTF-8; stdout strict, stderr backslash-escaped), and check it."""
    from zeroplan.cli.main import main

    workdir = Path(tempfile.mkdtemp(dir=scratch))
    old_cwd = os.getcwd()
    try:
        os.chdir(workdir)
        words = _materialize(argv, workdir)
        before = _snapshot(workdir, fixtures_dir)
        stdout, stderr = _stream(), io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
        escaped, code = "", None
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = main(list(words))
        except BaseException as error:  # noqa: BLE001 - anything escaping main is what we look for
            if isinstance(error, KeyboardInterrupt):
                raise
            escaped = "".join(traceback.format_exception(error))
        after = _snapshot(workdir, fixtures_dir)
    finally:
        os.chdir(old_cwd)
        shutil.rmtree(workdir, ignore_errors=True)
    outcome = Outcome(verb=str(argv[0]), argv=words, exit_code=code, stdout=_read(stdout), stderr=_read(stderr),
                      escaped=escaped)
    outcome.written_on_failure = sorted(set(after) - set(before) | {p for p in before if after.get(p) != before[p]}) \
        if code != 0 else []
    outcome.problems = problems(outcome)
    return outcome


def problems(outcome: Outcome) -> list[str]:
    """How the invocation broke the CLI's contract."""
    found = []
    if outcome.escaped:
        found.append("exception escaped main: " + outcome.escaped.strip().splitlines()[-1])
    if TRACEBACK_MARK in outcome.stdout or TRACEBACK_MARK in outcome.stderr:
        found.append("traceback printed")
    code, verb = outcome.exit_code, outcome.verb
    allowed = EXIT_CODES.get(verb, {0, 2}) | ({1} if verb == "generate" and "--check" in outcome.argv else set())
    if code is not None and code not in allowed:
        found.append(f"exit status {code} not in {sorted(allowed)}")
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if code == 2 and (len(lines) != 1 or not lines[0].startswith("zeroplan: error: ")):
        found.append(f"error is {len(lines)} line(s) on stderr, not one 'zeroplan: error:' line")
    if code == 3 and verb == "recommend" and "--json" in outcome.argv:
        if not _json_says_nothing_fits(outcome.stdout):
            found.append("'nothing fits' with --json is not one JSON object with fits false")
    elif code == 3 and verb == "recommend" and (not lines or not lines[0].startswith("zeroplan: ")
                                                or any(not l.startswith(DETAIL_PREFIX) for l in lines[1:])):
        found.append("'nothing fits' is not one line plus indented detail lines")
    if code in (1, 3) and verb != "recommend" and len(lines) > 1:
        found.append(f"{len(lines)} lines on stderr for exit status {code}")
    if outcome.written_on_failure:
        found.append(f"{len(outcome.written_on_failure)} path(s) written or changed on failure: "
                     + ", ".join(outcome.written_on_failure[:3]))
    return found


# ---------------------------------------------------------------- keeping it in-process and safe


class InProcessValidator:
    """Stands in for BackgroundValidator: the same validate_config, without a child process."""

    def start(self) -> "InProcessValidator":
        """Nothing to start."""
        return self

    def validate(self, config, world_size, timeout_s: float = 120):
        from zeroplan.adapters.deepspeed_adapter import validate_config

        return validate_config(config, world_size), ""

    def close(self) -> None:
        """Nothing to stop."""


def never_launch(command, log_path, timeout_s, grace_s=0.0):
    """Stands in for zeroplan.lab.bench.run_process: no point is ever started."""
    from zeroplan.lab.bench import PointOutcome

    Path(log_path).write_text("not launched: fuzzing\n")
    return PointOutcome(exit_code=1, timed_out=False, wall_s=0.0, log_tail="not launched: fuzzing")


@contextlib.contextmanager
def contained():
    """Swap in InProcessValidator and never_launch for the duration."""
    import zeroplan.adapters.validator_process as validator_process
    import zeroplan.lab.bench as bench

    saved = validator_process.BackgroundValidator, bench.run_process
    validator_process.BackgroundValidator, bench.run_process = InProcessValidator, never_launch
    try:
        yield
    finally:
        validator_process.BackgroundValidator, bench.run_process = saved


def fuzz_settings(examples: int, seed: int | None = None) -> settings:
    """Hypothesis settings for fuzzing: no deadline, no shrinking database, generation only."""
    return settings(max_examples=examples, deadline=None, database=None, derandomize=seed is not None,
                    phases=[Phase.generate], suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------- the benchmark


def run_verb(verb: str, examples: int, fixtures: dict[str, Path], fixtures_dir: Path, scratch: Path,
             outcomes: list[Outcome], seed: int | None = None) -> None:
    """Feed `examples` generated argv lists for `verb` through invoke, collecting the outcomes.
    With a `seed` the examples are the same on every run (the test suite); without one each run
    explores new ones (this benchmark)."""

    @fuzz_settings(examples, seed)
    @given(argv=argv_strategy(verb, fixtures))
    def body(argv):
        outcomes.append(invoke(argv, scratch, fixtures_dir))

    body()


def summarize(outcomes: list[Outcome], wall_s: float) -> dict:
    """The figures of a run."""
    failures = [o for o in outcomes if o.problems]
    return {
        "invocations": len(outcomes),
        "per_verb": dict(Counter(o.verb for o in outcomes)),
        "exit_codes": {str(k): v for k, v in sorted(Counter(o.exit_code for o in outcomes).items(),
                                                     key=lambda kv: (kv[0] is None, kv[0] or 0))},
        "exit_codes_per_verb": {verb: {str(k): v for k, v in sorted(Counter(
            o.exit_code for o in outcomes if o.verb == verb).items(), key=lambda kv: (kv[0] is None, kv[0] or 0))}
            for verb in VERBS},
        "tracebacks": sum(1 for o in outcomes if o.escaped or TRACEBACK_MARK in o.stdout + o.stderr),
        "exceptions_escaping_main": sum(1 for o in outcomes if o.escaped),
        "multi_line_errors": sum(1 for o in outcomes if any("line" in p and "stderr" in p or "suggestion" in p
                                                            for p in o.problems)),
        "bad_exit_codes": sum(1 for o in outcomes if any(p.startswith("exit status") for p in o.problems)),
        "files_written_on_failure": sum(1 for o in outcomes if o.written_on_failure),
        "contract_violations": len(failures),
        "first_violations": [{"argv": [w[:200] for w in o.argv], "exit_code": o.exit_code, "problems": o.problems,
                              "stderr_tail": o.stderr[-500:], "escaped_tail": o.escaped[-1500:]}
                             for o in failures[:20]],
        "wall_s": round(wall_s, 1),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPU cores, Python "
                   f"{platform.python_version()}",
        "command": "python benchmarks/fuzz_cli.py " + " ".join(sys.argv[1:]),
    }


def markdown(summary: dict) -> str:
    """summary.md: the figures in a few tables."""
    lines = ["# zeroplan CLI fuzzing", "",
             f"`{summary['command']}` — {summary['date']}, {summary['machine']}, {summary['wall_s']} s wall.", "",
             "Every verb driven in-process through `zeroplan.cli.main.main(argv)` with hypothesis-generated "
             "hostile arguments and files (see benchmarks/fuzz_cli.py). bench never launched a point; "
             "recommend validated in-process.", "",
             "| figure | value |", "|---|---|"]
    for key in ("invocations", "tracebacks", "exceptions_escaping_main", "multi_line_errors", "bad_exit_codes",
                "files_written_on_failure", "contract_violations", "wall_s"):
        lines.append(f"| {key.replace('_', ' ')} | {summary[key]} |")
    lines += ["", "| verb | invocations | exit statuses |", "|---|---|---|"]
    for verb in VERBS:
        codes = ", ".join(f"{code}: {count}" for code, count in summary["exit_codes_per_verb"][verb].items())
        lines.append(f"| {verb} | {summary['per_verb'].get(verb, 0)} | {codes} |")
    lines += ["", "Exit statuses overall: " + ", ".join(f"{k}: {v}" for k, v in summary["exit_codes"].items()), ""]
    if summary["first_violations"]:
        lines += ["## Violations (first 20)", ""]
        for item in summary["first_violations"]:
            lines.append(f"- `{' '.join(item['argv'])[:300]}` → {item['exit_code']}: {'; '.join(item['problems'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzing benchmark and write summary.md and summary.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--invocations", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=ROOT / "reports/fuzz")
    args = parser.parse_args(argv)
    per_verb = {verb: max(1, args.invocations // len(VERBS)) for verb in VERBS}
    per_verb["estimate"] += args.invocations - sum(per_verb.values())
    outcomes: list[Outcome] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zeroplan-fuzz-") as base, contained():
        fixtures_dir, scratch = Path(base) / "fixtures", Path(base) / "scratch"
        scratch.mkdir()
        fixtures = make_fixtures(fixtures_dir)
        for verb in VERBS:
            verb_started = time.monotonic()
            run_verb(verb, per_verb[verb], fixtures, fixtures_dir, scratch, outcomes)
            print(f"{verb}: {sum(1 for o in outcomes if o.verb == verb)} invocations, "
                  f"{sum(1 for o in outcomes if o.verb == verb and o.problems)} violations, "
                  f"{time.monotonic() - verb_started:.0f} s", file=sys.stderr, flush=True)
    summary = summarize(outcomes, time.monotonic() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    from zeroplan.core.atomic import write_files_atomic

    write_files_atomic({args.out / "summary.json": json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                        args.out / "summary.md": markdown(summary)})
    print(markdown(summary))
    return 0 if summary["contract_violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
