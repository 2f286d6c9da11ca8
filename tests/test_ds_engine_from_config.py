"""Configs zeroplan renders start a real DeepSpeed engine and train one step.

One subprocess (this file run as a script: gloo, world size 1, DS_ACCELERATOR=cpu) builds the
tiny InternVL for each case, starts deepspeed.initialize from the rendered config and runs one
forward/backward/step. The "hf" flavour has its "auto" values filled by transformers' own
HfTrainerDeepSpeedConfig, as the HF Trainer would. The cases with DeepSpeed's AdamW block add
`"torch_adam": true` to that block on the way into the engine, so DeepSpeed builds the optimizer
from the block's type and params as torch.optim.AdamW instead of JIT-compiling its fused Adam op for
the CPU (about 35 s on a fresh 2-core machine, and not the op a GPU run uses anyway); the test
checks that the engine's optimizer carries the block's lr, betas, eps and weight decay.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
CASES = [
    {"name": "concrete-client-z0", "flavour": "concrete", "optimizer": "client", "stage": 0},
    {"name": "concrete-client-z1", "flavour": "concrete", "optimizer": "client", "stage": 1},
    {"name": "concrete-client-z2", "flavour": "concrete", "optimizer": "client", "stage": 2},
    {"name": "concrete-client-z3", "flavour": "concrete", "optimizer": "client", "stage": 3},
    {"name": "concrete-adamw-z2", "flavour": "concrete", "optimizer": "adamw", "stage": 2},
    {"name": "hf-adamw-z1", "flavour": "hf", "optimizer": "adamw", "stage": 1},
    {"name": "hf-adamw-z3", "flavour": "hf", "optimizer": "adamw", "stage": 3},
]
TRAINER_ARGS = dict(world_size=1, per_device_train_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0,
                    learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.05,
                    save_on_each_node=False, fp16=False, fp16_full_eval=False, bf16=True, bf16_full_eval=False)


def rendered_config(case: dict) -> dict:
    """The config under test, exactly as zeroplan renders it for the tiny model on one GPU."""
    from zeroplan.core.dsconfig import render
    from zeroplan.core.plan import Plan, TrainShape
    from zeroplan.core.profiles import load_model

    shape = TrainShape(seq_len=64, tiles=2, frozen=frozenset({"vision"}))
    plan = Plan(stage=case["stage"], gpus_per_node=1, nodes=1)
    return render(load_model("tiny"), shape, plan, micro_batch=1, gradient_accumulation=1, flavour=case["flavour"],
                  optimizer=case["optimizer"], lr=1e-4, tune=True)


def trainer_filled(config: dict, model) -> dict:
    """The config after the HF Trainer's two filling passes (transformers' own code)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = SimpleNamespace(**TRAINER_ARGS, get_warmup_steps=lambda steps: 0)
    hf = HfTrainerDeepSpeedConfig(config)
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, model, num_training_steps=1)
    return hf.config


def _batch():
    import torch

    from zeroplan.adapters.hf_model import image_token_id
    from zeroplan.core.profiles import load_model

    profile = load_model("tiny")
    tiles, size = 2, profile.vision.image_size
    image = torch.full((profile.tokens_per_tile * tiles,), image_token_id(profile), dtype=torch.long)
    text = torch.arange(1, 7, dtype=torch.long)
    input_ids = torch.cat([text[:2], image, text[2:]]).unsqueeze(0)
    pixel_values = torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    return {"input_ids": input_ids, "pixel_values": pixel_values, "labels": input_ids.clone()}


def run_case(case: dict) -> dict:
    """Start the engine from the case's config and train one step; report what the engine took."""
    import deepspeed
    import torch

    from zeroplan.adapters.hf_model import build_model
    from zeroplan.core.profiles import load_model

    torch.manual_seed(0)
    model = build_model(load_model("tiny"), device="cpu")
    for name, param in model.named_parameters():
        param.requires_grad = not name.startswith("model.vision_tower.")
    config = rendered_config(case)
    if case["flavour"] == "hf":
        config = trainer_filled(config, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    client = torch.optim.AdamW(trainable, lr=1e-4) if case["optimizer"] == "client" else None
    engine_config = copy.deepcopy(config)
    if client is None:
        engine_config["optimizer"]["params"]["torch_adam"] = True
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=client, config=engine_config)
    basic = engine.basic_optimizer
    group = {key: basic.defaults[key] for key in ("lr", "betas", "eps", "weight_decay")}  # as DeepSpeed built it
    loss = engine(**_batch()).loss
    engine.backward(loss)
    engine.step()
    return {"loss": float(loss), "global_steps": engine.global_steps, "stage": engine.zero_optimization_stage(),
            "micro_batch": engine.train_micro_batch_size_per_gpu(), "bf16": engine.bfloat16_enabled(),
            "optimizer": type(engine.optimizer).__name__, "basic_optimizer": type(basic).__name__,
            "optimizer_group": {**group, "betas": list(group["betas"])}, "config": config}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "results.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_engine_trains_one_step_from_the_rendered_config(engine_results, case):
    result = engine_results[case["name"]]
    assert "error" not in result, result.get("error")
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert result["global_steps"] == 1
    assert (result["stage"], result["micro_batch"], result["bf16"]) == (case["stage"], 1, True)
    if case["flavour"] == "hf":
        from zeroplan.core.dsconfig import auto_fields

        assert auto_fields(result["config"]) == []
        assert result["config"]["optimizer"]["params"]["lr"] == TRAINER_ARGS["learning_rate"]
    if case["optimizer"] == "adamw":
        block = result["config"]["optimizer"]
        assert block["type"] == "AdamW" and result["basic_optimizer"] == "AdamW"
        assert result["optimizer_group"] == {key: block["params"][key] for key in ("lr", "betas", "eps", "weight_decay")}


def _main(out_path: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for case in CASES:
        try:
            results[case["name"]] = run_case(case)
        except Exception as error:  # noqa: BLE001 - reported per case to the test
            results[case["name"]] = {"error": f"{type(error).__name__}: {error}"}
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _main(sys.argv[1])
    # The results are written: skip the interpreter's teardown, where gloo's and DeepSpeed's CPU
    # comm threads sometimes abort ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
