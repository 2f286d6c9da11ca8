"""Per-rank entry point: train InternVL under a zeroplan plan for a few steps and measure it.

    torchrun --nproc_per_node N -m zeroplan.runner.train --spec SPEC.json --result RESULT.json
    deepspeed --num_gpus N --master_port P --module zeroplan.runner.train --spec ... --result ...

On a machine without CUDA it runs on the CPU with gloo (DS_ACCELERATOR=cpu). Rank 0 writes the
result JSON (atomically); a rank that fails writes it too, since the others may hang. Exit
status: 0 ok, 3 out of GPU memory, 1 any other error.
"""

from __future__ import annotations

import argparse
import os

from zeroplan.core.bounded import MAX_INPUT_BYTES, read_text_bounded
from zeroplan.core.run import RunSpec
from zeroplan.runner.record import (EXIT_ERROR, EXIT_OK, EXIT_OOM, base_result, collect, exit_now, finish,
                                     init_distributed, mean_over_ranks, one_line, set_up, wait_for_all_ranks,
                                     write_result)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="zeroplan.runner.train", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="RunSpec JSON file")
    parser.add_argument("--result", required=True, help="where rank 0 writes the result JSON")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by DeepSpeed's launcher")
    return parser.parse_args(argv)


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

    from zeroplan.runner import data, measure, model as model_setup, states
    from zeroplan.runner.config import run_config

    if spec.trainer == "hf":  # transformers.Trainer with the hf stack's printed arguments
        from zeroplan.runner import hf_trainer

        return hf_trainer.train(spec, cuda, rank, world_size, local_rank, result)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    profile, image_token_id, shape, plan, gpu = set_up(spec, cuda, world_size, result)
    client = spec.offload_optimizer == "none"
    ds_config, source = run_config(spec, profile, shape, plan, client)
    result.update(ds_config=ds_config, ds_config_source=source)
    result["memory_cap_bytes"] = measure.cap_memory(spec, gpu, cuda)

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
    result["model_states"] = states.engine_states(engine, spec.stage, spec.offload_optimizer != "none")
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


def main(argv: list[str] | None = None) -> int:
    """Run one spec on this rank; see the module docstring for exit statuses."""
    args = parse_args(argv)
    spec = RunSpec.from_json(read_text_bounded(args.spec, MAX_INPUT_BYTES, "run spec"))
    result = base_result(spec)
    rank, code = int(os.environ.get("RANK", "0")), EXIT_ERROR
    try:
        cuda, rank, world_size, local_rank = init_distributed(spec)
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
    if rank == 0 or code != EXIT_OK or spec.simulated:  # a rehearsed rank is the whole record
        write_result(args.result, result)
    if code == EXIT_OK:
        wait_for_all_ranks()
    return code


if __name__ == "__main__":
    exit_now(main())
