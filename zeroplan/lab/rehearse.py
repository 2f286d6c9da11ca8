"""Rehearse a plan before queueing it: ranks of an N-GPU job, each alone on the local GPU as the
bundled runner trains them (RunSpec.simulate_world), their measured memory beside the prediction
and judged against the target GPU's capacity.

What it measures: every byte PyTorch's allocator holds on that rank (model states partitioned for
N, buckets, activations, the optimizer step) and the process's device memory (NVML). What it does
not: the collectives' time, and NCCL's own buffers, which NCCL allocates outside PyTorch's
allocator when the job's communicators start (a few hundred MiB per communicator on a real job).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zeroplan.core.bounded import MAX_INPUT_BYTES, read_text_bounded, require_file
from zeroplan.core.config_reader import plan_from_config
from zeroplan.core.errors import InvalidConfig, InvalidInput
from zeroplan.core.plan import TrainShape, cluster
from zeroplan.core.profiles import GPUProfile, ModelProfile
from zeroplan.core.run import RunSpec
from zeroplan.lab.sweep import resolve_model

REHEARSAL_STEPS = 4  # Adam's states appear in the first step; the peak is met by the second or third
REHEARSAL_WARMUP = 1
MAX_RANKS = 8


@dataclass(frozen=True)
class Rehearsal:
    """What to rehearse: the run (model, shape, plan through its config or stage), the world it is
    part of and which of its ranks."""

    specs: tuple[RunSpec, ...]
    world_size: int
    target: GPUProfile
    config_path: str | None


def ranks_to_run(world_size: int, ranks: str | None) -> tuple[int, ...]:
    """The ranks asked for (`0,63`), or the first and the last (where ZeRO's padding falls)."""
    if ranks is None:
        return (0,) if world_size == 1 else (0, world_size - 1)
    try:
        chosen = tuple(dict.fromkeys(int(part) for part in ranks.split(",")))
    except ValueError:
        raise InvalidInput(f"--ranks must be comma-separated whole numbers, got {ranks!r}") from None
    bad = [rank for rank in chosen if not 0 <= rank < world_size]
    if bad:
        raise InvalidInput(f"--ranks {bad[0]} is outside a world of {world_size} GPUs (ranks 0 to {world_size - 1})")
    if not chosen or len(chosen) > MAX_RANKS:
        raise InvalidInput(f"--ranks names 1 to {MAX_RANKS} ranks, got {len(chosen)}")
    return chosen


def read_config(path: str) -> dict:
    """The user's DeepSpeed config (bounded read, one JSON object)."""
    require_file(Path(path), "DeepSpeed config")
    try:
        config = json.loads(read_text_bounded(path, MAX_INPUT_BYTES, "DeepSpeed config"))
    except (ValueError, RecursionError) as error:
        raise InvalidInput(f"--config {path} is not valid JSON: {' '.join(str(error).split())[:200]}") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"--config {path} must hold one JSON object (a DeepSpeed config)")
    return config


def build(model: str, profile: ModelProfile, shape: TrainShape, gpus: int, target: GPUProfile, ranks: str | None,
          config_path: str | None, stage: int, offload_optimizer: str, offload_params: str,
          micro_batch: int | None, gradient_accumulation: int | None, steps: int = REHEARSAL_STEPS) -> Rehearsal:
    """The rehearsed points: with a config, its stage, offloads, buckets and batch numbers ("auto"
    taking --micro-batch / --grad-accum, else 1); without one, the stage and offloads given and the
    buckets zeroplan tunes (what `recommend` writes)."""
    per_node, nodes = cluster(gpus, None, None)
    world = per_node * nodes
    micro, accum = micro_batch or 1, gradient_accumulation or 1
    if config_path is not None:
        config = read_config(config_path)
        try:
            plan, micro, accum = plan_from_config(config, per_node, nodes, hidden_size=profile.llm.hidden_size,
                                                  micro_batch=micro_batch, gradient_accumulation=gradient_accumulation)
        except InvalidConfig as error:
            raise InvalidInput(f"--config {config_path}: {error}") from None
        stage, offload_optimizer, offload_params = plan.stage, plan.offload_optimizer, plan.offload_params
        config_path = str(Path(config_path).resolve())
    specs = tuple(RunSpec(model=resolve_model(model), stage=stage, micro_batch=micro, seq_len=shape.seq_len,
                          tiles=shape.tiles, grad_ckpt=shape.grad_ckpt, frozen=tuple(sorted(shape.frozen)),
                          lora_rank=shape.lora_rank, offload_optimizer=offload_optimizer,
                          offload_params=offload_params, gradient_accumulation=accum, steps=steps,
                          warmup_steps=REHEARSAL_WARMUP, gpu=target.name, fixed_tiles=True,
                          simulate_world=world, simulate_rank=rank, ds_config=config_path)
                  for rank in ranks_to_run(world, ranks))
    return Rehearsal(specs, world, target, config_path)


@dataclass(frozen=True)
class RankOutcome:
    """One rehearsed rank: measured beside predicted, and whether it fits the target."""

    rank: int
    status: str
    reason: str
    predicted_allocated: int | None
    predicted_reserved: int | None
    predicted_device: int | None
    measured_allocated: int | None
    measured_reserved: int | None
    measured_device: int | None
    outside_allocator: int | None
    fits: bool | None
    compute_step_s: float | None


def outcome(record: dict, target: GPUProfile) -> RankOutcome:
    """A rank's record judged against the target GPU: it fits when it ran and its device memory
    (NVML's for the process, else reserved plus the target's CUDA context) is within the target's
    capacity; out of memory does not fit; an error decides nothing."""
    simulated = record.get("simulated") or {}
    context = int(target.calibrated.get("cuda_context_bytes", target.cuda_context_bytes))
    reserved = record.get("measured_peak_reserved_bytes")
    device = record.get("nvml_process_peak_used_bytes")
    if device is None and reserved is not None:
        device = reserved + context
    status = str(record.get("status", "error"))
    fits = None
    if status == "oom":
        fits = False
    elif status == "ok" and device is not None:
        fits = device <= target.memory_bytes
    return RankOutcome(
        rank=int(simulated.get("rank", record.get("spec", {}).get("simulate_rank", 0))), status=status,
        reason=str(record.get("reason") or ""), predicted_allocated=record.get("predicted_peak_allocated_bytes"),
        predicted_reserved=record.get("predicted_peak_reserved_bytes"),
        predicted_device=record.get("predicted_peak_bytes"), measured_allocated=record.get("measured_peak_allocated_bytes"),
        measured_reserved=reserved, measured_device=device, outside_allocator=record.get("outside_allocator_bytes"),
        fits=fits, compute_step_s=(record.get("compute") or {}).get("step_time_s"))


def verdict(outcomes: list[RankOutcome]) -> tuple[str, int]:
    """(one line, exit status): 0 every rank fits, 3 one does not, 1 a rank failed otherwise."""
    if any(o.fits is False for o in outcomes):
        worst = [o.rank for o in outcomes if o.fits is False]
        return f"does not fit: rank {', '.join(map(str, worst))} needs more than the target GPU has", 3
    if any(o.fits is None for o in outcomes):
        failed = next(o for o in outcomes if o.fits is None)
        if failed.status == "ok":
            return f"rank {failed.rank} ran but measured no GPU memory (it trained on the CPU)", 1
        return f"rank {failed.rank} did not finish ({failed.status}): {failed.reason or 'see its log'}", 1
    return "fits: every rehearsed rank stays within the target GPU's memory", 0
