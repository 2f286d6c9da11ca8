"""Model FLOPs of one InternVL training step, counted per tower (pure: plain Python over profiles).

What is counted: the matrix multiplications of the forward pass (2 FLOPs per multiply-add) and of
the backward pass, with no recomputation (gradient checkpointing's second forward is not useful
work, so MFU leaves it out, as in PaLM's definition of MFU, Chowdhery et al. 2022, appendix B).
- Vision: every tile runs InternViT over its patches plus the class token: patch embedding,
  q/k/v/output projections, MLP, and attention's quadratic term (QKᵀ and AV: 4·n²·width per layer).
- Projector: per tile, tokens_per_tile rows through Linear(4·Dv→Dl) and Linear(Dl→Dl).
- LLM: per token, q/k/v/o (grouped-query k/v are narrower), the gated MLP (3 matrices), the LM
  head over the vocabulary; per sequence (or packed segment) of length L, causal attention's
  QKᵀ and AV over the L·(L+1)/2 query-key pairs the causal kernels compute.
Backward: a tower whose weights train costs 2× its forward (input gradient + weight gradient);
a frozen tower through which gradient must still flow to a trained tower before it (vision →
projector → LLM) costs 1× (input gradient only); a frozen tower with nothing trained before it
costs nothing. LoRA adapters add their own small matmuls, trained (3× forward).
Norms, activations, softmax and the optimizer step are not counted (they are not matmuls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from zeroplan.core.params import LORA_TARGETS
from zeroplan.core.plan import TrainShape
from zeroplan.core.profiles import ModelProfile

ORDER = ("vision", "projector", "llm")


@dataclass(frozen=True)
class StepFlops:
    """Forward and backward FLOPs of one step, per tower (ints); `total` is all of them."""

    vision_forward: int
    vision_backward: int
    projector_forward: int
    projector_backward: int
    llm_forward: int
    llm_backward: int

    @property
    def total(self) -> int:
        """Every counted FLOP of the step: forward + backward of every tower."""
        return (self.vision_forward + self.vision_backward + self.projector_forward
                + self.projector_backward + self.llm_forward + self.llm_backward)

    def as_dict(self) -> dict[str, int]:
        """Per-tower numbers plus the total, for JSON."""
        return {"vision_forward": self.vision_forward, "vision_backward": self.vision_backward,
                "projector_forward": self.projector_forward, "projector_backward": self.projector_backward,
                "llm_forward": self.llm_forward, "llm_backward": self.llm_backward, "total": self.total}


def vision_forward_flops_per_tile(profile: ModelProfile) -> int:
    """InternViT forward over one tile: patch conv, then per layer projections, MLP, attention."""
    vision = profile.vision
    width, tokens = vision.hidden_size, vision.patches_per_tile + 1
    patch_embedding = 2 * vision.patches_per_tile * 3 * vision.patch_size**2 * width
    projections = 2 * tokens * width * width * 4
    mlp = 2 * tokens * width * vision.intermediate_size * 2
    attention = 4 * tokens * tokens * width
    return patch_embedding + vision.num_layers * (projections + mlp + attention)


def projector_forward_flops_per_tile(profile: ModelProfile) -> int:
    """mlp1 over one tile's pixel-shuffled tokens."""
    width_out = profile.llm.hidden_size
    return 2 * profile.tokens_per_tile * (profile.projector_in_features * width_out + width_out * width_out)


def llm_linear_flops_per_token(profile: ModelProfile) -> int:
    """The LLM's matmuls for one token, attention's quadratic term excluded, LM head included."""
    llm = profile.llm
    q_width, kv_width = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    projections = 2 * llm.hidden_size * (2 * q_width + 2 * kv_width)
    mlp = 2 * 3 * llm.hidden_size * llm.intermediate_size
    return llm.num_layers * (projections + mlp) + 2 * llm.hidden_size * llm.vocab_size


def llm_attention_flops(profile: ModelProfile, length: int) -> int:
    """Causal QKᵀ and AV of one sequence (or packed segment) of `length` tokens, every layer."""
    llm = profile.llm
    pairs = length * (length + 1) // 2
    return llm.num_layers * 4 * pairs * llm.num_heads * llm.head_dim


def lora_forward_flops_per_token(profile: ModelProfile, rank: int) -> int:
    """LoRA's A and B matmuls on q/k/v/o/gate/up/down of every LLM layer, for one token."""
    if not rank:
        return 0
    llm = profile.llm
    q_width, kv_width = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    shapes = {"q_proj": (llm.hidden_size, q_width), "k_proj": (llm.hidden_size, kv_width),
              "v_proj": (llm.hidden_size, kv_width), "o_proj": (q_width, llm.hidden_size),
              "gate_proj": (llm.hidden_size, llm.intermediate_size),
              "up_proj": (llm.hidden_size, llm.intermediate_size),
              "down_proj": (llm.intermediate_size, llm.hidden_size)}
    return llm.num_layers * sum(2 * rank * (fan_in + fan_out) for fan_in, fan_out in
                                (shapes[target] for target in LORA_TARGETS))


def backward_factors(shape: TrainShape) -> dict[str, int]:
    """Backward cost per tower as a multiple of its forward: 2 trained, 1 pass-through, 0 none."""
    factors, upstream_trains = {}, False
    for tower in ORDER:
        trains = shape.trains(tower)
        factors[tower] = 2 if trains else (1 if upstream_trains else 0)
        upstream_trains = upstream_trains or trains
    if shape.lora_rank and factors["llm"] == 0:
        factors["llm"] = 1
    return factors


def step_flops(profile: ModelProfile, shape: TrainShape, tiles: int, segment_lengths: Sequence[int]) -> StepFlops:
    """FLOPs of one step over `tiles` image tiles and LLM sequences (or packed segments) of the
    given lengths, image tokens included; padding is not useful work, so leave it out."""
    factors = backward_factors(shape)
    tokens = sum(segment_lengths)
    vision = tiles * vision_forward_flops_per_tile(profile)
    projector = tiles * projector_forward_flops_per_tile(profile)
    llm = tokens * llm_linear_flops_per_token(profile) + sum(llm_attention_flops(profile, n) for n in segment_lengths)
    lora = tokens * lora_forward_flops_per_token(profile, shape.lora_rank)
    return StepFlops(vision_forward=vision, vision_backward=factors["vision"] * vision,
                     projector_forward=projector, projector_backward=factors["projector"] * projector,
                     llm_forward=llm + lora, llm_backward=factors["llm"] * llm + 2 * lora)


def shape_flops(profile: ModelProfile, shape: TrainShape) -> StepFlops:
    """FLOPs of one micro-batch of `shape` on one GPU: micro_batch sequences of seq_len tokens with
    `tiles` tiles each (packed sequences counted as one segment: an upper bound on attention)."""
    return step_flops(profile, shape, shape.micro_batch * shape.tiles, [shape.seq_len] * shape.micro_batch)
