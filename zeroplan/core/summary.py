"""One plan's predictions as plain data: what `estimate --json` prints and `validate` reports, the
per-GPU memory breakdown beside the step time and throughput of the same plan."""

from __future__ import annotations

from zeroplan.core.fit import DEFAULT_HEADROOM, fit_verdict
from zeroplan.core.memory import MemoryBreakdown
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import ModelProfile
from zeroplan.core.steptime import StepTime


def plan_summary(profile: ModelProfile, shape: TrainShape, plan: Plan, gpu_name: str, gpu_origin: str,
                 memory: MemoryBreakdown, step: StepTime, gradient_accumulation: int,
                 deepspeed_estimator: dict | None, headroom: float = DEFAULT_HEADROOM) -> dict:
    """The plan, its memory (bytes per GPU, the peak's phase, capacity, headroom, the verdict of
    core.fit against the usable memory, host memory per node) and its predicted step (seconds per optimizer step of `gradient_accumulation`
    micro-steps, tokens/s for the whole job, MFU), with DeepSpeed's estimator beside it."""
    return {
        "model": profile.name, "gpu": gpu_name, "gpu_origin": gpu_origin,
        "world_size": plan.world_size, "gpus_per_node": plan.gpus_per_node, "nodes": plan.nodes,
        "stage": plan.stage, "micro_batch": shape.micro_batch, "gradient_accumulation": gradient_accumulation,
        "seq_len": shape.seq_len, "tiles": shape.tiles,
        "grad_ckpt": shape.grad_ckpt, "ckpt_layers": shape.ckpt_layers,
        "optimizer_group_elems": plan.optimizer_group_elems, "frozen": sorted(shape.frozen), "lora_rank": shape.lora_rank,
        "offload_optimizer": plan.offload_optimizer, "offload_params": plan.offload_params,
        "per_gpu_bytes": memory.per_gpu_bytes(), "breakdown_bytes": memory.as_dict(),
        "capacity_bytes": memory.capacity, "headroom_bytes": memory.headroom(),
        **fit_verdict(memory.peak, memory.capacity, headroom),
        "cpu_bytes_per_node": memory.cpu_bytes_per_node,
        "predicted_step_time_s": step.step_s, "predicted_tokens_per_s": step.tokens_per_s,
        "predicted_tokens_per_s_per_gpu": step.tokens_per_s_per_gpu, "predicted_mfu": step.mfu,
        "deepspeed_estimator_bytes": deepspeed_estimator,
    }
