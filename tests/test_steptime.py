"""The step-time model's terms and its calibration against the committed GPU runs (issue 6)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from zeroplan.lab.calibrate import fit_step_constants
from zeroplan.lab.jsonl import read
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import load_gpu, load_model, pad_vocab
from zeroplan.lab.stepfit import predicted_step_s, timed_run
from zeroplan.core.steptime import fused_loss_extra_bytes, step_terms, step_time

REPORTS = Path(__file__).resolve().parents[1] / "reports"
CALIBRATION = ("h100_check", "h100_matrix_long", "h100_stages_4b", "h100_stages", "h100_matrix_short",
               "h100_fast_2b", "h100_fast_stages", "h100_z3_steady", "h100_4b_fit")
SHAPE = TrainShape(seq_len=8192, tiles=8, grad_ckpt=False)
ONE_GPU = Plan(stage=1, gpus_per_node=1)


def _records(*sweeps):
    return [r for sweep in sweeps for r in read(REPORTS / sweep / "results.jsonl").records]


def test_calibrating_on_the_committed_runs_gives_the_committed_constants():
    h100 = load_gpu("h100")
    fitted = fit_step_constants(_records(*CALIBRATION), h100)
    for key, value in fitted.items():
        assert value == pytest.approx(h100.calibrated[key], rel=1e-3), key


def _fast_runs(sweep):
    return [(r, timed_run(r)) for r in _records(sweep) if r["status"] == "ok"]


@pytest.mark.parametrize("sweep,stages", [("h100_fast_2b", (1,)), ("h100_fast_stages", (0, 2)),
                                          ("h100_fast_4b_stages", (0,)), ("h200_fast_4b", (1,)),
                                          ("h100_4b_fit", (0, 1)), ("h100_microbatch", (1,)),
                                          ("h100_zero2_rows", (2,)), ("h100_4b_zero2", (2,))])
def test_tokens_per_s_of_the_fast_configurations_are_within_15_percent(sweep, stages):
    # What recommend plans below ZeRO-3: compiled layers, accumulation, the eager or the fused loss.
    checked = 0
    for record, run in _fast_runs(sweep):
        spec = record["spec"]
        if run.plan.stage not in stages or not spec.get("compile"):
            continue
        predicted_tokens = record["tokens_per_s"] * record["step_time_s"] / predicted_step_s(run)
        assert predicted_tokens == pytest.approx(record["tokens_per_s"], rel=0.15), run.label
        checked += 1
    assert checked >= 1


def test_a_misaligned_vocabulary_costs_the_lm_head_and_padding_removes_it():
    profile, h100 = load_model("2b"), load_gpu("h100")
    assert profile.llm.vocab_size % 8
    terms = step_terms(profile, SHAPE, ONE_GPU, h100, 1)
    padded = step_terms(pad_vocab(profile, 128), SHAPE, ONE_GPU, h100, 1)
    assert terms.misaligned_flops > 0 and padded.misaligned_flops == 0
    assert step_time(pad_vocab(profile, 128), SHAPE, ONE_GPU, h100, 1).step_s < step_time(
        profile, SHAPE, ONE_GPU, h100, 1).step_s


def test_accumulation_spreads_zero1_bookkeeping_but_zero2_pays_it_every_micro_step():
    profile, h100 = pad_vocab(load_model("2b"), 128), load_gpu("h100")
    one = step_terms(profile, SHAPE, ONE_GPU, h100, 1)
    sixteen = step_terms(profile, SHAPE, ONE_GPU, h100, 16)
    assert sixteen.tensor_visits == one.tensor_visits  # once per optimizer step
    zero2 = step_terms(profile, SHAPE, ONE_GPU.with_(stage=2), h100, 16)
    assert zero2.tensor_visits == 17 * one.tensor_visits
    per_micro = [step_time(profile, SHAPE, ONE_GPU, h100, n).step_s / n for n in (1, 4, 16)]
    assert per_micro[0] > per_micro[1] > per_micro[2]


def test_compiled_layers_and_checkpointing_change_the_layer_passes():
    profile, h100 = load_model("2b"), load_gpu("h100")
    layers = profile.llm.num_layers + profile.vision.num_layers
    eager = step_terms(profile, SHAPE, ONE_GPU, h100, 2)
    compiled = step_terms(profile, replace(SHAPE, compiled=True), ONE_GPU, h100, 2)
    ckpt = step_terms(profile, replace(SHAPE, grad_ckpt=True), ONE_GPU, h100, 2)
    assert (eager.eager_layer_passes, eager.compiled_layer_passes) == (2 * layers, 0)
    assert (compiled.eager_layer_passes, compiled.compiled_layer_passes) == (0, 2 * layers)
    assert ckpt.recomputed_layer_passes == 2 * layers and eager.recomputed_layer_passes == 0
    assert ckpt.compute_flops > eager.compute_flops


def test_the_fused_loss_rereads_the_lm_head_per_chunk():
    profile = pad_vocab(load_model("2b"), 128)  # 92,672 × 2,048: 46 per chunk factor → 256-token chunks
    extra = fused_loss_extra_bytes(profile, replace(SHAPE, kernels="liger-loss"))
    weight = 2 * profile.llm.vocab_size * profile.llm.hidden_size
    assert extra == 32 * 4 * weight - 4 * weight
    assert fused_loss_extra_bytes(profile, SHAPE) == 0


def test_speed_report_rows_match_the_committed_runs():
    rows = json.loads((REPORTS / "speed" / "rows.json").read_text())
    best = max((r for r in rows if r["status"] == "ok" and r["stage"] == 1 and "H100" in r["device"]
                and "2B" in r["model"]), key=lambda r: r["mfu"])
    assert best["mfu"] >= 0.40 and "compiled layers" in best["options"]


def test_offload_with_accumulation_pays_host_round_trips_only_where_deepspeed_reduces_each_micro_step():
    from zeroplan.core.steptime import offload_seconds

    profile, h100 = load_model("2b"), load_gpu("h100")
    shape = TrainShape(seq_len=4096, tiles=7)
    zero1 = Plan(stage=1, gpus_per_node=1, offload_optimizer="cpu")
    zero2 = Plan(stage=2, gpus_per_node=1, offload_optimizer="cpu")
    # ZeRO-1 reduces (and offloads) at the boundary only; ZeRO-2 every micro-step
    assert offload_seconds(profile, shape, zero1, h100, 4) == offload_seconds(profile, shape, zero1, h100, 1)
    assert offload_seconds(profile, shape, zero2, h100, 4) > offload_seconds(profile, shape, zero2, h100, 1)
    for record, run in _fast_runs("h100_offload_accum"):
        if run.plan.stage == 2:
            assert predicted_step_s(run) == pytest.approx(record["step_time_s"], rel=0.05)
        else:  # measured 2.76 s: no round trips, against 4.14 s for ZeRO-2
            assert record["step_time_s"] < 0.75 * next(r["step_time_s"] for r, x in _fast_runs("h100_offload_accum")
                                                       if x.plan.stage == 2)


# The overlap-aware combination (issue 13): the host queues kernels ahead of the GPU.
HARD_MAX = 64.0  # the largest exponent the fit tries: within 1.1 % of the larger of GPU and host time


def _overlap_values(gpu, exponent=HARD_MAX):
    from zeroplan.core.steptime import constants

    return {**constants(gpu), "overlap_exponent": exponent, "layer_gpu_s": 0.0005, "layer_overhead_s": 0.004}


def test_a_gpu_bound_step_hides_the_hosts_per_layer_cost():
    from zeroplan.core.steptime import gpu_seconds, host_seconds, seconds_of, serial_seconds

    profile, h200 = pad_vocab(load_model("2b"), 128), load_gpu("h200")
    big = TrainShape(seq_len=8192, tiles=8, grad_ckpt=False, micro_batch=4)  # large micro-batch, no checkpointing
    terms = step_terms(profile, big, ONE_GPU, h200, 4)
    values = _overlap_values(h200)
    gpu_s, host_s, serial_s = gpu_seconds(terms, h200, values), host_seconds(terms, values), serial_seconds(terms, values)
    assert gpu_s > 2 * host_s > 0
    assert seconds_of(terms, h200, values) <= gpu_s + serial_s + 1e-9
    # a host twice as slow still hides behind the GPU
    slower = {**values, "layer_overhead_s": 2 * values["layer_overhead_s"]}
    assert seconds_of(terms, h200, slower) == pytest.approx(seconds_of(terms, h200, values), rel=1e-6)
    # the additive model (exponent 1) pays it in full
    assert seconds_of(terms, h200, {**values, "overlap_exponent": 1.0}) == pytest.approx(gpu_s + host_s + serial_s)


def test_a_host_bound_step_follows_the_host():
    from zeroplan.core.steptime import gpu_seconds, host_seconds, seconds_of, serial_seconds

    profile, h200 = load_model("1b"), load_gpu("h200")
    small = TrainShape(seq_len=1024, tiles=1, grad_ckpt=True)
    terms = step_terms(profile, small, ONE_GPU.with_(stage=3), h200, 2)
    values = _overlap_values(h200)
    gpu_s, host_s, serial_s = gpu_seconds(terms, h200, values), host_seconds(terms, values), serial_seconds(terms, values)
    assert host_s > 2 * gpu_s > 0
    assert seconds_of(terms, h200, values) == pytest.approx(host_s + serial_s, rel=1e-6)
    slower = {**values, "stage3_module_overhead_s": 2 * values["stage3_module_overhead_s"]}
    extra = terms.module_passes * values["stage3_module_overhead_s"]
    assert seconds_of(terms, h200, slower) - seconds_of(terms, h200, values) == pytest.approx(extra, rel=1e-6)


def test_the_combination_lies_between_the_larger_and_the_sum():
    from zeroplan.core.steptime import overlapped

    for exponent in (1.0, 2.0, 4.0, 64.0):
        combined = overlapped(0.3, 0.2, exponent)
        assert 0.3 <= combined <= 0.5 + 1e-12
    assert overlapped(0.3, 0.2, 1.0) == pytest.approx(0.5)
    assert overlapped(0.3, 0.2, 2.0) > overlapped(0.3, 0.2, 4.0) > overlapped(0.3, 0.2, 64.0)
    assert overlapped(0.0, 0.0, 4.0) == 0.0


def test_the_fit_finds_overlap_where_the_runs_have_it():
    # Runs timed as if host and GPU overlapped fully: the fit must pick the largest exponent and put
    # the per-layer cost back on the host, not add it to the GPU.
    from zeroplan.core.steptime import seconds_of
    from zeroplan.lab.stepfit import TimedRun, fit

    h100 = load_gpu("h100")
    truth = {**_overlap_values(h100), "layer_gpu_s": 0.0, "compute_efficiency": 0.6}
    runs = []
    for name in ("1b", "2b", "4b"):
        profile = pad_vocab(load_model(name), 128)
        for micro, seq, ckpt, accumulation in ((1, 2048, False, 1), (1, 8192, False, 4), (4, 8192, True, 2),
                                               (2, 4096, True, 1), (1, 4096, False, 8)):
            shape = TrainShape(seq_len=seq, tiles=4, grad_ckpt=ckpt, micro_batch=micro)
            for stage in (0, 2, 3):
                plan = Plan(stage=stage, gpus_per_node=1)
                terms = step_terms(profile, shape, plan, h100, accumulation)
                runs.append(TimedRun(f"{name} {micro} {seq} {stage}", profile, shape, plan, h100, accumulation,
                                     seconds_of(terms, h100, truth)))
    fitted = fit(runs, h100)
    assert fitted["overlap_exponent"] == 64.0
    assert fitted["compute_efficiency"] == pytest.approx(0.6, rel=0.05)
    assert fitted["layer_overhead_s"] == pytest.approx(truth["layer_overhead_s"], rel=0.15)


def test_the_h200_offload_term_takes_the_measured_pinned_copies():
    from zeroplan.core.steptime import CPU_ADAM_ELEMS_PER_S_PER_NODE, host_offload_rates, offload_seconds

    h200, h100 = load_gpu("h200"), load_gpu("h100")
    assert h200.host["pinned_bandwidth_gbps"] == 55 and "reports/host_offload" in h200.host["source"]
    assert host_offload_rates(h200) == (55e9, CPU_ADAM_ELEMS_PER_S_PER_NODE)
    assert host_offload_rates(h100) == (h100.pcie_bandwidth_gbps * 1e9, CPU_ADAM_ELEMS_PER_S_PER_NODE)
    profile, shape = load_model("2b"), TrainShape(seq_len=4096, tiles=7)
    plan = Plan(stage=1, gpus_per_node=1, offload_optimizer="cpu")
    without = replace(h200, host={})
    assert offload_seconds(profile, shape, plan, h200, 1) < offload_seconds(profile, shape, plan, without, 1)


def test_a_host_table_with_a_bad_figure_is_refused():
    from zeroplan.core.errors import InvalidProfile
    from zeroplan.core.profiles import gpu_from_data

    data = {"name": "X", "memory_bytes": 1, "bf16_dense_tflops": 1, "hbm_bandwidth_gbps": 1,
            "intra_node_bandwidth_gbps": 1, "inter_node_bandwidth_gbps": 1, "pcie_bandwidth_gbps": 1,
            "cuda_context_bytes": 0}
    assert gpu_from_data({**data, "host": {"pinned_bandwidth_gbps": 20}}, "x").host["pinned_bandwidth_gbps"] == 20
    for bad in ({"pinned_bandwidth_gbps": -1}, {"cpu_adam_elems_per_s": "fast"}, "table"):
        with pytest.raises(InvalidProfile):
            gpu_from_data({**data, "host": bad}, "x")
