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

from zeroplan.core.plan import TrainShape
from zeroplan.core.profiles import LanguageModel, ModelProfile, VisionTower
from zeroplan.core.dtypes import BF16_BYTES, FP32_BYTES

BF16, FP32 = BF16_BYTES, FP32_BYTES  # the short names the formulas here read
LORA_TARGETS_PER_LAYER = 7  # q, k, v, o, gate, up, down (zeroplan.runner.model LORA_PATTERN)


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
    llm_full_layer_saved: int = 0       # what a decoder layer that is not checkpointed keeps
    llm_checkpointed_layer_saved: int = 0  # what a checkpointed one keeps (its input)
    llm_uncheckpointed_layers: int = 0  # the last ones: checkpointing takes the first layers

    def last_layers_saved(self, layers: int) -> int:
        """What the last `layers` decoder layers keep: the first ones backward releases."""
        full = min(layers, self.llm_uncheckpointed_layers)
        return full * self.llm_full_layer_saved + (layers - full) * self.llm_checkpointed_layer_saved

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


def llm_layer_bytes_per_token(llm: LanguageModel, lora_rank: int = 0, kernels: str = "eager",
                              packed: bool = False, compiled: bool = False) -> int:
    """One decoder layer, per token. Each RMSNorm upcasts to fp32 and saves that (4H), its bf16
    normalised value (2H, for the weight's gradient) and its output (2H, the next Linear's input).
    Rotary embedding saves nothing per token: `q * cos + rotate_half(q) * sin` multiplies by cos/sin,
    which need no gradient, so MulBackward keeps only cos and sin ([seq, head_dim], shared by every
    layer), and cat/neg/slice keep shapes only. Flash sdpa with GQA (enable_gqa, no repeat_kv when
    there is no mask) saves rotated q, k (kv heads), v, its output and an fp32 log-sum-exp per head;
    the kernel lays its output out as [b, s, h, d], so `transpose(1, 2).contiguous()` is a view and
    o_proj saves that same storage. The SwiGLU MLP keeps gate (SiLU's input), SiLU(gate) and up (the
    product's factors) and the product (down_proj's input). LoRA as the runner configures it (PEFT,
    lora_dropout 0.0, so the dropout is nn.Identity and lora_A saves the base Linear's own input)
    adds the rank-r intermediate lora_B saves per adapted Linear. Packed rows go
    through the runner's varlen attention (zeroplan.runner.fast.varlen_attention), which
    repeat_interleaves k and v to every query head before torch's varlen kernel, so the kernel
    saves k and v at query width (and its output and log-sum-exp, as flash does).
    Checked by counting autograd's saved storages of transformers' Qwen2/Llama decoder layer
    (benchmarks/saved_tensors.py).

    A layer compiled by torch.compile (the runner compiles each decoder layer) is split into forward
    and backward by AOTAutograd's min-cut partitioner, which recomputes pointwise work in backward:
    each RMSNorm keeps its bf16 input side (the layer input, and o_proj's output for the second),
    fp32 rsqrt and bf16 output instead of the fp32 upcast; SiLU(gate) is recomputed, so gate, up and
    the product stay (benchmarks/compiled_saved_tensors.py lists the partitioned graph's saved
    values); attention saves what flash saves."""
    hidden, inter = llm.hidden_size, llm.intermediate_size
    q_width, kv_width = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    saved_kv_width = q_width if packed else kv_width
    attention = BF16 * (2 * q_width + 2 * saved_kv_width) + llm.num_heads * FP32
    if kernels == "liger":
        norms, mlp = 2 * liger_rms_norm_bytes_per_token(hidden), liger_swiglu_bytes_per_token(inter)
    elif compiled:
        norms, mlp = 2 * (BF16 * hidden + BF16 * hidden + FP32), BF16 * 3 * inter
    else:
        norms, mlp = 2 * (FP32 * hidden + BF16 * hidden + BF16 * hidden) + 2 * FP32, BF16 * 4 * inter
    total = norms + attention + mlp
    if lora_rank:
        total += BF16 * lora_rank * LORA_TARGETS_PER_LAYER
    return total


def liger_rms_norm_bytes_per_token(hidden: int) -> int:
    """Liger's RMSNorm (ops/rms_norm.py LigerRMSNormFunction) saves its bf16 input X and an fp32
    RSTD per row, computing in fp32 inside the kernel; its bf16 output is the next Linear's
    input. Liger's RoPE (ops/rope.py) rotates q and k in place and saves only cos and sin, as eager
    rotary does, so attention saves the same as under eager kernels."""
    return BF16 * hidden + BF16 * hidden + FP32


def liger_swiglu_bytes_per_token(inter: int) -> int:
    """LigerSiLUMulFunction (ops/swiglu.py) saves gate and up and recomputes SiLU in backward;
    the product is down_proj's input: three [tokens, intermediate] tensors instead of four."""
    return BF16 * 3 * inter


def fused_linear_cross_entropy_chunk(tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk of Liger's fused linear cross-entropy (ops/fused_linear_cross_entropy.py):
    next_power_of_2(ceil(BT / ceil(V / H))), at most BT."""
    inc_factor = -(-vocab // hidden)
    rows = -(-tokens // inc_factor)
    return min(1 << max(0, (rows - 1).bit_length()), tokens)


def loss_bytes(llm: LanguageModel, tokens: int, kernels: str, head_grad: bool) -> tuple[int, int]:
    """(forward transient, backward transient) of the loss, bytes.

    Eager (transformers' ForCausalLMLoss): logits_bytes_per_token per token.
    Liger's fused linear cross-entropy never makes the [tokens, vocab] logits: its forward
    allocates grad_input ([tokens, hidden] bf16) and, when lm_head trains, grad_weight ([vocab,
    hidden] bf16, accum_dtype None), and fills them chunk by chunk from a bf16 [chunk, vocab]
    logits block (torch.mm, the CE kernel overwrites it with its gradient) and a [chunk, hidden]
    product; both gradients are saved for backward, which hands them back unchanged when the
    loss's gradient is 1."""
    if kernels == "eager":
        forward, backward = logits_bytes_per_token(llm.vocab_size)
        return forward * tokens, backward * tokens
    grads = BF16 * tokens * llm.hidden_size + (BF16 * llm.vocab_size * llm.hidden_size if head_grad else 0)
    chunk = fused_linear_cross_entropy_chunk(tokens, llm.hidden_size, llm.vocab_size)
    return grads + BF16 * chunk * (llm.vocab_size + llm.hidden_size), grads


def final_norm_bytes_per_token(hidden: int, kernels: str) -> int:
    """The final RMSNorm's saved tensors. Eager: fp32 upcast, bf16 normalised value and the output
    that lm_head saves. The fused linear cross-entropy saves no input, so the output is not kept;
    Liger's own RMSNorm keeps its bf16 input and RSTD."""
    if kernels == "liger":
        return BF16 * hidden + FP32
    if kernels == "liger-loss":
        return (FP32 + BF16) * hidden
    return (FP32 + 2 * BF16) * hidden


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


def vision_graph_recorded(shape: TrainShape) -> bool:
    """Whether autograd records the vision tower (keeps what its layers save and runs its backward).

    Where the tower trains, of course. Where it is frozen, still whenever checkpointing is on:
    transformers 5.17's `PreTrainedModel.gradient_checkpointing_enable` (modeling_utils.py, "needs_
    embedding_grads ... self.enable_input_require_grads()") hooks the input embeddings of every
    sub-model, and the vision tower's are its patch embeddings, so their output requires grad and
    the frozen tower's checkpointed layers keep their inputs, are recomputed in backward and pass
    input gradients down (no weight gradients). Measured: the rehearsed points with frozen vision
    held one bf16 hidden-state per vision layer more than a graph-free tower would
    (reports/rehearsal_small, reports/rehearsal_big: +0.35 GiB for InternViT-300M at 7 tiles, +2.6 GiB
    for InternViT-6B)."""
    return shape.trains("vision") or shape.grad_ckpt


def activation_bytes(profile: ModelProfile, shape: TrainShape, compiled: bool = False) -> ActivationBytes:
    """Saved and transient activation bytes of one micro-batch (bf16, sdpa/flash attention);
    `compiled` (or the shape's own `compiled`): the decoder layers run under torch.compile (the
    vision layers save the same either way: their LayerNorm outputs feed Linears whose inputs the
    partitioner keeps)."""
    compiled = compiled or bool(getattr(shape, "compiled", False))
    vision, llm = profile.vision, profile.llm
    tiles = shape.micro_batch * shape.tiles
    patch_tokens = tiles * (vision.patches_per_tile + 1)
    image_tokens = tiles * profile.tokens_per_tile
    tokens = shape.micro_batch * shape.seq_len
    vision_grad_flows = vision_graph_recorded(shape)
    projector_grad_flows = shape.trains("projector") or vision_grad_flows
    llm_grad_flows = shape.trains("llm") or bool(shape.lora_rank) or projector_grad_flows

    per_vision_layer = vision_layer_bytes_per_token(vision) * patch_tokens
    per_llm_layer = llm_layer_bytes_per_token(llm, shape.lora_rank, shape.kernels, shape.packed, compiled) * tokens
    if shape.grad_ckpt:
        recomputed = shape.llm_ckpt_layers(llm.num_layers)  # the first ones; the rest keep everything
        vision_saved = vision.num_layers * BF16 * vision.hidden_size * patch_tokens if vision_grad_flows else 0
        llm_saved = recomputed * BF16 * llm.hidden_size * tokens + (llm.num_layers - recomputed) * per_llm_layer
        recompute = max(per_llm_layer if recomputed else 0, per_vision_layer if vision_grad_flows else 0)
    else:
        recomputed = 0
        vision_saved = vision.num_layers * per_vision_layer if vision_grad_flows else 0
        llm_saved = llm.num_layers * per_llm_layer
        recompute = 0
    layer_input = BF16 * llm.hidden_size * tokens
    if not llm_grad_flows:
        llm_saved, recompute, per_llm_layer, layer_input = 0, 0, 0, 0
    final_norm = final_norm_bytes_per_token(llm.hidden_size, shape.kernels) * tokens
    head_grad = shape.trains("llm") and not llm.tie_word_embeddings
    logits_forward, logits_backward = loss_bytes(llm, tokens, shape.kernels, head_grad)
    return ActivationBytes(
        vision_saved=vision_saved,
        projector_saved=projector_bytes_per_image_token(profile) * image_tokens if projector_grad_flows else 0,
        llm_saved=llm_saved + final_norm,
        logits_forward_transient=logits_forward,
        logits_backward_transient=logits_backward,
        recompute_transient=recompute,
        vision_forward_transient=0 if vision_grad_flows else per_vision_layer,
        llm_full_layer_saved=per_llm_layer, llm_checkpointed_layer_saved=layer_input,
        llm_uncheckpointed_layers=llm.num_layers - recomputed,
    )
