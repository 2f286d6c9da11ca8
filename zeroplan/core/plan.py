"""The two inputs every estimate takes besides the profiles: what is trained (TrainShape) and how
DeepSpeed shards it (Plan). Both are frozen dataclasses validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from zeroplan.core.cluster import Network
from zeroplan.core.errors import InvalidInput

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
KERNELS = ("eager", "liger", "liger-loss")
MAX_GPUS = 1 << 20


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low} and {high}, got {value}")


@dataclass(frozen=True)
class TrainShape:
    """One micro-batch and what is trained.

    `seq_len` counts every LLM token of a sample, the image tokens (tiles × tokens_per_tile)
    included, as InternVL's max_seq_length does. `tiles` is the number of 448 px tiles per sample
    (the thumbnail counted). Towers named in `frozen` get no gradients or optimizer state;
    `lora_rank` > 0 freezes the LLM's base weights and trains PEFT LoRA adapters on it instead.
    `packed` rows hold several samples that do not attend to each other (varlen attention).
    `kernels` is how the model's elementwise work and loss run: "eager" is transformers' own
    modules (the loss upcasts the whole [tokens, vocab] logits to fp32); "liger" is Liger-Kernel's
    fused RMSNorm/LayerNorm, SwiGLU, RoPE and fused linear cross-entropy (logits are never
    materialised whole); "liger-loss" is only the fused linear cross-entropy (the layers stay
    transformers' own, e.g. for torch.compile to fuse). `compiled`: each decoder and vision layer
    runs under torch.compile (regional compilation). `ckpt_layers`: with `grad_ckpt`, how many of
    the LLM's decoder layers are checkpointed, the first ones (None: all); the vision tower's
    layers are checkpointed whenever `grad_ckpt` is on (they free the most memory per recomputed
    FLOP). Checkpointing only some layers buys the memory that is short and no more.
    """

    micro_batch: int = 1
    seq_len: int = 4096
    tiles: int = 7
    grad_ckpt: bool = True
    frozen: frozenset[str] = field(default_factory=frozenset)
    lora_rank: int = 0
    packed: bool = False
    kernels: str = "eager"
    compiled: bool = False
    ckpt_layers: int | None = None

    def __post_init__(self):
        _check_int("micro-batch", self.micro_batch, 1, 4096)
        _check_int("sequence length", self.seq_len, 1, 1 << 22)
        _check_int("tiles", self.tiles, 0, 1024)
        _check_int("LoRA rank", self.lora_rank, 0, 65536)
        unknown = set(self.frozen) - {"vision", "projector", "llm"}
        if unknown:
            raise InvalidInput(f"cannot freeze {', '.join(sorted(unknown))}: freeze vision, projector or llm")
        object.__setattr__(self, "frozen", frozenset(self.frozen))
        if self.kernels not in KERNELS:
            raise InvalidInput(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.ckpt_layers is not None:
            _check_int("checkpointed layers", self.ckpt_layers, 0, 1 << 16)
            if not self.grad_ckpt:
                raise InvalidInput("checkpointed layers need checkpointing on")

    def llm_ckpt_layers(self, num_layers: int) -> int:
        """How many of the LLM's `num_layers` decoder layers recompute in backward (the first ones)."""
        if not self.grad_ckpt:
            return 0
        return num_layers if self.ckpt_layers is None else min(self.ckpt_layers, num_layers)

    def trains(self, tower: str) -> bool:
        """Whether the tower's own (non-LoRA) weights get gradients."""
        if tower == "llm" and self.lora_rank:
            return False
        return tower not in self.frozen


@dataclass(frozen=True)
class Plan:
    """How DeepSpeed shards and places the model states, and the cluster it runs on.

    `optimizer_group_elems` (ZeRO-1/2 only; 0: one group): the training script hands the optimizer
    its parameters in consecutive groups of at most this many elements. DeepSpeed's ZeRO-1/2 step
    flattens each group's gradient slice to bf16 and converts it to fp32 one group at a time, so
    the step's temporaries are one group's, not the whole slice's (6 bytes per element).
    `network` (zeroplan.core.cluster): the interconnect the user stated; None takes the GPU
    profile's default links.
    """

    stage: int = 3
    gpus_per_node: int = 8
    nodes: int = 1
    offload_optimizer: str = "none"
    offload_params: str = "none"
    reduce_bucket_elems: int = 500_000_000
    allgather_bucket_elems: int = 500_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    prefetch_bucket_elems: int = 50_000_000
    max_live_params: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    sub_group_elems: int = 1_000_000_000
    optimizer_group_elems: int = 0
    network: Network | None = None

    def __post_init__(self):
        _check_int("ZeRO stage", self.stage, 0, 3)
        _check_int("GPUs per node", self.gpus_per_node, 1, 1024)
        _check_int("nodes", self.nodes, 1, MAX_GPUS)
        if self.world_size > MAX_GPUS:
            raise InvalidInput(f"at most {MAX_GPUS} GPUs are supported, got {self.world_size}")
        for name in ("offload_optimizer", "offload_params"):
            if getattr(self, name) not in OFFLOAD_DEVICES:
                raise InvalidInput(f"{name.replace('_', ' ')} must be one of {', '.join(OFFLOAD_DEVICES)}")
        if self.offload_optimizer != "none" and self.stage == 0:
            raise InvalidInput("optimizer offload needs ZeRO stage 1, 2 or 3")
        if self.offload_params != "none" and self.stage != 3:
            raise InvalidInput("parameter offload needs ZeRO stage 3")
        for name in ("reduce_bucket_elems", "allgather_bucket_elems", "prefetch_bucket_elems",
                     "max_live_params", "param_persistence_threshold", "sub_group_elems",
                     "optimizer_group_elems"):
            _check_int(name.replace("_", " "), getattr(self, name), 0, 1 << 40)
        if self.optimizer_group_elems and self.stage not in (1, 2):
            raise InvalidInput("optimizer groups only change ZeRO-1/2's step: use them with stage 1 or 2")

    @property
    def world_size(self) -> int:
        """Data-parallel ranks: every GPU of every node."""
        return self.gpus_per_node * self.nodes

    def with_(self, **changes) -> "Plan":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def cluster(gpus: int | None, nodes: int | None, gpus_per_node: int | None) -> tuple[int, int]:
    """Resolve --gpus / --nodes / --gpus-per-node into (gpus_per_node, nodes).

    --gpus alone fills nodes of 8 (or of fewer when fewer GPUs are asked for)."""
    for name, value in (("--gpus", gpus), ("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value is not None:
            _check_int(name, value, 1, MAX_GPUS)
    if gpus is None:
        per_node = gpus_per_node or 8
        return per_node, nodes or 1
    if gpus_per_node is None:
        per_node = gpus if nodes is None and gpus <= 8 else (gpus // nodes if nodes else 8)
    else:
        per_node = gpus_per_node
    nodes_given = nodes
    if nodes is None:
        nodes = math.ceil(gpus / per_node)
    if per_node * nodes != gpus:
        if gpus_per_node is None and nodes_given is None:
            raise InvalidInput(f"--gpus {gpus} does not fill nodes of {per_node}: give --gpus-per-node with a "
                               f"number that divides {gpus} (e.g. {_divisors_hint(gpus)}), or use "
                               f"--gpus {gpus // per_node * per_node or per_node} or --gpus {nodes * per_node}")
        given = f"--nodes {nodes_given}" if gpus_per_node is None else f"--gpus-per-node {per_node}"
        raise InvalidInput(f"--gpus {gpus} cannot be split as {given}: --gpus must be a multiple of it "
                           f"(or drop {given.split()[0]})")
    return per_node, nodes


def _divisors_hint(gpus: int) -> str:
    """A few node sizes (GPUs per node, at most 16) that divide `gpus`, as options."""
    sizes = [size for size in range(16, 1, -1) if gpus % size == 0][:3]
    return " or ".join(f"--gpus-per-node {size}" for size in sizes) or "--gpus-per-node 1"


def parse_freeze(values: list[str] | None) -> frozenset[str]:
    """--freeze vision --freeze llm, or --freeze vision,llm."""
    towers: set[str] = set()
    for value in values or []:
        towers.update(part.strip().lower() for part in value.split(",") if part.strip())
    return frozenset(towers)


def shape_from_values(micro_batch: int, seq_len: int, tiles: int, grad_ckpt: bool, freeze: list[str] | None,
                lora_rank: int, profile=None) -> TrainShape:
    """TrainShape from command-line or spec values; checks that the image tokens fit in the sequence."""
    shape = TrainShape(micro_batch=micro_batch, seq_len=seq_len, tiles=tiles, grad_ckpt=grad_ckpt,
                       frozen=parse_freeze(freeze), lora_rank=lora_rank)
    if profile is not None and tiles * profile.tokens_per_tile >= seq_len:
        raise InvalidInput(f"--tiles {tiles} make {tiles * profile.tokens_per_tile} image tokens, which do not fit in "
                           f"--seq-len {seq_len}; raise --seq-len or lower --tiles")
    return shape
