"""What a run reports and how a rank leaves: the result record (stable keys, the prediction beside
the measurement, every rank's peaks gathered), the process group, and the exit. Shared by the
runner's own loop (zeroplan.runner.train) and its HF Trainer path (zeroplan.runner.hf_trainer)."""

from __future__ import annotations

import json
import os
import sys

from zeroplan.core.run import RunSpec

EXIT_OK, EXIT_ERROR, EXIT_OOM = 0, 1, 3
STABLE_KEYS = ("model", "stage", "micro_batch", "seq_len", "tiles", "grad_ckpt", "world_size", "status", "device",
               "predicted_peak_bytes", "measured_peak_allocated_bytes", "measured_peak_reserved_bytes",
               "tokens_per_s", "mfu", "step_time_s", "final_loss")


def init_distributed(spec: RunSpec | None = None) -> tuple[bool, int, int, int]:
    """Start the process group before any model is built (InternVL's rule under ZeRO-3):
    nccl on CUDA, gloo with DeepSpeed's CPU accelerator otherwise; for a rehearsed rank, torch's
    fake process group as rank R of N (zeroplan.runner.rehearsal), alone on GPU 0. Returns (cuda,
    rank, world, local rank)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if spec is not None and spec.simulated:
        from zeroplan.runner import rehearsal

        if cuda:
            torch.cuda.set_device(0)
        rehearsal.start(spec.simulate_rank, spec.simulate_world)
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")  # finds the fake group started
        return cuda, spec.simulate_rank, spec.simulate_world, 0
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return cuda, torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def predicted_step(profile, shape, plan, gpu, gradient_accumulation: int = 1) -> dict:
    """zeroplan's step-time model for one optimizer step of the run (all its micro-steps, as
    step_time_s measures)."""
    from zeroplan.core.steptime import step_time

    time = step_time(profile, shape, plan, gpu, gradient_accumulation)
    return {"predicted_step_time_s": time.step_s, "predicted_tokens_per_s": time.tokens_per_s,
            "predicted_mfu": time.mfu, "predicted_step": time.as_dict()}


def deepspeed_estimate(profile, shape, plan) -> dict | None:
    """DeepSpeed's own model-state estimators for the run, the report's baseline column."""
    try:
        from zeroplan.adapters.deepspeed_adapter import estimator_bytes

        return estimator_bytes(profile, shape, plan)
    except Exception as error:  # noqa: BLE001 - the baseline must never fail a training run
        return {"reason": f"{type(error).__name__}: {error}"}


def set_up(spec: RunSpec, cuda: bool, world_size: int, result: dict):
    """What both training paths start from: the model profile and image token, the shape, the plan
    the DeepSpeed config carries (buckets and ZeRO-3 knobs tuned to the model, so the prediction and
    the run describe the same thing), the GPU profile; the environment and every prediction are put
    into `result`. Returns (profile, image_token_id, shape, plan, gpu)."""
    from zeroplan.runner import measure, model as model_setup

    if world_size != spec.job_world_size:
        raise RuntimeError(f"launched with {world_size} ranks but the spec asks for {spec.job_world_size}")
    profile, image_token_id = model_setup.resolve(spec)
    shape = spec.shape()
    plan = run_plan(spec, profile, shape)
    gpu = resolve_gpu(spec, cuda)
    result.update(measure.environment(cuda, None))
    rank = spec.simulate_rank if spec.simulated else None
    result.update(gpu_profile=gpu.name, **measure.prediction(profile, shape, plan, gpu, spec.gradient_accumulation,
                                                             rank=rank))
    result["deepspeed_estimator_bytes"] = deepspeed_estimate(profile, shape, plan)
    result.update(predicted_step(profile, shape, plan, gpu, spec.gradient_accumulation))
    return profile, image_token_id, shape, plan, gpu


def run_plan(spec: RunSpec, profile, shape):
    """The plan the run's DeepSpeed config carries: the spec's own config file read back
    (zeroplan.runner.config.user_config), else the spec's plan with buckets and ZeRO-3 knobs tuned
    to the model, as `recommend` writes them."""
    from zeroplan.core.tuning import tuned_plan

    if spec.ds_config:
        from zeroplan.runner.config import user_config

        return user_config(spec, profile)[1]
    return tuned_plan(profile, shape, spec.plan())


def mean_over_ranks(value) -> float:
    """The loss averaged over ranks (each rank saw different samples); a rehearsed rank's own."""
    import torch.distributed as dist

    from zeroplan.runner import rehearsal

    if rehearsal.active():
        return float(value)
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return float(value) / dist.get_world_size()


def resolve_gpu(spec: RunSpec, cuda: bool):
    """The spec's GPU profile; else the bundled one matching the device's name; else the default."""
    from zeroplan.core.profiles import DEFAULT_GPU, load_gpu, match_gpu_name

    if spec.gpu:
        return load_gpu(spec.gpu)
    if cuda:
        import torch

        found = match_gpu_name(torch.cuda.get_device_name())
        if found is not None:
            return found
    return load_gpu(DEFAULT_GPU)


def collect(spec, profile, gpu, meter, init_peaks: dict, step_peaks: dict, world_size: int) -> dict:
    """Job-wide throughput and FLOPs, and every rank's memory peaks, gathered from every rank (a
    rehearsed rank's own, its speed kept apart as the compute part: see rehearsal_view)."""
    from zeroplan.runner import measure

    records = measure.combine_ranks(measure.gather_to_all(meter.records))
    counted = 1 if spec.simulated else world_size
    out = measure.throughput(records, spec.warmup_steps, counted, gpu.bf16_dense_tflops * 1e12)
    out["patch_tokens_per_s"] = measure.patch_tokens_per_s(out["tiles_per_s"], profile)
    out.update(outside_allocator(meter.nvml_process_samples))
    out["peak_reserved_after_step_bytes"] = meter.reserved_after_step
    out.update(alloc_retries=step_peaks.get("alloc_retries"), ooms=step_peaks.get("ooms"))
    per_rank = measure.gather_to_all({"init": init_peaks, "steps": step_peaks,
                                      "nvml_peak_used_bytes": max(meter.nvml_used_bytes, default=None)})
    allocated = [r["steps"]["peak_allocated_bytes"] for r in per_rank]
    reserved = [r["steps"]["peak_reserved_bytes"] for r in per_rank]
    init_allocated = [r["init"]["peak_allocated_bytes"] for r in per_rank]
    nvml_used = [r["nvml_peak_used_bytes"] for r in per_rank]
    out.update(
        per_rank_peak_allocated_bytes=allocated, per_rank_peak_reserved_bytes=reserved,
        per_rank_init_peak_allocated_bytes=init_allocated, per_rank_nvml_peak_used_bytes=nvml_used,
        per_rank_host_peak_rss_bytes=[r["steps"]["host_peak_rss_bytes"] for r in per_rank],
        measured_peak_allocated_bytes=_max_or_none(allocated), measured_peak_reserved_bytes=_max_or_none(reserved),
        init_peak_allocated_bytes=_max_or_none(init_allocated), nvml_peak_used_bytes=_max_or_none(nvml_used),
        bf16_dense_tflops_per_gpu=gpu.bf16_dense_tflops,
    )
    return rehearsal_view(spec, out) if spec.simulated else out


# What a run measures of its speed: a rehearsed rank's steps have no communication in them, so
# these move under "compute" and the job-level keys stay None (never fitted or reported as a real
# step time; zeroplan.lab.stepfit and calibrate skip them).
SPEED_KEYS = ("step_time_s", "step_times_s", "tokens_per_s", "text_tokens_per_s", "image_tokens_per_s",
              "samples_per_s", "tiles_per_s", "patch_tokens_per_s", "achieved_tflops", "achieved_tflops_per_gpu",
              "mfu")


def rehearsal_view(spec: RunSpec, out: dict) -> dict:
    """A rehearsed rank's record: its speed as the compute part of one rank, the world it played."""
    out["compute"] = {key: out.get(key) for key in SPEED_KEYS}
    out.update({key: None for key in SPEED_KEYS})
    out["simulated"] = {"world_size": spec.simulate_world, "rank": spec.simulate_rank,
                        "process_group": "fake", "communication": "none (collectives move no data)"}
    return out


def outside_allocator(samples: list[tuple[int, int]]) -> dict:
    """From NVML's per-process memory and the allocator's reserved bytes read together after each
    step: this process's peak device memory and the most it held outside PyTorch's allocator (the
    CUDA context, cuBLAS's and NCCL's own buffers)."""
    if not samples:
        return {"nvml_process_peak_used_bytes": None, "outside_allocator_bytes": None}
    return {"nvml_process_peak_used_bytes": max(own for own, _ in samples),
            "outside_allocator_bytes": max(own - reserved for own, reserved in samples)}


def _max_or_none(values: list) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def base_result(spec: RunSpec) -> dict:
    """Every stable key, with the spec's fields filled in and the measurements still None."""
    result = {key: None for key in STABLE_KEYS}
    result.update(spec.to_dict())
    result.update(point_id=spec.point_id(), spec=spec.to_dict(), status="error", losses=[])
    return result


def finish(result: dict) -> dict:
    """Fill the derived keys (final loss, prediction errors) once the run has ended."""
    from zeroplan.runner import measure

    if result.get("losses"):
        result["final_loss"] = result["losses"][-1]
        result["first_loss"] = result["losses"][0]
    result.update(measure.prediction_errors(result))
    return result


def write_result(path: str, result: dict) -> None:
    """Atomic write: the sweep never reads half a result."""
    from zeroplan.core.atomic import write_atomic

    write_atomic(path, json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:500]


def wait_for_all_ranks() -> None:
    """A barrier, where a process group exists: ranks leave together once the result is written."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: gloo's and DeepSpeed's CPU comm threads
    sometimes abort in static destructors ("terminate called without an active exception")
    after the result is safely written, which would turn a good run into a failed exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
