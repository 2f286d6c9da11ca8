"""The memory model's invariants: ZeRO's bytes-per-parameter split, monotonic stages, and the
effect of each shape option in the direction the mechanism says."""

from dataclasses import replace

import pytest

from zeroplan.core.activations import activation_bytes
from zeroplan.core.memory import estimate
from zeroplan.core.params import count_parameters
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import load_gpu, load_model

GPU = load_gpu("a100-80gb")


def test_stage3_model_states_are_16_bytes_per_param_split_16_ways():
    profile = load_model("40b")
    memory = estimate(profile, TrainShape(), Plan(stage=3, gpus_per_node=8, nodes=2), GPU)
    total = count_parameters(profile).total
    model_states = memory.params + memory.grads + memory.master_weights + memory.optimizer_states
    # 2 (bf16 params) + 2 (bf16 grads) + 12 (fp32 master + Adam m, v) bytes per parameter, split 16
    # ways; each tensor's shard is padded to a multiple of 16, and tiny tensors stay whole.
    assert model_states == pytest.approx(16 * total / 16, rel=0.005)
    assert memory.optimizer_total == pytest.approx(12 * total / 16, rel=0.005)


@pytest.mark.parametrize("model", ["1b", "8b", "26b"])
def test_model_states_shrink_with_each_stage(model):
    profile = load_model(model)
    states = []
    for stage in (0, 1, 2, 3):
        memory = estimate(profile, TrainShape(), Plan(stage=stage, gpus_per_node=8), GPU)
        states.append(memory.params + memory.grads + memory.optimizer_total)
    # DeepSpeed 0.19.8 keeps the same reduced gradient slice under stages 1 and 2 (partition.py).
    assert states[0] > states[1] >= states[2] > states[3]


def test_checkpointing_cuts_saved_activations():
    profile = load_model("2b")
    shape = TrainShape(micro_batch=2, seq_len=4096, tiles=7, grad_ckpt=False)
    full = activation_bytes(profile, shape)
    ckpt = activation_bytes(profile, replace(shape, grad_ckpt=True))
    assert ckpt.saved < full.saved / 5
    assert ckpt.recompute_transient > 0 == full.recompute_transient


def test_frozen_vision_saves_no_vision_states_and_its_activations_only_under_checkpointing():
    """transformers' gradient_checkpointing_enable makes the vision tower's input embeddings
    require grad, so a frozen tower under checkpointing keeps its layers' inputs like a trained one
    (measured: reports/rehearsal); without checkpointing it keeps nothing."""
    profile = load_model("8b")
    plan = Plan(stage=1, gpus_per_node=8)
    frozen_vision = frozenset({"vision"})
    trained = estimate(profile, TrainShape(), plan, GPU)
    frozen = estimate(profile, TrainShape(frozen=frozen_vision), plan, GPU)
    assert frozen.activations_vision == trained.activations_vision > 0
    assert frozen.optimizer_total < trained.optimizer_total
    assert frozen.params == trained.params  # frozen weights still sit on the GPU in bf16
    plain = estimate(profile, TrainShape(grad_ckpt=False), plan, GPU)
    frozen_plain = estimate(profile, TrainShape(grad_ckpt=False, frozen=frozen_vision), plan, GPU)
    assert frozen_plain.activations_vision < plain.activations_vision


def test_lora_trains_a_tiny_fraction():
    profile = load_model("8b")
    lora = estimate(profile, TrainShape(lora_rank=16, frozen=frozenset({"vision", "projector"})),
                    Plan(stage=1, gpus_per_node=8), GPU)
    full = estimate(profile, TrainShape(), Plan(stage=1, gpus_per_node=8), GPU)
    assert lora.optimizer_total < full.optimizer_total / 50


def test_offload_moves_optimizer_to_host():
    profile = load_model("26b")
    plan = Plan(stage=3, gpus_per_node=8)
    on_gpu = estimate(profile, TrainShape(), plan, GPU)
    offloaded = estimate(profile, TrainShape(), plan.with_(offload_optimizer="cpu"), GPU)
    assert offloaded.optimizer_total == 0 and on_gpu.optimizer_total > 0
    assert offloaded.cpu_bytes_per_node >= 8 * on_gpu.optimizer_total * 0.99


def test_peak_is_not_the_sum_of_every_term():
    memory = estimate(load_model("2b"), TrainShape(grad_ckpt=False), Plan(stage=1, gpus_per_node=1), GPU)
    everything = (memory.params + memory.grads + memory.optimizer_total + memory.activations
                  + memory.logits_and_loss + memory.buffers + memory.step_transient + memory.overhead)
    assert memory.peak < everything
    assert memory.peak >= memory.params + memory.optimizer_total + memory.activations


def test_longer_sequences_and_more_tiles_need_more_memory():
    profile, plan = load_model("2b"), Plan(stage=2, gpus_per_node=8)
    base = estimate(profile, TrainShape(seq_len=4096, tiles=4), plan, GPU)
    longer = estimate(profile, TrainShape(seq_len=8192, tiles=4), plan, GPU)
    tiled = estimate(profile, TrainShape(seq_len=4096, tiles=8), plan, GPU)
    assert longer.peak_allocated > base.peak_allocated and longer.peak > base.peak
    # More tiles allocate more; the reserved peak may stay put when they fit in cached blocks.
    assert tiled.peak_allocated > base.peak_allocated and tiled.peak >= base.peak


def _h100_points():
    """Every finished H100 run in reports/, with the shape it really ran (zeroplan.lab.records)."""
    import glob
    import json

    from zeroplan.lab.calibrate import points_from_records
    from zeroplan.lab.records import record_profile

    out = []
    for path in sorted(glob.glob("reports/h100_*/results.jsonl")):
        for line in open(path):
            record = json.loads(line)
            for point in points_from_records([record]):
                memory = estimate(record_profile(record), point.shape, point.plan, load_gpu("h100"),
                                  point.step_tiles, point.gradient_accumulation, point.compiled)
                out.append((point, memory))
    return out


def _tiles_known() -> list[bool]:
    """Per point of _h100_points, in its order: whether its steps' tiles are known exactly."""
    import glob
    import json

    from zeroplan.lab.calibrate import points_from_records
    from zeroplan.lab.records import drawn_tiles

    out = []
    for path in sorted(glob.glob("reports/h100_*/results.jsonl")):
        for line in open(path):
            record = json.loads(line)
            source = drawn_tiles(record)[1]
            out += [source.startswith(("recorded", "spec (fixed"))] * len(points_from_records([record]))
    return out


@pytest.fixture(scope="module")
def h100_points():
    return _h100_points()


def _errors(points, attribute, measured):
    return [(getattr(m, attribute) - getattr(p, measured)) / getattr(p, measured) for p, m in points]


def test_h100_matrix_allocated_peak_within_issue_5_targets(h100_points):
    import statistics

    errors = _errors(h100_points, "peak_allocated", "peak_allocated_bytes")
    assert len(errors) >= 60
    assert statistics.median(abs(e) for e in errors) <= 0.02
    assert max(abs(e) for e in errors) <= 0.05
    assert min(errors) >= -0.05  # no finished run under-estimated by more than 5 %


def test_h100_matrix_reserved_peak_from_the_allocator_replay(h100_points):
    import statistics

    errors = _errors(h100_points, "peak_reserved", "peak_reserved_bytes")
    assert statistics.median(abs(e) for e in errors) <= 0.02
    # Runs whose every step's tiles are known (recorded, or fixed by the spec): the replay sees
    # the run's own allocations. Under-estimates (an OOM the plan did not expect) stay within 4 %;
    # over-estimates, ZeRO-3 at 4 and 8 rows per micro-step with checkpointing, within 7 %.
    known = [e for e, exact in zip(errors, _tiles_known()) if exact]
    assert len(known) >= 55
    assert min(known) >= -0.04 and max(known) <= 0.07
    # Older runs whose tile draws are reconstructed (zeroplan.lab.records): two 1B ZeRO-1/2 runs at 2
    # samples are 12.5 % under (the same configuration re-measured with the allocator's own trace
    # is reproduced exactly: reports/h100_memhist, z1).
    assert min(errors) >= -0.13 and max(errors) <= 0.08


def test_rotary_saves_nothing_and_flash_output_is_o_projs_input():
    from zeroplan.core.activations import llm_layer_bytes_per_token

    llm = load_model("2b").llm
    hidden, inter = llm.hidden_size, llm.intermediate_size
    q_width, kv_width = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    norms = 2 * (4 + 2 + 2) * hidden + 2 * 4
    attention = 2 * (2 * q_width + 2 * kv_width) + 4 * llm.num_heads  # rotated q, k; v; output; lse
    assert llm_layer_bytes_per_token(llm) == norms + attention + 2 * 4 * inter


def test_packed_rows_save_k_and_v_at_query_width():
    from zeroplan.core.activations import llm_layer_bytes_per_token

    llm = load_model("2b").llm
    extra = llm_layer_bytes_per_token(llm, packed=True) - llm_layer_bytes_per_token(llm)
    assert extra == 2 * 2 * (llm.num_heads - llm.num_kv_heads) * llm.head_dim


def test_liger_drops_the_vocabulary_wide_logits_and_saves_less():
    profile = load_model("1b")
    eager = activation_bytes(profile, TrainShape(seq_len=8192, tiles=8, grad_ckpt=False))
    liger = activation_bytes(profile, TrainShape(seq_len=8192, tiles=8, grad_ckpt=False, kernels="liger"))
    vocab_block = 4 * 8192 * profile.llm.vocab_size
    assert eager.logits_backward_transient >= 3 * vocab_block
    assert liger.logits_forward_transient < vocab_block / 4  # grads of lm_head and its input, one chunk
    assert liger.llm_saved < eager.llm_saved


def test_fused_linear_cross_entropy_chunk_matches_liger():
    from zeroplan.core.activations import fused_linear_cross_entropy_chunk

    # 2B with the vocabulary padded to 128: ceil(92672 / 2048) = 46; ceil(8192 / 46) = 179 -> 256 rows
    assert fused_linear_cross_entropy_chunk(8192, 2048, 92672) == 256
    assert fused_linear_cross_entropy_chunk(100, 2048, 92672) == 4


def test_compiled_layers_keep_no_fp32_upcast_and_no_silu():
    from zeroplan.core.activations import llm_layer_bytes_per_token

    llm = load_model("2b").llm
    eager, compiled = llm_layer_bytes_per_token(llm), llm_layer_bytes_per_token(llm, compiled=True)
    # per norm: fp32 upcast (4H) + bf16 cast (2H) become the bf16 input side (2H); SiLU(gate) goes
    assert eager - compiled == 2 * (4 + 2 - 2) * llm.hidden_size + 2 * llm.intermediate_size


def test_accumulating_runs_replay_their_micro_steps(h100_points):
    # ZeRO-1 keeps every bf16 .grad between micro-steps and reduces at the boundary; ZeRO-2
    # reduces every micro-step into its partition. Replaying the micro-steps, not adding the held
    # gradients on top of a one-micro-step replay, puts them into the cached blocks they really
    # reuse: the 4B ZeRO-1 runs at 16 and 8 micro-steps were over-estimated by 7.8 % and 3.9 %.
    import statistics

    accumulating = [(p, m) for p, m in h100_points if p.gradient_accumulation > 1 and p.plan.stage in (1, 2)]
    assert len(accumulating) >= 9
    errors = _errors(accumulating, "peak_reserved", "peak_reserved_bytes")
    assert statistics.median(abs(e) for e in errors) <= 0.015, errors
    zero1_4b = [(p, m) for p, m in accumulating if p.model.endswith("4B") and p.plan.stage == 1
                and p.gradient_accumulation == 16]
    assert zero1_4b and all(abs(e) <= 0.01 for e in _errors(zero1_4b, "peak_reserved", "peak_reserved_bytes"))


def test_zero2_accumulation_replays_like_the_allocators_own_trace(h100_points):
    # reports/h100_memhist: the run's CUDA allocator trace makes two gradient-partition segments on
    # the reduction stream; the replay now makes the same large segments, and every ZeRO-2 run
    # with accumulation (one was -7.7 %) is within 2 %.
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("memory_history", root / "benchmarks" / "memory_history.py")
    memory_history = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory_history)
    folder = root / "reports" / "h100_memhist"
    record = json.loads((folder / "h100_memhist_z2.jsonl").read_text().splitlines()[0])
    real = memory_history.recorded(folder / "h100_memhist_z2.events.json.gz")
    model = memory_history.replayed(record)
    large = memory_history._large
    assert [round(s["size"] / 1e8) for s in large(model["segments"])] == [
        round(s["size"] / 1e8) for s in large(real["segments"])]
    assert abs(model["peak_reserved"] - real["peak_reserved"]) <= 0.01 * real["peak_reserved"]
    # and the 1B ZeRO-0 and ZeRO-1 traces, whose replays needed cuBLAS's two persistent workspaces
    for name in ("h100_memhist_z0", "h100_memhist_z1"):
        record = json.loads((folder / f"{name}.jsonl").read_text().splitlines()[0])
        real = memory_history.recorded(folder / f"{name}.events.json.gz")
        model = memory_history.replayed(record)
        assert abs(model["peak_reserved"] - real["peak_reserved"]) <= 0.01 * real["peak_reserved"], name
    zero2 = [(p, m) for p, m in h100_points if p.plan.stage == 2 and p.gradient_accumulation > 1
             and p.plan.offload_optimizer == "none"]
    assert len(zero2) >= 4
    assert all(abs(e) <= 0.02 for e in _errors(zero2, "peak_reserved", "peak_reserved_bytes"))
