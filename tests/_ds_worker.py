"""One rank of test_partition_deepspeed: starts a real DeepSpeed engine on the CPU (gloo) for each
case, runs one forward/backward/step of the tiny InternVL and writes the model-state bytes it
really holds to <out_dir>/<case>.rank<r>.json.

Run as `python tests/_ds_worker.py CASES_JSON OUT_DIR` with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set (the test starts one such process per rank).

Measurement points, each field as DeepSpeed holds it:
- grads: after backward, before step: distinct storages behind every param's `.grad`, the
  optimizer's `averaged_gradients`, `grads_in_partition`, `grad_partitions_flat_buffer`,
  `temp_grad_buffer_for_gpu_offload` (stage 1/2 offload).
- step_fp32_grads: while the wrapped torch optimizer steps: the `.grad`s of its (fp32) params.
- params, master_weights, optimizer_states: after the step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

TOWER_PREFIXES = {"vision": "model.vision_tower.", "projector": "model.multi_modal_projector."}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind the tensors (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _flatten(value):
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    out = []
    for item in value:
        out += _flatten(item)
    return out


def _tower(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    if ".lora_" in name:
        return "lora"
    for tower, prefix in TOWER_PREFIXES.items():
        if name.startswith(prefix):
            return tower
    return "llm"


def build_model(case: dict):
    """The tiny InternVL in bf16 with the case's towers frozen (and PEFT LoRA on the LLM)."""
    from zeroplan.adapters.hf_model import build_model as build
    from zeroplan.core.profiles import load_model

    torch.manual_seed(0)
    model = build(load_model("tiny"), device="cpu", dtype=torch.bfloat16, attn_implementation="eager")
    if case.get("lora_rank"):
        import peft

        config = peft.LoraConfig(r=case["lora_rank"], lora_alpha=2 * case["lora_rank"], target_modules=LORA_TARGETS)
        model = peft.get_peft_model(model, config)
    frozen = set(case["frozen"]) | ({"llm"} if case.get("lora_rank") else set())
    for name, param in model.named_parameters():
        param.requires_grad = _tower(name) not in frozen
    return model


def ds_config(case: dict) -> dict:
    """The engine config as zeroplan's runner writes it (bf16, one client AdamW)."""
    zero = {
        "stage": case["stage"],
        "reduce_bucket_size": case.get("reduce_bucket_elems", 1_000_000),
        "allgather_bucket_size": case.get("allgather_bucket_elems", 1_000_000),
        "overlap_comm": case.get("overlap_comm", True),
        "contiguous_gradients": case.get("contiguous_gradients", True),
    }
    if case["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = case["param_persistence_threshold"]
        zero["sub_group_size"] = case.get("sub_group_elems", 1_000_000_000)
        zero["stage3_prefetch_bucket_size"] = 100_000
    if case.get("offload_optimizer", "none") != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def batch(tiles: int = 2, text_tokens: int = 6) -> dict:
    """pixel_values for `tiles` tiles and input_ids with 4 image tokens per tile."""
    from zeroplan.adapters.hf_model import image_token_id
    from zeroplan.core.profiles import load_model

    profile = load_model("tiny")
    image = torch.full((profile.tokens_per_tile * tiles,), image_token_id(profile), dtype=torch.long)
    text = torch.arange(1, text_tokens + 1, dtype=torch.long)
    input_ids = torch.cat([text[:2], image, text[2:]]).unsqueeze(0)
    size = profile.vision.image_size
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(tiles, 3, size, size, generator=generator).to(torch.bfloat16)
    return {"input_ids": input_ids, "pixel_values": pixel_values, "labels": input_ids.clone()}


def measure_grads(engine, stage: int, offloaded: bool) -> int:
    """On the CPU every buffer is on the same device, so the ones DeepSpeed puts on the host under
    offload (stage 3's grad_partitions_flat_buffer) are left out by name."""
    optimizer = engine.optimizer
    tensors = [p.grad for p in engine.module.parameters()]
    host = ("grad_partitions_flat_buffer",) if offloaded else ()
    for attr in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
                 "temp_grad_buffer_for_gpu_offload"):
        if attr in host:
            continue
        tensors += _flatten(getattr(optimizer, attr, None))
    return _storage_bytes(tensors)


def measure_params(engine, stage: int) -> int:
    if stage < 3:
        return _storage_bytes(p.data for p in engine.module.parameters())
    tensors = []
    for param in engine.module.parameters():
        tensors += [param.ds_tensor, param.data]
    return _storage_bytes(tensors)


def master_tensors(optimizer, stage: int):
    if stage == 0:
        return _flatten(optimizer.fp32_groups)
    if stage in (1, 2):
        return list(optimizer.single_partition_of_fp32_groups)
    return list(optimizer.fp32_partitioned_groups_flat)


def measure_states(basic) -> int:
    return _storage_bytes(state[key] for state in basic.state.values() for key in ("exp_avg", "exp_avg_sq")
                          if key in state)


def partition_counts(engine, stage: int) -> tuple[int, int]:
    optimizer = engine.optimizer
    if stage == 0:
        return sum(p.numel() for p in _flatten(optimizer.fp32_groups)), 0
    if stage in (1, 2):
        return int(optimizer.partition_size[0]), int(optimizer.groups_padding[0])
    elems = sum(int(p.partition_numel()) for group in optimizer.fp16_groups for p in group)
    return elems, int(sum(sum(group) for group in optimizer.groups_padding))


def offload_cpu_bytes(engine, stage: int) -> int:
    optimizer = engine.optimizer
    tensors = master_tensors(optimizer, stage)
    tensors += [t.grad for t in tensors]
    for attr in ("param_buffer_of_bit16_for_cpu_offload_groups", "temp_grad_buffer_for_cpu_offload",
                 "grad_partitions_flat_buffer"):
        tensors += _flatten(getattr(optimizer, attr, None))
    return _storage_bytes(tensors) + measure_states(optimizer.optimizer)


def run_case(case: dict, out_dir: Path) -> None:
    import deepspeed

    stage = case["stage"]
    model = build_model(case)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(case))
    basic = engine.optimizer.optimizer
    step_grads: list[int] = []
    inner_step = basic.step

    def recording_step(*args, **kwargs):
        step_grads.append(_storage_bytes(p.grad for g in basic.param_groups for p in g["params"]))
        return inner_step(*args, **kwargs)

    basic.step = recording_step
    loss = engine(**batch()).loss
    engine.backward(loss)
    offloaded = case.get("offload_optimizer", "none") != "none"
    grads = measure_grads(engine, stage, offloaded)
    engine.step()
    elems, padding = partition_counts(engine, stage)
    result = {
        "params": measure_params(engine, stage),
        "grads": grads,
        "master_weights": 0 if offloaded else _storage_bytes(master_tensors(engine.optimizer, stage)),
        "optimizer_states": 0 if offloaded else measure_states(basic),
        "cpu_bytes": offload_cpu_bytes(engine, stage) if offloaded else 0,
        "partition_elems": elems,
        "padding_elems": padding,
        "step_fp32_grads": 0 if offloaded else max(step_grads),
        "optimizer_class": type(engine.optimizer).__name__,
        "loss": float(loss),
    }
    rank = int(os.environ["RANK"])
    (out_dir / f"{case['name']}.rank{rank}.json").write_text(json.dumps(result))
    engine.destroy()


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for case in cases:
        run_case(case, out_dir)
    torch.distributed.barrier()  # every rank has written its results


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown: gloo's and DeepSpeed's CPU comm threads sometimes
    # abort in static destructors ("terminate called without an active exception") after every
    # result is written, which turned a good run into a failed rank (as zeroplan.runner.train does).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
