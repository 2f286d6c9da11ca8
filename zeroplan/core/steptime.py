"""Step-time model: compute, memory-bound work, ZeRO communication and offload transfers.

One optimizer step = gradient_accumulation micro-steps, each a forward and backward on one
micro-batch per GPU, plus what a stage does once per step. The figures per term:

- compute: model FLOPs (zeroplan.core.flops) plus the recomputed forward under checkpointing, at
  `compute_efficiency` of the GPU's dense bf16 peak (measured by `zeroplan calibrate`);
- memory-bound work: norms, rotary, activations and the fp32 loss over the vocabulary move about
  four times their saved bytes (written in forward, read by the next op, read and written in
  backward) at HBM bandwidth;
- communication over the ring's bottleneck (NVLink inside a node; across nodes the node's NICs
  together, from the stated cluster or the GPU profile's default: zeroplan.core.cluster), with a
  latency per ring hop and collective (zeroplan.core.collectives):
  ZeRO-0 all-reduces the gradients (2·(N-1)/N of their bytes) once per step; ZeRO-1 reduce-scatters
  them once per step and all-gathers the updated 16-bit parameters; ZeRO-2 reduce-scatters at every
  micro-step; ZeRO-3 all-gathers the parameters in forward and again in backward and reduce-scatters
  the gradients at every micro-step (about 1.5× ZeRO-2). Gradient reduction overlaps backward when
  overlap_comm is on; ZeRO-3's all-gathers overlap compute through prefetch; what exceeds the
  compute it hides behind is exposed;
- per-layer fixed cost: every transformer layer (vision and LLM) launches dozens of small kernels
  and runs Python module code in forward, backward and recomputation, a cost per layer and
  micro-step that does not shrink with the batch; `layer_overhead_s` (calibrated);
- ZeRO-3's bookkeeping: every module with partitioned parameters runs DeepSpeed's pre/post hooks
  in forward and backward (fetch, all-gather launch, wait, release, allocation of the gathered
  buffer), a fixed cost per module per pass that does not shrink with the world size (it is there
  on one GPU too). `stage3_module_overhead_s` is that cost per module per micro-step, measured by
  `zeroplan calibrate` (ZeRO-3 against ZeRO-1 on the same micro-batch). A checkpointed module's
  recomputed forward runs its fetch hooks again: 6 hook calls instead of 4, 1.5 passes;
- offload: gradients to the host and parameters back over PCIe, DeepSpeedCPUAdam on the host;
- misaligned LM head: with a vocabulary that is not a multiple of 8 (InternVL2.5-2B's 92,553,
  Qwen2.5's 151,674) the logits' leading dimension breaks cuBLAS's 16-byte alignment rule for
  tensor-core kernels, and the LM head's three products (forward, input and weight gradients) run
  on slow fallback kernels at `misaligned_gemm_efficiency` of peak (0.10 on the H100, where a
  4096×2048×92553 product took 15.8 ms: reports/h100_profile). A vocabulary padded to a multiple of
  128 (`pad_vocab`) removes the term;
- compiled layers: torch.compile of each layer fuses its elementwise chains (norms, rotary, SiLU·mul,
  residual adds, casts) into a few Triton kernels, so a compiled layer costs
  `compiled_layer_overhead_s` per micro-step instead of `layer_overhead_s`;
- recomputation: under checkpointing each layer's forward runs again in backward, its FLOPs in
  the compute term and its fixed cost (the forward's launches again, plus torch.utils.checkpoint's
  saved-tensor hooks that trigger and unpack the recomputation) as `recompute_layer_overhead_s` per
  checkpointed layer and micro-step;
- per-tensor bookkeeping at the optimizer step: DeepSpeed's ZeRO-1/2 optimizer visits every
  trainable tensor at the accumulation boundary (its gradient hook reduces it into the flat
  partition; the gradient norm and the finiteness checks run per tensor: 661 tensors on 2B, about
  13,800 launches, reports/h100_profile), `step_tensor_overhead_s` each, once per optimizer step.
  ZeRO-2 partitions gradients, so its hooks reduce every micro-step, not only at the boundary:
  `grad_hook_overhead_s` per tensor and micro-step, host work inside the backward (with optimizer
  offload each hook also moves the gradient through host memory and counts as boundary work).
  Gradient accumulation spreads the once-per-step part over its micro-steps.

How the terms combine (`seconds_of`): the host queues kernels ahead of the GPU, so the forward and
backward passes of a step take the larger of the host's and the GPU's time, not their sum, where
the two overlap perfectly. The GPU's part is the compute at the calibrated efficiency, the LM head's
misaligned products, the memory-bound work and a GPU-side cost per eager layer pass (`layer_gpu_s`:
the tails of dozens of small kernels that no FLOP or byte count sees). The host's part is what Python
and the launch path spend per layer pass (`layer_overhead_s`, `compiled_layer_overhead_s`,
`recompute_layer_overhead_s`), ZeRO-3's module hooks and ZeRO-2's per-micro-step gradient hooks
(`grad_hook_overhead_s` per tensor): all of it runs while earlier kernels execute. Overlap is not
perfect: a pass alternates host-bound stretches (the forward's Python, the vision tower's small
kernels) with GPU-bound ones (the LLM's GEMMs, the backward), and whatever copies from pageable
host memory or reads a value back drains the queue. So the two combine as a power mean,
(gpu^k + host^k)^(1/k) with k = `overlap_exponent`: k = 1 adds them (no overlap), a large k takes the
larger (full overlap), and zeroplan calibrate fits k with the rest. On the committed H100 runs the fit
picks k = 1: those runs do not show the host hiding behind the GPU (reports/steptime_overlap). What synchronises host and GPU is serial, added after the
combination: the optimizer step's per-tensor bookkeeping at the accumulation boundary (the gradient
norm and the finiteness check read a value back, then walk every tensor with the GPU idle behind
them: `step_tensor_overhead_s`), the exposed communication, offload transfers and host Adam (the GPU
waits for them), and the optimizer's own kernels at the boundary.
A run timed as an ordinary loop (RunSpec.timing "wall") also pays the host's work between steps
(building the next batch), which the model leaves out: it is the data pipeline's, not the step's
(reports/h200_timing: 1B ZeRO-0 with checkpointing 0.386 s synchronised, 0.575 s as a plain loop).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from zeroplan.core.activations import activation_bytes
from zeroplan.core.collectives import collectives, links_of, split_by_when
from zeroplan.core.flops import backward_factors, shape_flops
from zeroplan.core.params import count_parameters, lora_tensors, model_tensors
from zeroplan.core.partition import trainable_numels
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import GPUProfile, ModelProfile
from zeroplan.core.dtypes import BF16_BYTES

DEFAULT_COMPUTE_EFFICIENCY = 0.45
MEMORY_TRAFFIC_PER_SAVED_BYTE = 4
# Elements per second of DeepSpeed's whole host-side optimizer step under optimizer offload, for a node:
# Adam plus the gradient norm, the finiteness check and the copies it runs over the host partition. The
# Adam kernel alone is faster (4.4e9 elements/s with 16 threads on the H200 node, reports/host_offload),
# but the 2B ZeRO-1 offloaded step there spent about 1.1 s of host time on 2.2e9 elements
# (reports/h200_timing, reports/steptime_overlap), as this figure gives. A GPU profile's [host] table
# may set cpu_adam_elems_per_s (the whole host step's rate) and pinned_bandwidth_gbps (pinned copies).
CPU_ADAM_ELEMS_PER_S_PER_NODE = 2.0e9
OVERLAP_INTERFERENCE = 0.1
ADAM_BYTES_PER_ELEM = 32
# Host-side costs (Python, DeepSpeed's hooks, kernel launches) are properties of the software stack
# and the host CPU more than of the GPU. Until a GPU is calibrated it takes an earlier H100 fit of the
# additive model (61 H100 runs, 2026-11-25): with DEFAULT_OVERLAP_EXPONENT 1, DEFAULT_LAYER_GPU_S 0 and
# ZeRO-2's hooks at the per-tensor figure they give that model's figures unchanged. The calibrated
# H100 and H200 profiles carry the refit (reports/steptime_overlap).
DEFAULT_STAGE3_MODULE_OVERHEAD_S = 0.0018677
DEFAULT_LAYER_OVERHEAD_S = 0.0036081
DEFAULT_COMPILED_LAYER_OVERHEAD_S = 0.0004155
DEFAULT_RECOMPUTE_LAYER_OVERHEAD_S = 0.0020231
DEFAULT_STEP_TENSOR_OVERHEAD_S = 0.0001217
# GPU-side cost per eager layer pass (small kernels' launch-to-finish tails), ZeRO-2's gradient hook per
# tensor and micro-step, and how host and GPU time combine (1: added, large: the larger of the two).
DEFAULT_LAYER_GPU_S = 0.0
DEFAULT_GRAD_HOOK_OVERHEAD_S = 0.0001217
DEFAULT_OVERLAP_EXPONENT = 1.0
# Until calibrated: cuBLAS's fallback for misaligned bf16 products ran at about a tenth of peak on
# the H100 (reports/h100_profile: 2·4096·2048·92553 = 1.55 TFLOP in 15.8 ms, 98 TFLOPS of 989).
DEFAULT_MISALIGNED_GEMM_EFFICIENCY = 0.099
ALIGNED_VOCAB_MULTIPLE = 8


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step and its parts, and the throughput they give."""

    compute_s: float
    memory_bound_s: float
    exposed_comm_s: float
    offload_s: float
    optimizer_s: float
    step_s: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    samples_per_s: float
    model_tflops_per_gpu: float
    mfu: float

    def as_dict(self) -> dict[str, float]:
        """Plain dict for JSON output."""
        return dict(self.__dict__)


def ring_bandwidth_bytes_per_s(gpu: GPUProfile, plan: Plan, collective: str = "all_gather") -> float:
    """Bus bandwidth of a ring collective: NVLink in one node; across nodes the smaller of NVLink
    and the node's NICs together at NCCL's efficiency (zeroplan.core.cluster says why), from the
    plan's stated network or the GPU profile's default."""
    return links_of(plan, gpu).bus_bandwidth(collective)


def _trainable_elems(profile: ModelProfile, shape: TrainShape) -> int:
    return sum(trainable_numels(profile, shape))


def partitioned_module_count(profile: ModelProfile, plan: Plan) -> int:
    """Modules owning at least one tensor above the persistence threshold (ZeRO-3 partitions it)."""
    modules = {t.module for t in model_tensors(profile) if t.numel > plan.param_persistence_threshold}
    return len(modules)


def stage3_overhead_seconds(profile: ModelProfile, plan: Plan, gpu: GPUProfile) -> float:
    """ZeRO-3's per-module hook cost of one micro-step (0 under stages 0-2)."""
    if plan.stage != 3:
        return 0.0
    per_module = float(gpu.calibrated.get("stage3_module_overhead_s", DEFAULT_STAGE3_MODULE_OVERHEAD_S))
    return partitioned_module_count(profile, plan) * per_module


def communication_seconds(profile: ModelProfile, shape: TrainShape, plan: Plan, gpu: GPUProfile
                          ) -> tuple[float, float, float]:
    """Seconds of collectives: (overlappable at every micro-step, overlappable once per step,
    serial once per step).

    ZeRO-0 all-reduces the gradients after the last backward (DeepSpeed's engine does it in one
    buffered pass, not overlapped). ZeRO-1 reduces them to their owners during the last
    micro-step's backward (IPG buckets with overlap_comm) and all-gathers the updated parameters
    after the step. ZeRO-2 reduces in every micro-step's backward. ZeRO-3 all-gathers the
    parameters in forward and in backward and reduce-scatters the gradients in every micro-step.
    Volumes, counts and latencies: zeroplan.core.collectives."""
    micro, once, serial, _, _ = split_by_when(collectives(profile, shape, plan, gpu))
    return micro, once, serial


def _exposed(comm_s: float, compute_s: float, overlap: bool) -> float:
    """What of a collective is not hidden behind the compute it overlaps with."""
    hidden_behind = compute_s if overlap else 0.0
    return max(comm_s - hidden_behind, 0.0) + OVERLAP_INTERFERENCE * min(comm_s, hidden_behind)


def host_offload_rates(gpu: GPUProfile) -> tuple[float, float]:
    """(bytes/s of a pinned host copy, elements/s of one node's host-side optimizer step) for the
    offload term: the GPU profile's [host] table where it was measured (benchmarks/host_offload.py
    measures the copies), else the profile's PCIe figure and CPU_ADAM_ELEMS_PER_S_PER_NODE."""
    pinned = float(gpu.host.get("pinned_bandwidth_gbps", gpu.pcie_bandwidth_gbps)) * 1e9
    adam = float(gpu.host.get("cpu_adam_elems_per_s", CPU_ADAM_ELEMS_PER_S_PER_NODE))
    return pinned, adam


def offload_seconds(profile: ModelProfile, shape: TrainShape, plan: Plan, gpu: GPUProfile,
                    accumulation: int) -> float:
    """PCIe transfers and host Adam of one step under optimizer / parameter offload.

    Per step: the fp32 gradient slice to the host and the updated bf16 slice back (6 bytes per
    element), and host Adam. With accumulation DeepSpeed 0.19.8 also keeps the gradients summed on
    the host between micro-steps where it reduces every micro-step: ZeRO-2
    (async_accumulate_grad_in_cpu_via_gpu) copies each gradient to the host after every micro-step
    but the last and back before every one but the first (2 × 2 bytes per element per extra
    micro-step); ZeRO-3 sends its fp32 gradient slice to the host after every micro-step (4 bytes
    per element per extra micro-step). ZeRO-1 reduces only at the boundary, so its gradients stay
    on the GPU until then (reports/h100_offload_accum: 2.76 s a step at 4 micro-steps, ZeRO-2 4.14 s)."""
    seconds = 0.0
    partition = _trainable_elems(profile, shape) / plan.world_size
    pcie, adam_elems_per_s = host_offload_rates(gpu)
    if plan.offload_optimizer != "none":
        seconds += (4 + 2) * partition / pcie
        if plan.stage == 2:
            seconds += (accumulation - 1) * 4 * _trainable_elems(profile, shape) / pcie
        elif plan.stage == 3:
            seconds += (accumulation - 1) * 4 * partition / pcie
        seconds += partition * plan.gpus_per_node / adam_elems_per_s
    if plan.offload_params != "none":
        seconds += accumulation * 2 * 2 * count_parameters(profile).total / plan.world_size / pcie
    return seconds


@dataclass(frozen=True)
class StepTerms:
    """The step-time model's terms for one plan, each the quantity a calibrated constant multiplies
    (or a time already in seconds). Shared by step_time and zeroplan calibrate's fit."""

    compute_flops: float        # model FLOPs + recomputation, per optimizer step (at 1/efficiency of peak)
    misaligned_flops: float     # the LM head's products on cuBLAS's fallback kernels, per step
    eager_layer_passes: float   # layers × micro-steps run by transformers' modules
    compiled_layer_passes: float  # layers × micro-steps run by torch.compile'd layers
    recomputed_layer_passes: float  # checkpointed layers × micro-steps (forward run again in backward)
    tensor_visits: float        # trainable tensors visited by DeepSpeed's per-tensor bookkeeping, per step
    hook_tensor_visits: float   # of those, ZeRO-2's per-micro-step gradient hooks inside backward (host, overlapped)
    module_passes: float        # ZeRO-3 partitioned modules × micro-steps
    fixed_s: float              # memory-bound work, exposed communication, offload and Adam, per step
    memory_bound_s: float
    exposed_comm_s: float
    offload_s: float
    optimizer_s: float


def trainable_tensor_count(profile: ModelProfile, shape: TrainShape) -> int:
    """Tensors the optimizer updates (each a DeepSpeed gradient hook and a per-tensor norm)."""
    trained = sum(1 for t in model_tensors(profile) if shape.trains(t.tower))
    return trained + (len(lora_tensors(profile, shape.lora_rank)) if shape.lora_rank else 0)


def checkpointed_layers(profile: ModelProfile, shape: TrainShape) -> int:
    """Layers whose forward runs again in backward under checkpointing (transformers checkpoints
    every vision layer and the first `ckpt_layers` decoder layers whose input needs a gradient)."""
    if not shape.grad_ckpt:
        return 0
    factors = backward_factors(shape)
    return ((shape.llm_ckpt_layers(profile.llm.num_layers) if factors["llm"] else 0)
            + (profile.vision.num_layers if factors["vision"] == 2 else 0))


def recomputed_share(profile: ModelProfile, shape: TrainShape) -> float:
    """The share of the layers that checkpointing recomputes (1.0 with every layer checkpointed)."""
    factors = backward_factors(shape)
    layers = (profile.llm.num_layers if factors["llm"] else 0) + (profile.vision.num_layers if factors["vision"] == 2 else 0)
    return checkpointed_layers(profile, shape) / layers if layers else 0.0


def fused_loss_extra_bytes(profile: ModelProfile, shape: TrainShape) -> int:
    """HBM traffic Liger's fused linear cross-entropy adds over the eager loss in one micro-step.
    It walks the tokens in chunks (ops/fused_linear_cross_entropy.py: inc_factor = ceil(V / H),
    chunk = next power of two of ceil(tokens / inc_factor)) and, per chunk, reads the [V, H] weight
    twice (logits, input gradient) and reads and writes its bf16 gradient (addmm into grad_weight);
    the eager loss reads the weight three times and writes its gradient once for the whole batch.
    For 2B at 8192 tokens: 32 chunks, about 47 GB more, 14 ms on an H100 (measured: 21 ms)."""
    if shape.kernels == "eager":
        return 0
    tokens = shape.micro_batch * shape.seq_len
    vocab, hidden = profile.llm.vocab_size, profile.llm.hidden_size
    per_chunk_factor = -(-vocab // hidden)
    chunk = min(1 << max(0, (-(-tokens // per_chunk_factor) - 1).bit_length()), tokens)
    chunks = -(-tokens // chunk)
    weight = BF16_BYTES * vocab * hidden
    trains = shape.trains("llm")
    fused = chunks * (2 * weight + (2 * weight if trains else 0))
    eager = 3 * weight + (weight if trains else 0)
    return max(fused - eager, 0)


def lm_head_flops(profile: ModelProfile, shape: TrainShape) -> float:
    """FLOPs of the LM head's products in one micro-step: forward, the input gradient, and the
    weight gradient when the LLM trains."""
    factors = backward_factors(shape)
    tokens = shape.micro_batch * shape.seq_len
    return (1 + factors["llm"]) * 2.0 * tokens * profile.llm.hidden_size * profile.llm.vocab_size


def step_terms(profile: ModelProfile, shape: TrainShape, plan: Plan, gpu: GPUProfile, accumulation: int) -> StepTerms:
    """The terms of one optimizer step of `accumulation` micro-steps (see the module docstring)."""
    flops = shape_flops(profile, shape)
    factors = backward_factors(shape)
    recompute = 0
    if shape.grad_ckpt:
        llm_share = shape.llm_ckpt_layers(profile.llm.num_layers) / profile.llm.num_layers
        recompute = ((flops.llm_forward * llm_share if factors["llm"] else 0)
                     + (flops.vision_forward if factors["vision"] == 2 else 0))
    misaligned = lm_head_flops(profile, shape) if profile.llm.vocab_size % ALIGNED_VOCAB_MULTIPLE else 0.0
    acts = activation_bytes(profile, shape)
    # The loss moves the [tokens, vocab] logits through HBM whichever way it runs: Liger's fused
    # loss writes and reads them chunk by chunk instead of holding them whole, so its traffic (and
    # time) is the eager loss's even though its memory is not.
    logits = activation_bytes(profile, replace(shape, kernels="eager")).logits_backward_transient
    memory_bound = (MEMORY_TRAFFIC_PER_SAVED_BYTE * (acts.saved + logits) + fused_loss_extra_bytes(profile, shape)
                    ) / (gpu.hbm_bandwidth_gbps * 1e9)
    memory_bound *= 1 + 0.5 * recomputed_share(profile, shape)
    layers = profile.vision.num_layers + profile.llm.num_layers
    tensors = trainable_tensor_count(profile, shape)
    every_micro, once, serial, floor_micro, floor_once = split_by_when(collectives(profile, shape, plan, gpu))
    micro_estimate = (flops.total + recompute) / (gpu.bf16_dense_tflops * 1e12 * DEFAULT_COMPUTE_EFFICIENCY)
    overlap = plan.overlap_comm or plan.stage == 3
    # The first all-gather / last reduce-scatter (ZeRO-3) and the last gradient bucket (ZeRO-1/2)
    # have no compute beside them: exposed whatever the slack elsewhere.
    exposed = (accumulation * (_exposed(every_micro - floor_micro, micro_estimate, overlap) + floor_micro) + serial
               + _exposed(once - floor_once, micro_estimate, overlap) + floor_once)
    offload = offload_seconds(profile, shape, plan, gpu, accumulation)
    optimizer = 0.0 if plan.offload_optimizer != "none" else (
        ADAM_BYTES_PER_ELEM * _trainable_elems(profile, shape) / plan.world_size / (gpu.hbm_bandwidth_gbps * 1e9))
    return StepTerms(
        compute_flops=accumulation * (flops.total + recompute), misaligned_flops=accumulation * misaligned,
        eager_layer_passes=0.0 if shape.compiled else accumulation * layers,
        compiled_layer_passes=accumulation * layers if shape.compiled else 0.0,
        recomputed_layer_passes=accumulation * checkpointed_layers(profile, shape),
        tensor_visits=tensors * (accumulation + 1 if plan.stage == 2 else 1),
        # ZeRO-2's hooks overlap the backward unless they offload: then every hook moves its
        # gradient through the host buffer (async_accumulate_grad_in_cpu_via_gpu), which waits like
        # the boundary's per-tensor work (reports/h100_offload_accum: 4.14 s at 4 micro-steps).
        hook_tensor_visits=tensors * accumulation if plan.stage == 2 and plan.offload_optimizer == "none" else 0.0,
        module_passes=(accumulation * partitioned_module_count(profile, plan) * (1 + 0.5 * recomputed_share(profile, shape))
                       if plan.stage == 3 else 0.0),
        fixed_s=accumulation * memory_bound + exposed + offload + optimizer,
        memory_bound_s=accumulation * memory_bound, exposed_comm_s=exposed, offload_s=offload, optimizer_s=optimizer)


def constants(gpu: GPUProfile) -> dict[str, float]:
    """The GPU's step-time constants: calibrated where `zeroplan calibrate` measured them."""
    given = gpu.calibrated
    return {
        "compute_efficiency": float(given.get("compute_efficiency", DEFAULT_COMPUTE_EFFICIENCY)),
        "misaligned_gemm_efficiency": float(given.get("misaligned_gemm_efficiency", DEFAULT_MISALIGNED_GEMM_EFFICIENCY)),
        "layer_overhead_s": float(given.get("layer_overhead_s", DEFAULT_LAYER_OVERHEAD_S)),
        "compiled_layer_overhead_s": float(given.get("compiled_layer_overhead_s", DEFAULT_COMPILED_LAYER_OVERHEAD_S)),
        "recompute_layer_overhead_s": float(given.get("recompute_layer_overhead_s", DEFAULT_RECOMPUTE_LAYER_OVERHEAD_S)),
        "step_tensor_overhead_s": float(given.get("step_tensor_overhead_s", DEFAULT_STEP_TENSOR_OVERHEAD_S)),
        "stage3_module_overhead_s": float(given.get("stage3_module_overhead_s", DEFAULT_STAGE3_MODULE_OVERHEAD_S)),
        "layer_gpu_s": float(given.get("layer_gpu_s", DEFAULT_LAYER_GPU_S)),
        "grad_hook_overhead_s": float(given.get("grad_hook_overhead_s", DEFAULT_GRAD_HOOK_OVERHEAD_S)),
        "overlap_exponent": float(given.get("overlap_exponent", DEFAULT_OVERLAP_EXPONENT)),
    }


def gpu_seconds(terms: StepTerms, gpu: GPUProfile, values: dict[str, float]) -> float:
    """The GPU's busy time in the step's forward and backward passes: compute at the calibrated
    efficiency, the LM head's products on the fallback kernels, memory-bound work and the GPU-side
    cost of each eager layer pass."""
    peak = gpu.bf16_dense_tflops * 1e12
    compute = terms.compute_flops / (peak * values["compute_efficiency"])
    slow = terms.misaligned_flops * (1 / values["misaligned_gemm_efficiency"] - 1 / values["compute_efficiency"]) / peak
    return compute + max(slow, 0.0) + terms.memory_bound_s + terms.eager_layer_passes * values["layer_gpu_s"]


def host_seconds(terms: StepTerms, values: dict[str, float]) -> float:
    """The host's time queueing the same passes: Python and launches per layer pass (eager,
    compiled, recomputed), ZeRO-3's module hooks and ZeRO-2's per-micro-step gradient hooks."""
    return (terms.eager_layer_passes * values["layer_overhead_s"]
            + terms.compiled_layer_passes * values["compiled_layer_overhead_s"]
            + terms.recomputed_layer_passes * values["recompute_layer_overhead_s"]
            + terms.module_passes * values["stage3_module_overhead_s"]
            + terms.hook_tensor_visits * values["grad_hook_overhead_s"])


def serial_seconds(terms: StepTerms, values: dict[str, float]) -> float:
    """What synchronises host and GPU, so overlaps neither: the boundary's per-tensor bookkeeping,
    exposed communication, offload transfers and host Adam, the optimizer's kernels."""
    boundary_visits = terms.tensor_visits - terms.hook_tensor_visits
    return boundary_visits * values["step_tensor_overhead_s"] + terms.fixed_s - terms.memory_bound_s


def overlapped(gpu_s: float, host_s: float, exponent: float) -> float:
    """Host and GPU time of the same passes combined: their power mean of order `exponent` (1 adds
    them; as it grows the result falls towards the larger; never below the larger, never above the
    sum)."""
    larger = max(gpu_s, host_s)
    if larger <= 0:
        return 0.0
    return larger * ((gpu_s / larger) ** exponent + (host_s / larger) ** exponent) ** (1 / exponent)


def seconds_of(terms: StepTerms, gpu: GPUProfile, values: dict[str, float]) -> float:
    """The step time the terms give under a set of constants: the GPU's and the host's time for the
    passes combined as the host queues ahead, plus the serial parts (see the module docstring)."""
    return (overlapped(gpu_seconds(terms, gpu, values), host_seconds(terms, values), values["overlap_exponent"])
            + serial_seconds(terms, values))


def step_time(profile: ModelProfile, shape: TrainShape, plan: Plan, gpu: GPUProfile,
              accumulation: int) -> StepTime:
    """Predicted seconds and throughput of one optimizer step."""
    terms = step_terms(profile, shape, plan, gpu, accumulation)
    values = constants(gpu)
    step = seconds_of(terms, gpu, values)
    flops = shape_flops(profile, shape)
    peak_flops = gpu.bf16_dense_tflops * 1e12
    tokens = shape.micro_batch * shape.seq_len * accumulation * plan.world_size
    model_flops_per_gpu = flops.total * accumulation / step
    return StepTime(
        compute_s=terms.compute_flops / (peak_flops * values["compute_efficiency"]),
        memory_bound_s=terms.memory_bound_s, exposed_comm_s=terms.exposed_comm_s, offload_s=terms.offload_s,
        optimizer_s=terms.optimizer_s, step_s=step, tokens_per_s=tokens / step,
        tokens_per_s_per_gpu=tokens / step / plan.world_size,
        samples_per_s=shape.micro_batch * accumulation * plan.world_size / step,
        model_tflops_per_gpu=model_flops_per_gpu / 1e12, mfu=model_flops_per_gpu / peak_flops,
    )
