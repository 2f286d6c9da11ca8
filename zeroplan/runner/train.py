"""Per-rank entry point: train InternVL under a zeroplan plan for a few steps and measure it.

    torchrun --nproc_per_node N -m zeroplan.runner.train --spec SPEC.json --result RESULT.json
    deepspeed --num_gpus N --master_port P --module zeroplan.runner.train --spec ... --result ...

On a machine without CUDA it runs on the CPU with gloo (DS_ACCELERATOR=cpu). Rank 0 writes the
result JSON (atomically); a rank that fails writes it too, since the others may hang. Exit
status: 0 ok, 3 out of GPU memory, 1 any other error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from zeroplan.core.bounded import MAX_INPUT_BYTES, read_text_bounded
from zeroplan.core.run import RunSpec

EXIT_OK, EXIT_ERROR, EXIT_OOM = 0, 1, 3
STABLE_KEYS = ("model", "stage", "micro_batch", "seq_len", "tiles", "grad_ckpt", "world_size", "status", "device",
               "predicted_peak_bytes", "measured_peak_allocated_bytes", "measured_peak_reserved_bytes",
               "tokens_per_s", "mfu", "step_time_s", "final_loss")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="zeroplan.runner.train", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="RunSpec JSON file")
    parser.add_argument("--result", required=True, help="where rank 0 writes the result JSON")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by DeepSpeed's launcher")
    return parser.parse_args(argv)


def init_distributed() -> tuple[bool, int, int, int]:
    """Start the process group before any model is built (InternVL's rule under ZeRO-3):
    nccl on CUDA, gloo with DeepSpeed's CPU accelerator otherwise. Returns (cuda, rank, world, local rank)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
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


def make_optimizer(spec: RunSpec, params: list, cuda: bool):
    """torch AdamW as DeepSpeed's client optimizer (fused on CUDA: no JIT build), its parameters in
    the spec's optimizer groups, or None under optimizer offload, where DeepSpeed builds its CPU
    Adam from the config."""
    import torch

    if spec.offload_optimizer != "none":
        return None
    if spec.optimizer_group_elems:  # the planned groups (zeroplan.core.partition.optimizer_groups)
        from zeroplan.core.partition import optimizer_groups

        groups, start = [], 0
        for sizes in optimizer_groups(tuple(p.numel() for p in params), spec.optimizer_group_elems):
            groups.append({"params": params[start:start + len(sizes)]})
            start += len(sizes)
        params = groups
    return torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
                             **({"fused": True} if cuda else {}))


def train(spec: RunSpec, cuda: bool, rank: int, world_size: int, local_rank: int, result: dict) -> None:
    """Build, train `spec.steps` steps, and fill `result` as it goes (so a failure keeps what is known)."""
    import deepspeed
    import torch

    from zeroplan.runner import data, measure, model as model_setup
    from zeroplan.runner.config import deepspeed_config

    if spec.trainer == "hf":  # transformers.Trainer with the hf stack's printed arguments
        from zeroplan.runner import hf_trainer

        return hf_trainer.train(spec, cuda, rank, world_size, local_rank, result)
    if world_size != spec.world_size:
        raise RuntimeError(f"launched with {world_size} ranks but the spec asks for {spec.world_size}")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    profile, image_token_id = model_setup.resolve(spec)
    from zeroplan.core.tuning import tuned_plan

    # The plan the DeepSpeed config carries (buckets and ZeRO-3 knobs tuned to the model), so the
    # prediction and the run describe the same thing.
    shape = spec.shape()
    plan = tuned_plan(profile, shape, spec.plan())
    gpu = resolve_gpu(spec, cuda)
    result.update(measure.environment(cuda, None))
    result.update(gpu_profile=gpu.name, **measure.prediction(profile, shape, plan, gpu, spec.gradient_accumulation))
    result["deepspeed_estimator_bytes"] = deepspeed_estimate(profile, shape, plan)
    result.update(predicted_step(profile, shape, plan, gpu, spec.gradient_accumulation))
    client = spec.offload_optimizer == "none"
    ds_config, source = deepspeed_config(profile, shape, plan, spec.micro_batch, spec.lr, client,
                                         spec.gradient_accumulation)
    result.update(ds_config=ds_config, ds_config_source=source)

    history = measure.MemoryHistory.from_environment(cuda, rank)
    history.start()
    model = model_setup.build(spec, profile, ds_config, device)
    model = model_setup.prepare_for_training(model, spec, shape)
    result["speed_options"] = model_setup.speed_up(model, spec)
    trainable = model_setup.trainable_parameters(model)
    optimizer = make_optimizer(spec, trainable, cuda)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                      model_parameters=None if optimizer else trainable)
    result["trainable_params"] = int(sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable))
    init_peaks = measure.memory_peaks(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    nvml = measure.open_nvml(cuda, local_rank)
    lean = spec.timing == "wall"  # as an ordinary loop: nothing read or synchronised inside the steps
    # FLOPs (MFU) count the model's real vocabulary, not the padding rows.
    meter = measure.StepMeter(model_setup.flops_profile(spec, profile), shape, cuda, nvml, synchronize=not lean)
    phases = measure.PhasePeaks(cuda, enabled=not lean)
    batches = data.batches(profile, image_token_id, spec, rank, world_size)
    losses, step_losses = result.setdefault("losses", []), []
    profiler = measure.StepProfiler.from_environment(cuda, rank)
    for index in range(spec.steps):
        micro = [next(batches) for _ in range(spec.gradient_accumulation)]
        step_loss = 0.0
        with profiler.around(index == spec.steps - 1), meter.step(data.merged(micro)):
            for batch in micro:
                inputs = model_inputs(batch, spec, device)
                with phases.phase("forward"):
                    loss = engine(**inputs).loss
                with phases.phase("backward"):
                    engine.backward(loss)
                with phases.phase("step"):
                    engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
                step_loss = step_loss + loss.detach().float()
        step_losses.append(step_loss / len(micro))
        if not lean:
            losses.append(mean_over_ranks(step_losses.pop()))
    meter.finish()
    losses.extend(mean_over_ranks(loss) for loss in step_losses)

    step_peaks = measure.memory_peaks(cuda)
    if phases.allocated:  # the counters were reset per phase: the steps' peak is the largest phase's
        step_peaks.update(peak_allocated_bytes=max(phases.allocated.values()),
                          peak_reserved_bytes=max(phases.reserved.values()))
    result.update(collect(spec, profile, gpu, meter, init_peaks, step_peaks, world_size))
    result["per_rank_phase_peaks"] = measure.gather_to_all(phases.as_dict())
    history.dump()
    result.update(measure.environment(cuda, nvml))


def model_inputs(batch, spec: RunSpec, device) -> dict:
    """The micro-batch's tensors on the device, bf16 pixels, and varlen attention's sample bounds."""
    import torch

    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    if spec.attn_implementation == "varlen":
        from zeroplan.runner.fast import varlen_kwargs

        bounds = varlen_kwargs(batch.inputs["position_ids"])
        bounds["cu_seq_lens_q"] = bounds["cu_seq_lens_k"] = bounds["cu_seq_lens_q"].to(device)
        inputs.update(bounds)
    # No KV cache in training; with one, transformers also ignores packed position_ids.
    inputs["use_cache"] = False
    return inputs


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


def mean_over_ranks(value) -> float:
    """The loss averaged over ranks (each rank saw different samples)."""
    import torch.distributed as dist

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
    """Job-wide throughput and FLOPs, and every rank's memory peaks, gathered from every rank."""
    from zeroplan.runner import measure

    records = measure.combine_ranks(measure.gather_to_all(meter.records))
    out = measure.throughput(records, spec.warmup_steps, world_size, gpu.bf16_dense_tflops * 1e12)
    out["patch_tokens_per_s"] = measure.patch_tokens_per_s(out["tiles_per_s"], profile)
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
    return out


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


def main(argv: list[str] | None = None) -> int:
    """Run one spec on this rank; see the module docstring for exit statuses."""
    args = parse_args(argv)
    spec = RunSpec.from_json(read_text_bounded(args.spec, MAX_INPUT_BYTES, "run spec"))
    result = base_result(spec)
    rank, code = int(os.environ.get("RANK", "0")), EXIT_ERROR
    try:
        cuda, rank, world_size, local_rank = init_distributed()
        result["world_size_launched"] = world_size
        train(spec, cuda, rank, world_size, local_rank, result)
        result.update(status="ok", reason=None)
        code = EXIT_OK
    except Exception as error:  # noqa: BLE001 - every failure becomes a result with a reason
        oom = type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()
        result.update(status="oom" if oom else "error", reason=one_line(error), failed_rank=rank)
        code = EXIT_OOM if oom else EXIT_ERROR
        import traceback

        traceback.print_exc()
    finish(result)
    if rank == 0 or code != EXIT_OK:
        write_result(args.result, result)
    if code == EXIT_OK:
        _wait_for_all_ranks()
    return code


def _wait_for_all_ranks() -> None:
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


if __name__ == "__main__":
    exit_now(main())
