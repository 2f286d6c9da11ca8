"""The allocations and frees of training steps of InternVL under DeepSpeed, in the order the GPU
sees them, for zeroplan.core.allocator to replay.

Tensor sizes are those zeroplan.core.activations counts (read off transformers 5.17's modules and
PyTorch's derivative rules); the order follows the forward code (norm, q/k/v, rotary, attention,
o_proj and residual, norm, gate/up/SiLU/product, down and residual), the loss of
ForCausalLMLoss (bf16 logits, their fp32 upcast, log_softmax; in backward nll_loss's dense
gradient, log_softmax's input gradient, the bf16 gradient), autograd's reverse walk (a checkpointed
layer is recomputed first, then its saved tensors are released as their backward runs) and
DeepSpeed 0.19.8's model states, buckets and optimizer step (zeroplan.core.zero_events). Tensors under
1 MiB are left out: they live in the small pool's 2 MiB segments and do not move the peak.
"""

from __future__ import annotations

from zeroplan.core.activations import BF16, FP32, vision_graph_recorded
from zeroplan.core.allocator import CUBLAS_WORKSPACE, Trace
from zeroplan.core.partition import ModelStateBytes
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import ModelProfile
from zeroplan.core.zero_events import ZeroEvents, gathered


def _norm(trace: Trace, tokens: int, width: int, layer_in: str, fused: bool) -> tuple[str, list[str]]:
    """RMSNorm; returns (output, saved). Eager (transformers): fp32 upcast (saved by pow), pow's
    fp32 square, the fp32 product by rsqrt, its bf16 cast (saved for the weight's gradient) and
    the weighted output. Fused (Liger's kernel, or Inductor's): the bf16 output, and the bf16
    input kept for backward."""
    if fused:
        return trace.malloc("norm.out", BF16 * tokens * width), [layer_in]
    upcast = trace.malloc("norm.fp32", FP32 * tokens * width)
    square = trace.malloc("norm.pow", FP32 * tokens * width)
    trace.free(square)
    product = trace.malloc("norm.mul", FP32 * tokens * width)
    cast = trace.malloc("norm.bf16", BF16 * tokens * width)
    trace.free(product)
    return trace.malloc("norm.out", BF16 * tokens * width), [upcast, cast]


def _llm_layer_forward(trace: Trace, profile: ModelProfile, shape: TrainShape, layer_in: str, keep: bool,
                       free_input: bool, compiled: bool = False) -> tuple[str, dict]:
    """One decoder layer; returns (output, saved tensors by part). With keep=False (checkpointed or
    no gradient) the saved tensors are released at the end of the layer; the input is released
    after the first residual unless a checkpoint or Liger's RMSNorm holds it."""
    llm, liger = profile.llm, shape.kernels == "liger"
    fused = liger or compiled  # one kernel per norm, no SiLU(gate) tensor
    tokens = shape.micro_batch * shape.seq_len
    hidden, inter = BF16 * tokens * llm.hidden_size, BF16 * tokens * llm.intermediate_size
    q_bytes, kv_bytes = BF16 * tokens * llm.num_heads * llm.head_dim, BF16 * tokens * llm.num_kv_heads * llm.head_dim
    saved: dict[str, list[str]] = {}
    normed, saved["norm1"] = _norm(trace, tokens, llm.hidden_size, layer_in, fused)
    projections = {name: trace.malloc(name, size) for name, size in (("q", q_bytes), ("k", kv_bytes), ("v", kv_bytes))}
    rotated = {"v": projections["v"]}
    for name, size in (("q", q_bytes), ("k", kv_bytes)):
        if liger:  # Liger's RoPE rotates in place
            rotated[name] = projections[name]
            continue
        if compiled:  # one fused kernel writes the rotated copy
            rotated[name] = trace.malloc("rope.out", size)
            trace.free(projections[name])
            continue
        cos_term = trace.malloc("rope.cos", size)
        half = trace.malloc("rope.rotate_half", size)
        sin_term = trace.malloc("rope.sin", size)
        trace.free(half)
        rotated[name] = trace.malloc("rope.out", size)
        trace.free(cos_term, sin_term, projections[name])
    if shape.packed and kv_bytes != q_bytes:  # the runner's varlen path repeats k and v per query head
        for name in ("k", "v"):
            repeated = trace.malloc(f"{name}.repeat", q_bytes)
            trace.free(rotated[name])
            rotated[name] = repeated
    saved["attention"] = [rotated["q"], rotated["k"], rotated["v"], trace.malloc("attn.out", q_bytes)]
    o_proj = trace.malloc("o_proj", hidden)
    residual = trace.malloc("residual1", hidden)
    if not compiled:  # the partition keeps o_proj's output to recompute the residual sum
        trace.free(o_proj)
    if free_input and not fused:
        trace.free(layer_in)
    saved["norm1"].append(normed)
    normed, saved["norm2"] = _norm(trace, tokens, llm.hidden_size, o_proj if compiled else residual, fused)
    saved["norm2"].append(normed)
    names = ("gate", "up", "product") if fused else ("gate", "up", "silu", "product")
    saved["mlp"] = [trace.malloc(name, inter) for name in names]
    down = trace.malloc("down", hidden)
    out = trace.malloc("residual2", hidden)
    trace.free(down)
    if not liger:
        trace.free(residual)
    if not keep:
        trace.free(*(key for part in saved.values() for key in part if key != layer_in))
        saved = {}
    return out, saved


def _llm_layer_backward(trace: Trace, profile: ModelProfile, shape: TrainShape, saved: dict, grad_out: str,
                        weight_grad, compiled: bool = False) -> str:
    """Reverse walk of one decoder layer: each sublayer's input gradient, its weight gradients
    (handed to `weight_grad`), and the release of what it saved. Liger's SwiGLU and RMSNorm write
    their input gradients over saved buffers (in place)."""
    trace.once("cublas_workspace.backward", CUBLAS_WORKSPACE)  # autograd's thread, first product
    llm, liger = profile.llm, shape.kernels == "liger"
    fused = liger or compiled
    tokens = shape.micro_batch * shape.seq_len
    hidden, inter = BF16 * tokens * llm.hidden_size, BF16 * tokens * llm.intermediate_size
    q_bytes = BF16 * tokens * llm.num_heads * llm.head_dim
    kv_bytes = BF16 * tokens * llm.num_kv_heads * llm.head_dim
    mlp = saved["mlp"]
    grad_product = trace.malloc("g.product", inter)
    weight_grad("down", llm.hidden_size * llm.intermediate_size)
    trace.free(mlp[-1])
    if fused:  # gradients of gate and up written in one kernel (over the saved buffers, for Liger)
        grad_gate, grad_up = (mlp[0], mlp[1]) if liger else (trace.malloc("g.gate", inter), trace.malloc("g.up", inter))
        trace.free(grad_product)
    else:
        grad_silu, grad_up = trace.malloc("g.silu", inter), trace.malloc("g.up", inter)
        trace.free(grad_product, mlp[2])
        grad_gate = trace.malloc("g.gate", inter)
        trace.free(grad_silu, mlp[0])
    grad_x_up = trace.malloc("g.x_up", hidden)
    weight_grad("up", llm.hidden_size * llm.intermediate_size)
    trace.free(grad_up, mlp[1])
    grad_x_gate = trace.malloc("g.x_gate", hidden)
    weight_grad("gate", llm.hidden_size * llm.intermediate_size)
    trace.free(grad_gate, mlp[0])
    grad_mlp_in = trace.malloc("g.mlp_in", hidden)
    trace.free(grad_x_up, grad_x_gate)
    grad_mid = _norm_backward(trace, tokens, llm.hidden_size, saved["norm2"], grad_mlp_in, grad_out, fused)
    grad_attn = trace.malloc("g.attn", q_bytes)
    weight_grad("o", llm.hidden_size * llm.num_heads * llm.head_dim)
    kv_saved = q_bytes if shape.packed else kv_bytes
    grads_qkv = [trace.malloc("g.q", q_bytes), trace.malloc("g.k", kv_saved), trace.malloc("g.v", kv_saved)]
    trace.free(grad_attn, *saved["attention"])
    unrotated = [] if liger else [trace.malloc("g.rope", size) for size in (q_bytes, kv_bytes)]
    if not liger:
        trace.free(grads_qkv[0], grads_qkv[1])
    grad_x = trace.malloc("g.x_qkv", hidden)
    for name, size in (("q", q_bytes), ("k", kv_bytes), ("v", kv_bytes)):
        weight_grad(name, llm.hidden_size * size // (BF16 * tokens))
    trace.free(*unrotated, *grads_qkv)
    return _norm_backward(trace, tokens, llm.hidden_size, saved["norm1"], grad_x, grad_mid, fused)


def _norm_backward(trace: Trace, tokens: int, width: int, saved: list[str], grad_in: str, residual_grad: str,
                   liger: bool = False) -> str:
    """RMSNorm backward: (eager) fp32 gradients of the upcast input, then the bf16 gradient summed
    with the residual's; (Liger) the kernel writes dX over dY, then the residual sum."""
    if liger:
        trace.free(*saved)
        total = trace.malloc("g.residual", BF16 * tokens * width)
        trace.free(grad_in, residual_grad)
        return total
    fp32_grad = trace.malloc("g.norm.fp32", FP32 * tokens * width)
    fp32_more = trace.malloc("g.norm.fp32b", FP32 * tokens * width)
    trace.free(grad_in, *saved)
    trace.free(fp32_more)
    cast = trace.malloc("g.norm.bf16", BF16 * tokens * width)
    trace.free(fp32_grad)
    total = trace.malloc("g.residual", BF16 * tokens * width)
    trace.free(cast, residual_grad)
    return total


def _vision_layer(trace: Trace, profile: ModelProfile, patch_tokens: int, layer_in: str, keep: bool) -> tuple[str, list[str]]:
    """One InternViT layer: LayerNorm, q/k/v, attention, projection and layer scale, LayerNorm,
    fc1/GELU/fc2 and layer scale."""
    vision = profile.vision
    width, inter = BF16 * patch_tokens * vision.hidden_size, BF16 * patch_tokens * vision.intermediate_size
    saved = [trace.malloc(name, width) for name in ("ln1", "q", "k", "v", "attn", "proj")]
    scaled = trace.malloc("scale1", width)
    middle = trace.malloc("residual1", width)
    trace.free(scaled)
    saved += [trace.malloc("ln2", width), trace.malloc("fc1", inter), trace.malloc("gelu", inter), trace.malloc("fc2", width)]
    scaled = trace.malloc("scale2", width)
    out = trace.malloc("residual2", width)
    trace.free(scaled)
    if keep:  # LayerNorm saves its input: the layer's input and the mid-layer residual
        saved += [middle, layer_in]
    else:
        trace.free(middle, *saved)
        saved = []
    return out, saved


def _vision_layer_backward(trace: Trace, profile: ModelProfile, patch_tokens: int, saved: list[str], grad_out: str) -> str:
    """Reverse walk of an InternViT layer, coarse: gradients of the MLP, then of attention."""
    vision = profile.vision
    width, inter = BF16 * patch_tokens * vision.hidden_size, BF16 * patch_tokens * vision.intermediate_size
    grad_gelu = trace.malloc("g.gelu", inter)
    grad_fc1 = trace.malloc("g.fc1", inter)
    trace.free(grad_gelu, *saved[6:10])
    grad_ln2 = trace.malloc("g.ln2", width)
    trace.free(grad_fc1)
    grad_mid = trace.malloc("g.mid", width)
    trace.free(grad_ln2, *saved[10:11])
    grads = [trace.malloc("g.qkv", width) for _ in range(3)]
    trace.free(*saved[:6])
    grad_in = trace.malloc("g.in", width)
    trace.free(*grads, grad_mid, grad_out, *saved[11:])
    return grad_in


def _loss(trace: Trace, profile: ModelProfile, shape: TrainShape, plan: Plan, deepspeed: ZeroEvents,
          hidden: str) -> str:
    """Final norm, lm_head and the loss forward and backward; returns the final norm's input
    gradient. Eager: ForCausalLMLoss's bf16 logits, fp32 upcast and log_softmax; in backward
    nll_loss's dense fp32 gradient, log_softmax's input gradient and the bf16 logits gradient.
    Liger's fused linear cross-entropy: grad_input and grad_weight made in forward, a bf16
    [chunk, vocab] logits block and a [chunk, hidden] product per chunk."""
    llm = profile.llm
    tokens = shape.micro_batch * shape.seq_len
    head_elems = llm.vocab_size * llm.hidden_size
    liger_norm, fused = shape.kernels == "liger", shape.kernels in ("liger", "liger-loss")
    normed, final_saved = _norm(trace, tokens, llm.hidden_size, hidden, liger_norm)
    if not liger_norm:
        trace.free(hidden)
    gather = gathered(trace, plan, head_elems)
    if fused:
        from zeroplan.core.activations import fused_linear_cross_entropy_chunk

        chunk = fused_linear_cross_entropy_chunk(tokens, llm.hidden_size, llm.vocab_size)
        grad = trace.malloc("flce.grad_input", BF16 * tokens * llm.hidden_size)
        head_grad = trace.malloc("flce.grad_weight", BF16 * head_elems) if shape.trains("llm") else None
        for _ in range(-(-tokens // chunk)):
            logits = trace.malloc("flce.logits", BF16 * chunk * llm.vocab_size)
            product = trace.malloc("flce.product", BF16 * chunk * llm.hidden_size)
            trace.free(product, logits)
        trace.free(normed, gather)
        if head_grad is not None:
            deepspeed.adopt_grad("lm_head", head_elems, head_grad)
    else:
        final_saved.append(normed)
        logits = trace.malloc("logits.bf16", BF16 * tokens * llm.vocab_size)
        trace.free(gather)
        upcast = trace.malloc("logits.fp32", FP32 * tokens * llm.vocab_size)
        log_probs = trace.malloc("log_softmax", FP32 * tokens * llm.vocab_size)
        trace.free(upcast, logits)
        grad_nll = trace.malloc("g.nll", FP32 * tokens * llm.vocab_size)
        grad_log_softmax = trace.malloc("g.log_softmax", FP32 * tokens * llm.vocab_size)
        trace.free(grad_nll, log_probs)
        grad_logits = trace.malloc("g.logits.bf16", BF16 * tokens * llm.vocab_size)
        trace.free(grad_log_softmax)
        gather = gathered(trace, plan, head_elems)
        # linear's backward: the weight gradient, then (at autograd's thread's first product)
        # cuBLAS's workspace, then the input gradient (the allocator's own trace: reports/h100_memhist)
        head_grad = trace.malloc("grad.lm_head", BF16 * head_elems) if shape.trains("llm") else None
        trace.once("cublas_workspace.backward", CUBLAS_WORKSPACE)
        grad = trace.malloc("g.lm_head_in", BF16 * tokens * llm.hidden_size)
        if head_grad is not None:
            deepspeed.adopt_grad("lm_head", head_elems, head_grad)
        trace.free(grad_logits, gather)
    return _norm_backward(trace, tokens, llm.hidden_size, final_saved, grad, "", liger_norm)


def setup_event_count(profile: ModelProfile, shape: TrainShape, plan: Plan, states: ModelStateBytes,
                      buffer_bytes: int) -> int:
    """How many of training_events' events are the engine's set-up (the training steps follow)."""
    trace = Trace()
    ZeroEvents(trace, profile, shape, plan, states, buffer_bytes).init()
    return len(trace.events)


def training_events(profile: ModelProfile, shape: TrainShape, plan: Plan, states: ModelStateBytes,
                    buffer_bytes: int, steps: int = 5, step_tiles: tuple[int, ...] | None = None,
                    compiled: bool = False, accumulation: int = 1) -> list:
    """Events of the engine's set-up and `steps` training steps. `buffer_bytes` are ZeRO-1/2's
    gradient buckets (zeroplan.core.memory.communication_buffer_bytes). `step_tiles` gives each step's
    tiles in the micro-batch (every step holds micro_batch × tiles when not given); a different
    tile count changes the vision tower's tensor sizes, and with them which cached blocks fit.
    `compiled` decoder layers allocate what the min-cut partition keeps, without eager's fp32
    RMSNorm temporaries or SiLU(gate) (Inductor fuses that pointwise work). With `accumulation`
    micro-steps per optimizer step, each step replays its first micro-step, one middle one (the
    others allocate alike) and the boundary one (ZeRO-3: two micro-steps)."""
    trace = Trace()
    deepspeed = ZeroEvents(trace, profile, shape, plan, states, buffer_bytes)
    deepspeed.init()
    # ZeRO-3's micro-steps allocate alike (its partition takes every gradient in place), so two
    # show what a third would; ZeRO-0/1/2 differ between the first, middle and boundary ones.
    micro_steps = min(accumulation, 2 if plan.stage == 3 else 3)
    for tiles in step_tiles or (shape.micro_batch * shape.tiles,) * steps:
        for micro in range(micro_steps):
            deepspeed.begin_micro_step(first=micro == 0, boundary=micro == micro_steps - 1)
            _one_step(trace, profile, shape, plan, deepspeed, tiles, compiled)
            deepspeed.allreduce()
        deepspeed.step()
    return trace.events


def _one_step(trace: Trace, profile: ModelProfile, shape: TrainShape, plan: Plan, deepspeed: ZeroEvents,
              tiles: int, compiled: bool) -> None:
    vision, llm = profile.vision, profile.llm
    tokens = shape.micro_batch * shape.seq_len
    before = set(trace.live)
    patch_tokens, image_tokens = tiles * (vision.patches_per_tile + 1), tiles * profile.tokens_per_tile
    vision_grads = vision_graph_recorded(shape)  # a frozen tower is recorded too under checkpointing
    projector_grads = shape.trains("projector") or vision_grads
    vision_layer_elems = 4 * vision.hidden_size ** 2 + 2 * vision.hidden_size * vision.intermediate_size
    llm_layer_elems = (llm.hidden_size * (2 * llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim
                       + 3 * llm.hidden_size * llm.intermediate_size)
    head_elems = llm.vocab_size * llm.hidden_size

    trace.once("cublas_workspace.forward", CUBLAS_WORKSPACE)
    hidden = trace.malloc("patch_embed", BF16 * patch_tokens * vision.hidden_size)
    vision_saved, vision_inputs = [], []
    for _ in range(vision.num_layers):
        gather = gathered(trace, plan, vision_layer_elems)
        keep = vision_grads and not shape.grad_ckpt
        layer_in = hidden
        hidden, saved = _vision_layer(trace, profile, patch_tokens, layer_in, keep)
        if not vision_grads:
            trace.free(layer_in)
        elif shape.grad_ckpt:
            vision_inputs.append(layer_in)
        vision_saved.append(saved)
        trace.free(gather)
    shuffled = trace.malloc("pixel_shuffle", BF16 * image_tokens * profile.projector_in_features)
    if not vision_grads:
        trace.free(hidden)
    projector = [trace.malloc(name, BF16 * image_tokens * width) for name, width in (
        ("proj.ln", profile.projector_in_features), ("proj.fc1", llm.hidden_size), ("proj.gelu", llm.hidden_size))]
    features = trace.malloc("proj.fc2", BF16 * image_tokens * llm.hidden_size)
    if not projector_grads:
        trace.free(shuffled, *projector)
    embeds = trace.malloc("embed", BF16 * tokens * llm.hidden_size)
    hidden = trace.malloc("merged_embeds", BF16 * tokens * llm.hidden_size)
    trace.free(embeds, features)

    llm_inputs, llm_saved = [], []
    recomputes = shape.llm_ckpt_layers(llm.num_layers)  # the first ones
    for index in range(llm.num_layers):
        gather = gathered(trace, plan, llm_layer_elems)
        layer_in = hidden
        checkpointed = index < recomputes
        hidden, saved = _llm_layer_forward(trace, profile, shape, layer_in, keep=not checkpointed,
                                           free_input=not checkpointed, compiled=compiled)
        llm_inputs.append(layer_in)
        llm_saved.append(saved)
        trace.free(gather)
    grad = _loss(trace, profile, shape, plan, deepspeed, hidden)
    for index in reversed(range(llm.num_layers)):
        gather = gathered(trace, plan, llm_layer_elems)
        saved = llm_saved[index]
        if index < recomputes:
            out, saved = _llm_layer_forward(trace, profile, shape, llm_inputs[index], keep=True, free_input=False,
                                            compiled=compiled)
            trace.free(out)
        weight = deepspeed.weight_grad if shape.trains("llm") else (lambda name, elems: None)
        grad = _llm_layer_backward(trace, profile, shape, saved, grad, weight, compiled)
        trace.free(llm_inputs[index], gather)
    if shape.trains("llm"):
        deepspeed.weight_grad("embed_tokens", head_elems)
    if projector_grads:
        grad_features = trace.malloc("g.features", BF16 * image_tokens * llm.hidden_size)
        trace.free(grad)
        grad_shuffled = trace.malloc("g.proj", BF16 * image_tokens * profile.projector_in_features)
        if shape.trains("projector"):
            deepspeed.weight_grad("projector", profile.projector_in_features * llm.hidden_size + llm.hidden_size ** 2)
        trace.free(grad_features, shuffled, *projector)
        grad = grad_shuffled
    else:
        trace.free(grad)
    if vision_grads:
        grad_vision = trace.malloc("g.vision_out", BF16 * patch_tokens * vision.hidden_size)
        trace.free(grad, hidden)
        grad = grad_vision
        for index in reversed(range(vision.num_layers)):
            gather = gathered(trace, plan, vision_layer_elems)
            saved = vision_saved[index]
            if shape.grad_ckpt:
                out, saved = _vision_layer(trace, profile, patch_tokens, vision_inputs[index], keep=True)
                trace.free(out)
            grad = _vision_layer_backward(trace, profile, patch_tokens, saved, grad)
            if shape.trains("vision"):
                deepspeed.weight_grad("vision_layer", vision_layer_elems)
            trace.free(gather)
        trace.free(grad)
    kept = (set(deepspeed.buckets) | {grad for grad, _ in deepspeed.grads} | {deepspeed.partition}
            | set(deepspeed.held) | set(trace.persistent.values()))
    trace.free(*sorted(trace.live - before - kept))
