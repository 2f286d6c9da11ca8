"""RunSpec: everything that defines one measured training run, as plain data (no torch here).

The sweep writes a RunSpec to JSON, launches `zeroplan.runner.train` on it and reads the result;
`point_id()` names the run so a sweep can skip points it has already measured.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from zeroplan.core.errors import InvalidInput
from zeroplan.core.plan import KERNELS, OFFLOAD_DEVICES, Plan, TrainShape

TOWERS = ("vision", "projector", "llm")
MAX_STEPS = 100_000  # a measured run is minutes; the replays of a run's draws loop over its steps
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "varlen")
NOT_IN_POINT_ID = frozenset({"steps", "warmup_steps"})
# Fields added after points were measured: left out of the point id at their default, so the
# points measured before they existed keep their ids (and sweeps keep resuming).
LATER_DEFAULTS = {"kernels": "eager", "compile": False, "gradient_accumulation": 1, "vocab_multiple": 1,
                  "ckpt_layers": None, "optimizer_group_elems": 0, "timing": "sync", "trainer": "zeroplan",
                  "simulate_world": 0, "simulate_rank": 0, "ds_config": None}
MAX_SIMULATED_WORLD = 1 << 16
GPUS_PER_NODE = 8  # a rehearsed world of more than 8 is described as nodes of 8 (how InternVL's jobs run)
TIMINGS = ("sync", "wall")
RUNNER_TRAINERS = ("zeroplan", "hf")


@dataclass(frozen=True)
class RunSpec:
    """One training run: model, ZeRO plan, micro-batch shape, data and how long to measure.

    `model` is a profile name/path, or a local checkpoint folder (with config.json).
    `seq_len` counts image tokens too, as InternVL's max_seq_length does; `tiles` is the most
    tiles a sample holds (exactly that many when `fixed_tiles`), as InternVL's max_dynamic_patch
    plus the thumbnail. `dataset` is an InternVL
    JSONL file (None: synthetic batches). `gpu` names the GPU profile used for MFU and the
    prediction (None: matched from the device name, else zeroplan's default). `lr` is AdamW's
    learning rate (InternVL's fine-tunes use 2e-5 to 4e-5; tests use more to see the loss fall).
    `kernels` "liger" swaps in Liger-Kernel's fused norms, SwiGLU, RoPE and linear cross-entropy
    (CUDA only); `compile` runs each decoder and vision layer through torch.compile;
    `attn_implementation` "varlen" is torch's variable-length flash attention over packed rows.
    `gradient_accumulation` micro-steps make one optimizer step (a measured step is all of them).
    `vocab_multiple` pads the vocabulary (embedding and lm_head rows) to a multiple, for aligned
    matrix products; the padded rows are never a label. `ckpt_layers` (with `grad_ckpt`)
    checkpoints only the first that many decoder layers, every vision layer still (None: all).
    `optimizer_group_elems` (ZeRO-1/2) hands AdamW its parameters in consecutive groups of at most
    that many elements, so DeepSpeed's step converts one group's gradients to fp32 at a time.
    `timing` "sync" times each step between two CUDA synchronisations and reads the allocator's
    peaks per phase (forward, backward, step); "wall" runs the steps as an ordinary training loop
    does (no synchronisation and no per-phase reading inside the loop, the losses read at the end)
    and times them boundary to boundary on the host, the last one up to a final synchronisation.
    `trainer` "hf" runs the step through transformers.Trainer (TrainingArguments from the hf
    stack's launch arguments) instead of zeroplan's own loop.
    `simulate_world` N > 0 rehearses rank `simulate_rank` of an N-GPU job in one process on one GPU
    (torch's fake process group: every ZeRO partition, buffer and padding sized for N, the
    collectives moving no data; zeroplan.runner.rehearsal); 0 is a real run of `world_size` ranks.
    `ds_config` names a DeepSpeed JSON config to train under instead of the one zeroplan renders
    from the plan (its ZeRO block, buckets and offload as written, "auto" filled the way the HF
    Trainer fills it); its stage and offloads must be the spec's.
    """

    model: str = "tiny"
    stage: int = 2
    micro_batch: int = 1
    seq_len: int = 4096
    tiles: int = 7
    grad_ckpt: bool = True
    frozen: tuple[str, ...] = ()
    lora_rank: int = 0
    offload_optimizer: str = "none"
    offload_params: str = "none"
    steps: int = 8
    warmup_steps: int = 3
    gpu: str | None = None
    dataset: str | None = None
    seed: int = 0
    attn_implementation: str = "sdpa"
    packed: bool = False
    world_size: int = 1
    fixed_tiles: bool = False
    lr: float = 2e-5
    kernels: str = "eager"
    compile: bool = False
    gradient_accumulation: int = 1
    vocab_multiple: int = 1
    ckpt_layers: int | None = None
    optimizer_group_elems: int = 0
    timing: str = "sync"
    trainer: str = "zeroplan"
    simulate_world: int = 0
    simulate_rank: int = 0
    ds_config: str | None = None

    def __post_init__(self):
        for name in ("grad_ckpt", "packed", "fixed_tiles", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInput(f"{name} must be true or false, got {getattr(self, name)!r:.60}")
        for name in ("model", "gpu", "dataset", "ds_config"):
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and name != "model")):
                raise InvalidInput(f"{name} must be a string, got {value!r:.60}")
        if not isinstance(self.frozen, (list, tuple)) or not all(isinstance(t, str) for t in self.frozen):
            raise InvalidInput(f"frozen must be a list of tower names, got {self.frozen!r:.60}")
        object.__setattr__(self, "frozen", tuple(sorted(set(self.frozen))))
        unknown = set(self.frozen) - set(TOWERS)
        if unknown:
            raise InvalidInput(f"cannot freeze {', '.join(sorted(unknown))}: freeze vision, projector or llm")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise InvalidInput(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        for name in ("offload_optimizer", "offload_params"):
            if getattr(self, name) not in OFFLOAD_DEVICES:
                raise InvalidInput(f"{name} must be one of {', '.join(OFFLOAD_DEVICES)}")
        for name, low in (("steps", 1), ("warmup_steps", 0), ("world_size", 1), ("seed", 0),
                          ("gradient_accumulation", 1), ("vocab_multiple", 1), ("simulate_world", 0),
                          ("simulate_rank", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInput(f"{name} must be a whole number >= {low}, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise InvalidInput(f"lr must be a number between 0 and 1, got {self.lr!r}")
        if self.trainer not in RUNNER_TRAINERS:
            raise InvalidInput(f"trainer must be one of {', '.join(RUNNER_TRAINERS)}, got {self.trainer!r}")
        if self.kernels not in KERNELS:
            raise InvalidInput(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.timing not in TIMINGS:
            raise InvalidInput(f"timing must be one of {', '.join(TIMINGS)}, got {self.timing!r}")
        if self.attn_implementation == "varlen" and not self.packed:
            raise InvalidInput("varlen attention needs packed rows (packed = true)")
        if self.steps > MAX_STEPS:
            raise InvalidInput(f"steps must be at most {MAX_STEPS}, got {self.steps}")
        if self.warmup_steps >= self.steps:
            raise InvalidInput(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        self._check_rehearsal()
        self.shape(), self.plan()

    def _check_rehearsal(self) -> None:
        if not self.simulate_world:
            if self.simulate_rank:
                raise InvalidInput("simulate_rank needs simulate_world (the world size the rank is part of)")
            return
        if self.simulate_world > MAX_SIMULATED_WORLD:
            raise InvalidInput(f"simulate_world must be at most {MAX_SIMULATED_WORLD}, got {self.simulate_world}")
        if self.simulate_rank >= self.simulate_world:
            raise InvalidInput(f"simulate_rank must be below simulate_world ({self.simulate_world}), "
                               f"got {self.simulate_rank}")
        if self.world_size != 1:
            raise InvalidInput("a rehearsed rank runs alone: world_size must be 1 with simulate_world")
        if self.trainer != "zeroplan":
            raise InvalidInput("rehearsal runs zeroplan's own loop (trainer \"zeroplan\")")

    @property
    def simulated(self) -> bool:
        """Whether this run rehearses one rank of a larger job on the fake process group."""
        return self.simulate_world > 0

    @property
    def job_world_size(self) -> int:
        """The data-parallel world the run's ZeRO partitions are sized for."""
        return self.simulate_world or self.world_size

    def shape(self) -> TrainShape:
        """The TrainShape the estimator sees for this run."""
        return TrainShape(micro_batch=self.micro_batch, seq_len=self.seq_len, tiles=self.tiles,
                          grad_ckpt=self.grad_ckpt, frozen=frozenset(self.frozen), lora_rank=self.lora_rank,
                          packed=self.packed, kernels=self.kernels, compiled=self.compile,
                          ckpt_layers=self.ckpt_layers)

    def plan(self) -> Plan:
        """The Plan of this run, zeroplan's default buckets: one node of `world_size` GPUs, or the
        rehearsed world (nodes of 8 where it is a multiple of 8 above 8)."""
        world = self.job_world_size
        per_node, nodes = ((GPUS_PER_NODE, world // GPUS_PER_NODE)
                           if self.simulated and world > GPUS_PER_NODE and world % GPUS_PER_NODE == 0 else (world, 1))
        return Plan(stage=self.stage, gpus_per_node=per_node, nodes=nodes,
                    offload_optimizer=self.offload_optimizer, offload_params=self.offload_params,
                    optimizer_group_elems=self.optimizer_group_elems)

    def to_dict(self) -> dict:
        """Plain JSON-able fields."""
        data = asdict(self)
        data["frozen"] = list(self.frozen)
        return data

    def to_json(self) -> str:
        """JSON text with sorted keys (stable across runs)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        """Inverse of to_dict; unknown keys are an error, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidInput(f"unknown RunSpec fields: {', '.join(sorted(unknown))}")
        data = dict(data)
        if isinstance(data.get("frozen"), list):
            data["frozen"] = tuple(data["frozen"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        """Inverse of to_json."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise InvalidInput(f"RunSpec is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise InvalidInput("RunSpec JSON must be an object")
        return cls.from_dict(data)

    def point_id(self) -> str:
        """Stable 16-hex-digit name of the measured point: a hash of every field that changes what
        is run (steps and warmup_steps only change how long it is measured, so they are left out)."""
        data = {k: v for k, v in self.to_dict().items()
                if k not in NOT_IN_POINT_ID and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
