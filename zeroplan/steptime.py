"""Step-time model: compute, memory-bound work, ZeRO communication and offload transfers.

One optimizer step = gradient_accumulation micro-steps, each a forward and backward on one
micro-batch per GPU, plus what a stage does once per step. The figures per term:

- compute: model FLOPs (zeroplan.flops) plus the recomputed forward under checkpointing, at
  `compute_efficiency` of the GPU's dense bf16 peak (measured by `zeroplan calibrate`);
- memory-bound work: norms, rotary, activations and the fp32 loss over the vocabulary move about
  four times their saved bytes (written in forward, read by the next op, read and written in
  backward) at HBM bandwidth;
- communication over the slowest link of the ring (NVLink inside a node, the NIC across nodes):
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
  `zeroplan calibrate` (ZeRO-3 against ZeRO-1 on the same micro-batch);
- offload: gradients to the host and parameters back over PCIe, DeepSpeedCPUAdam on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroplan.activations import activation_bytes
from zeroplan.flops import backward_factors, shape_flops
from zeroplan.params import count_parameters, lora_tensors, model_tensors
from zeroplan.plan import Plan, TrainShape
from zeroplan.profiles import GPUProfile, ModelProfile

DEFAULT_COMPUTE_EFFICIENCY = 0.45
MEMORY_TRAFFIC_PER_SAVED_BYTE = 4
CPU_ADAM_ELEMS_PER_S_PER_NODE = 2.0e9
OVERLAP_INTERFERENCE = 0.1
ADAM_BYTES_PER_ELEM = 32
# Until calibrated: 0.3 ms per module per micro-step (forward + backward hooks), what a plain
# transformers + DeepSpeed loop showed on one H100 for InternVL 2B (ZeRO-1 18 % MFU, ZeRO-3 12 %).
DEFAULT_STAGE3_MODULE_OVERHEAD_S = 3e-4
DEFAULT_LAYER_OVERHEAD_S = 0.0


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


def ring_bandwidth_bytes_per_s(gpu: GPUProfile, plan: Plan) -> float:
    """Per-GPU bandwidth of a ring collective: NVLink in one node, the NIC across nodes."""
    gbps = gpu.intra_node_bandwidth_gbps if plan.nodes == 1 else min(gpu.intra_node_bandwidth_gbps,
                                                                      gpu.inter_node_bandwidth_gbps)
    return gbps * 1e9


def _trainable_elems(profile: ModelProfile, shape: TrainShape) -> int:
    trained = sum(t.numel for t in model_tensors(profile) if shape.trains(t.tower))
    return trained + sum(t.numel for t in lora_tensors(profile, shape.lora_rank)) if shape.lora_rank else trained


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
    buffered pass, not overlapped). ZeRO-1 reduce-scatters them during the last micro-step's
    backward (IPG buckets with overlap_comm) and all-gathers the updated parameters after the step.
    ZeRO-2 reduce-scatters in every micro-step's backward. ZeRO-3 all-gathers the parameters in
    forward and in backward and reduce-scatters the gradients in every micro-step."""
    world = plan.world_size
    if world == 1:
        return 0.0, 0.0, 0.0
    share = (world - 1) / world
    bandwidth = ring_bandwidth_bytes_per_s(gpu, plan)
    grad_bytes = 2 * _trainable_elems(profile, shape)
    all_param_bytes = 2 * count_parameters(profile).total
    if plan.stage == 0:
        return 0.0, 0.0, 2 * share * grad_bytes / bandwidth
    if plan.stage == 1:
        return 0.0, share * grad_bytes / bandwidth, share * grad_bytes / bandwidth
    if plan.stage == 2:
        return share * grad_bytes / bandwidth, 0.0, share * grad_bytes / bandwidth
    return (2 * share * all_param_bytes + share * grad_bytes) / bandwidth, 0.0, 0.0


def _exposed(comm_s: float, compute_s: float, overlap: bool) -> float:
    """What of a collective is not hidden behind the compute it overlaps with."""
    hidden_behind = compute_s if overlap else 0.0
    return max(comm_s - hidden_behind, 0.0) + OVERLAP_INTERFERENCE * min(comm_s, hidden_behind)


def offload_seconds(profile: ModelProfile, shape: TrainShape, plan: Plan, gpu: GPUProfile,
                    accumulation: int) -> float:
    """PCIe transfers and host Adam of one step under optimizer / parameter offload."""
    seconds = 0.0
    partition = _trainable_elems(profile, shape) / plan.world_size
    pcie = gpu.pcie_bandwidth_gbps * 1e9
    if plan.offload_optimizer != "none":
        seconds += (4 + 2) * partition / pcie
        seconds += partition * plan.gpus_per_node / CPU_ADAM_ELEMS_PER_S_PER_NODE
    if plan.offload_params != "none":
        seconds += accumulation * 2 * 2 * count_parameters(profile).total / plan.world_size / pcie
    return seconds


def step_time(profile: ModelProfile, shape: TrainShape, plan: Plan, gpu: GPUProfile,
              accumulation: int) -> StepTime:
    """Predicted seconds and throughput of one optimizer step."""
    flops = shape_flops(profile, shape)
    factors = backward_factors(shape)
    recompute = 0
    if shape.grad_ckpt:
        recompute = (flops.llm_forward if factors["llm"] else 0) + (flops.vision_forward if factors["vision"] == 2 else 0)
    efficiency = float(gpu.calibrated.get("compute_efficiency", DEFAULT_COMPUTE_EFFICIENCY))
    peak_flops = gpu.bf16_dense_tflops * 1e12
    compute = (flops.total + recompute) / (peak_flops * efficiency)
    acts = activation_bytes(profile, shape)
    memory_bound = MEMORY_TRAFFIC_PER_SAVED_BYTE * (acts.saved + acts.logits_backward_transient) / (
        gpu.hbm_bandwidth_gbps * 1e9)
    if shape.grad_ckpt:
        memory_bound *= 1.5
    layers = profile.vision.num_layers + profile.llm.num_layers
    layer_overhead = layers * float(gpu.calibrated.get("layer_overhead_s", DEFAULT_LAYER_OVERHEAD_S))
    micro = compute + memory_bound + layer_overhead + stage3_overhead_seconds(profile, plan, gpu)
    every_micro, once, serial = communication_seconds(profile, shape, plan, gpu)
    overlap = plan.overlap_comm or plan.stage == 3
    exposed_micro = _exposed(every_micro, micro, overlap)
    serial += _exposed(once, micro, overlap)
    offload = offload_seconds(profile, shape, plan, gpu, accumulation)
    optimizer = 0.0 if plan.offload_optimizer != "none" else (
        ADAM_BYTES_PER_ELEM * _trainable_elems(profile, shape) / plan.world_size / (gpu.hbm_bandwidth_gbps * 1e9))
    step = accumulation * (micro + exposed_micro) + serial + offload + optimizer
    tokens = shape.micro_batch * shape.seq_len * accumulation * plan.world_size
    model_flops_per_gpu = flops.total * accumulation / step
    return StepTime(
        compute_s=accumulation * compute, memory_bound_s=accumulation * memory_bound,
        exposed_comm_s=accumulation * exposed_micro + serial, offload_s=offload, optimizer_s=optimizer,
        step_s=step, tokens_per_s=tokens / step, tokens_per_s_per_gpu=tokens / step / plan.world_size,
        samples_per_s=shape.micro_batch * accumulation * plan.world_size / step,
        model_tflops_per_gpu=model_flops_per_gpu / 1e12, mfu=model_flops_per_gpu / peak_flops,
    )
