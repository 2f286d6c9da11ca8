"""One rank of test_partition_deepspeed: starts a real DeepSpeed engine on the CPU (gloo) for each
case, runs one forward/backward/step of the tiny InternVL and writes the model-state bytes it
really holds to <out_dir>/<case>.rank<r>.json.

Run as `python tests/_ds_worker.py CASES_JSON OUT_DIR` with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set (the test starts one such process per rank). With ZP_REHEARSE=1 the
process is alone: it plays rank RANK of WORLD_SIZE on torch's fake process group, as the runner's
rehearsal does (zeroplan.runner.rehearsal), and names its files <case>.fake.rank<r>.json.

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

from zeroplan.runner import states

TOWER_PREFIXES = {"vision": "model.vision_tower.", "projector": "model.multi_modal_projector."}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


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
    for attr in states.GRAD_BUFFERS:
        if attr not in host:
            tensors += states.flatten(getattr(optimizer, attr, None))
    return states.storage_bytes(tensors)


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
        step_grads.append(states.storage_bytes(p.grad for g in basic.param_groups for p in g["params"]))
        return inner_step(*args, **kwargs)

    basic.step = recording_step
    loss = engine(**batch()).loss
    engine.backward(loss)
    offloaded = case.get("offload_optimizer", "none") != "none"
    grads = measure_grads(engine, stage, offloaded)
    engine.step()
    result = states.engine_states(engine, stage, offloaded)
    result.update(grads=grads, step_fp32_grads=0 if offloaded else max(step_grads), loss=float(loss))
    rank = int(os.environ["RANK"])
    kind = "fake." if os.environ.get("ZP_REHEARSE") else ""
    (out_dir / f"{case['name']}.{kind}rank{rank}.json").write_text(json.dumps(result))
    engine.destroy()


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import deepspeed

    if os.environ.get("ZP_REHEARSE"):
        from zeroplan.runner import rehearsal

        rehearsal.start(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
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
