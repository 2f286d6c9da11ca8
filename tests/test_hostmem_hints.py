"""Items 13-16 of issue 16: host memory is planned, nothing-fits hints are verified, the runners-up
reason is the ranking's comparison, and the runners-up table reads at 80 columns."""

import json
from dataclasses import replace

import pytest

from zeroplan.adapters.gpus import ChosenGPU
from zeroplan.adapters.hostmem import node_host_memory, probe_host_bytes
from zeroplan.cli.main import main
from zeroplan.core.errors import DoesNotFit, InvalidInput
from zeroplan.core.hints import Request, verified_hints
from zeroplan.core.hostmem import HOST_HEADROOM, host_memory
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.planner import TIE_BREAKS, rank_key, recommend, why_not
from zeroplan.core.profiles import load_gpu, load_model

A100 = load_gpu("a100-80gb")


def test_host_memory_stated_over_probed_over_profile():
    assert host_memory(512, 10 * 2**30, A100).bytes_per_node == 512 * 2**30
    assert "probed" in host_memory(None, 10 * 2**30, A100).origin
    assumed = host_memory(None, None, A100)
    assert assumed.bytes_per_node == 2048 * 2**30 and "assumed" in assumed.origin
    assert assumed.budget_bytes == int(2048 * 2**30 * (1 - HOST_HEADROOM))
    with pytest.raises(InvalidInput):
        host_memory(-1, None, A100)


def test_this_nodes_ram_is_read_only_when_its_gpu_was_probed(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree: 1 kB\n")
    assert probe_host_bytes(meminfo) == 16384 * 1024
    assert probe_host_bytes(tmp_path / "missing") is None
    named = node_host_memory(None, ChosenGPU(A100, "--gpu"))
    assert "assumed" in named.origin


def test_108b_on_8_gpus_no_longer_needs_more_host_ram_than_a_node_has():
    host = host_memory(None, None, A100)
    result = recommend(load_model("108b"), TrainShape(), Plan(gpus_per_node=8), A100, 128, host=host)
    assert result.best.memory.cpu_bytes_per_node <= host.budget_bytes
    rejected = [c for c in result.others if "host RAM" in c.rejected_because]
    assert rejected and all(c.memory.cpu_bytes_per_node > host.budget_bytes for c in rejected)


def test_hints_are_verified_and_never_repeat_what_is_allowed():
    request = Request(load_model("108b"), TrainShape(), Plan(gpus_per_node=8), A100, 128, 0.05, False, True,
                      host_memory(None, None, A100))
    with pytest.raises(DoesNotFit):
        request.plan()
    hints = verified_hints(request)
    assert hints and hints[0].options.startswith("allow CPU offload")
    allowed = replace(request, allow_offload=True, host=host_memory(256, None, A100))
    for hint in verified_hints(allowed):
        assert "offload" not in hint.options
        assert hint.predicted_tokens_per_s > 0


def test_nothing_fits_with_json_prints_the_reason_and_verified_hints(capsys, tmp_path):
    code = main(["recommend", "--model", "108b", "--gpus", "8", "--no-offload", "--json", "--gpu", "a100-80gb",
                 "--out", str(tmp_path / "ds.json")])
    out, _ = capsys.readouterr()
    payload = json.loads(out)
    assert code == 3 and payload["fits"] is False and "no plan fits" in payload["reason"]
    assert payload["would_fit_with"] and payload["host_memory"]["bytes_per_node"] > 0
    assert not (tmp_path / "ds.json").exists()


def test_recommend_states_host_memory_in_json(capsys, tmp_path):
    code = main(["recommend", "--model", "8b", "--gpus", "8", "--json", "--gpu", "a100-80gb",
                 "--host-memory-gib", "256", "--out", str(tmp_path / "ds.json")])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["host_memory"]["bytes_per_node"] == 256 * 2**30
    assert "--host-memory-gib" in payload["host_memory"]["origin"]
    assert "cpu_bytes_per_node" in payload["recommended"]


def test_the_reason_is_the_first_tie_break_that_differs():
    result = recommend(load_model("40b"), TrainShape(), Plan(gpus_per_node=8, nodes=2), A100, 128)
    fastest = min(c.time.step_s for c in (result.best, *result.others) if c.fits)
    for candidate in (c for c in result.others if c.fits):
        assert rank_key(candidate, fastest) >= rank_key(result.best, fastest)
        assert candidate.rejected_because == why_not(candidate, result.best, fastest)
        if candidate.rejected_because.startswith("as fast"):
            keys = [key for key, _ in TIE_BREAKS]
            first = next(k for k in keys if k(candidate) != k(result.best))
            assert first(candidate) > first(result.best)
    assert not any("more complex plan" in c.rejected_because for c in result.others)


def test_a_zero0_tie_is_told_it_lost_to_the_stage_preference():
    # 8B ZeRO-0 and ZeRO-1 on 8 GPUs move the same bytes: if they tie, ZeRO-0 is told why.
    result = recommend(load_model("8b"), TrainShape(), Plan(gpus_per_node=8), A100, 128)
    zero0 = [c for c in result.others if c.fits and c.plan.stage == 0 and c.rejected_because.startswith("as fast")]
    for candidate in zero0:
        assert "ZeRO-1 preferred to ZeRO-0" in candidate.rejected_because or "offload" in candidate.rejected_because


def test_runners_up_fit_80_columns(capsys, tmp_path):
    from rich.console import Console

    from zeroplan.cli.recommend import runners_table

    main(["recommend", "--model", "40b", "--gpus", "16", "--json", "--gpu", "a100-80gb",
          "--out", str(tmp_path / "ds.json")])
    alternatives = json.loads(capsys.readouterr().out)["alternatives"]
    console = Console(width=80, record=True, color_system=None)
    for alt in alternatives[:12]:  # each row alone: no cell may wrap onto more than 2 lines
        console.print(runners_table([alt]))
        text = console.export_text(clear=True)
        body = [line for line in text.splitlines() if line.strip()]
        rows = body[body.index(next(line for line in body if line.strip().startswith("─"))) + 1:]
        rows = [line for line in rows if not line.strip().startswith(("mb×acc", "optimizer and"))]
        assert 1 <= len(rows) <= 2, text
        assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
