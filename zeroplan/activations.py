"""Activation bytes of one micro-batch through transformers' native InternVL in bf16 with sdpa.

Each term counts the tensors autograd saves for backward (the activations that live from their
forward op until their backward op), read off the modules' forward code in transformers 5.17
(modeling_internvl.py, modeling_qwen2.py / modeling_llama.py, loss/loss_utils.py) and PyTorch's
derivative rules: a Linear saves its input, an elementwise product saves both factors, SiLU/GELU
save their input, LayerNorm its input (+ fp32 mean/rstd), sdpa's flash kernel q, k, v, output and
an fp32 log-sum-exp per head. Views share storage and are not counted twice. All figures are per
token (or per image token) and per layer; the callers multiply.
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroplan.plan import TrainShape
from zeroplan.profiles import LanguageModel, ModelProfile, VisionTower

BF16 = 2
FP32 = 4
LORA_DROPOUT_TARGETS_PER_LAYER = 7


@dataclass(frozen=True)
class ActivationBytes:
    """Activation memory of one micro-batch; `peak` adds the transient working set on top of the
    saved tensors at the moment that set is largest."""

    vision_saved: int
    projector_saved: int
    llm_saved: int
    logits_forward_transient: int
    logits_backward_transient: int
    recompute_transient: int
    vision_forward_transient: int

    @property
    def saved(self) -> int:
        """Bytes held from the end of forward until backward consumes them."""
        return self.vision_saved + self.projector_saved + self.llm_saved

    @property
    def vision(self) -> int:
        """Vision tower and projector share (reported separately from the LLM tokens)."""
        return self.vision_saved + self.projector_saved

    @property
    def llm(self) -> int:
        """LLM tokens' share, the loss's logits included."""
        return self.llm_saved + self.logits_backward_transient


def vision_layer_bytes_per_token(vision: VisionTower) -> int:
    """One InternViT layer, per patch token: LN1 in (+ 8 B of fp32 stats), its output (shared input of
    q/k/v), q, k, v and the attention output kept by flash sdpa (+ fp32 lse per head), the output
    projection's input (the attention output made contiguous), the projection output kept by the
    lambda_1 product, LN2 in (+ stats) and out, fc1 out (GELU input), GELU out (fc2 input), and
    fc2 out kept by the lambda_2 product. qk-norm (InternViT-6B) adds RMSNorm inputs/outputs of q, k."""
    width, inter = vision.hidden_size, vision.intermediate_size
    elements = 10 * width + 2 * inter
    if vision.qk_norm:
        elements += 2 * (2 * width) + 2 * width  # fp32 upcast of q and k, normalised q, k
    stats = 2 * 2 * FP32 + vision.num_heads * FP32
    return elements * BF16 + stats


def llm_layer_bytes_per_token(llm: LanguageModel, lora_rank: int = 0) -> int:
    """One decoder layer, per token. Each RMSNorm upcasts to fp32 and saves that (4H), its bf16
    normalised value (2H, for the weight's gradient) and its output (2H, the next Linear's input).
    Rotary embedding saves q, k and their rotate_half copies; flash sdpa with GQA (no repeat_kv when
    there is no mask) saves rotated q, k, v and its output; o_proj's input is a contiguous copy. The
    SwiGLU MLP keeps gate, up, SiLU(gate) and the product (down_proj's input). LoRA (PEFT, dropout
    0.05) adds per adapted Linear a dropout output and its mask, and the rank-r intermediate."""
    hidden, inter = llm.hidden_size, llm.intermediate_size
    q_width, kv_width = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    norms = 2 * (FP32 * hidden + BF16 * hidden + BF16 * hidden) + 2 * FP32
    attention = BF16 * (5 * q_width + 4 * kv_width) + llm.num_heads * FP32
    mlp = BF16 * 4 * inter
    total = norms + attention + mlp
    if lora_rank:
        adapted_inputs = 4 * hidden + q_width + 2 * hidden + inter  # q,k,v,o ; gate,up ; down
        total += (BF16 + 1) * adapted_inputs + BF16 * lora_rank * LORA_DROPOUT_TARGETS_PER_LAYER
    return total


def projector_bytes_per_image_token(profile: ModelProfile) -> int:
    """mlp1 per image token: LayerNorm input and output (4·Dv each, + fp32 stats), the GELU input and
    output (Dl each, linear_1's output and linear_2's input)."""
    return BF16 * (2 * profile.projector_in_features + 2 * profile.llm.hidden_size) + 2 * FP32


def logits_bytes_per_token(vocab_size: int) -> tuple[int, int]:
    """(forward transient, backward transient) of the loss per token.

    Forward: lm_head's bf16 logits (2V), the fp32 upcast in ForCausalLMLoss (4V) and log_softmax's
    output (4V, saved) are alive together. Backward start: log_softmax's saved output, nll_loss's
    dense fp32 gradient and log_softmax's fp32 input gradient (3 × 4V) are alive together."""
    return 10 * vocab_size, 12 * vocab_size


def activation_bytes(profile: ModelProfile, shape: TrainShape) -> ActivationBytes:
    """Saved and transient activation bytes of one micro-batch (bf16, sdpa/flash attention)."""
    vision, llm = profile.vision, profile.llm
    tiles = shape.micro_batch * shape.tiles
    patch_tokens = tiles * (vision.patches_per_tile + 1)
    image_tokens = tiles * profile.tokens_per_tile
    tokens = shape.micro_batch * shape.seq_len
    vision_grad_flows = shape.trains("vision")
    projector_grad_flows = shape.trains("projector") or vision_grad_flows
    llm_grad_flows = shape.trains("llm") or bool(shape.lora_rank) or projector_grad_flows

    per_vision_layer = vision_layer_bytes_per_token(vision) * patch_tokens
    per_llm_layer = llm_layer_bytes_per_token(llm, shape.lora_rank) * tokens
    if shape.grad_ckpt:
        vision_saved = vision.num_layers * BF16 * vision.hidden_size * patch_tokens if vision_grad_flows else 0
        llm_saved = llm.num_layers * BF16 * llm.hidden_size * tokens
        recompute = max(per_llm_layer, per_vision_layer if vision_grad_flows else 0)
    else:
        vision_saved = vision.num_layers * per_vision_layer if vision_grad_flows else 0
        llm_saved = llm.num_layers * per_llm_layer
        recompute = 0
    if not llm_grad_flows:
        llm_saved, recompute = 0, 0
    final_norm = (FP32 + 2 * BF16) * llm.hidden_size * tokens
    logits_forward, logits_backward = logits_bytes_per_token(llm.vocab_size)
    return ActivationBytes(
        vision_saved=vision_saved,
        projector_saved=projector_bytes_per_image_token(profile) * image_tokens if projector_grad_flows else 0,
        llm_saved=llm_saved + final_norm,
        logits_forward_transient=logits_forward * tokens,
        logits_backward_transient=logits_backward * tokens,
        recompute_transient=recompute,
        vision_forward_transient=0 if vision_grad_flows else per_vision_layer,
    )
