"""Parameter tensors of an InternVL model, derived from its profile's shapes.

The list mirrors, tensor for tensor and in the same order, what transformers'
InternVLForConditionalGeneration.named_parameters() yields (tests compare it with the model built
on the meta device). The order matters: DeepSpeed ZeRO-1/2 flatten the trainable tensors in this
order before partitioning, so the padding each rank holds depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from zeroplan.core.profiles import LanguageModel, ModelProfile, VisionTower

TOWERS = ("vision", "projector", "llm")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor: its name in the transformers model, element count and tower."""

    name: str
    numel: int
    tower: str
    module: str


def _linear(prefix: str, module: str, tower: str, fan_in: int, fan_out: int, bias: bool) -> list[ParamTensor]:
    out = [ParamTensor(f"{prefix}.weight", fan_in * fan_out, tower, prefix)]
    if bias:
        out.append(ParamTensor(f"{prefix}.bias", fan_out, tower, prefix))
    return out


def _norm(prefix: str, tower: str, width: int, kind: str) -> list[ParamTensor]:
    out = [ParamTensor(f"{prefix}.weight", width, tower, prefix)]
    if kind == "layer_norm":
        out.append(ParamTensor(f"{prefix}.bias", width, tower, prefix))
    return out


def vision_tensors(vision: VisionTower) -> list[ParamTensor]:
    """InternViT: class token, position embeddings, patch conv, then per layer layer-scale,
    attention (q/k/v, optional qk-norm, output projection with bias), MLP and two norms."""
    width, prefix = vision.hidden_size, "model.vision_tower"
    emb = f"{prefix}.embeddings"
    out = [
        ParamTensor(f"{emb}.cls_token", width, "vision", emb),
        ParamTensor(f"{emb}.position_embeddings", (vision.patches_per_tile + 1) * width, "vision", emb),
        ParamTensor(f"{emb}.patch_embeddings.projection.weight", width * 3 * vision.patch_size**2, "vision",
                    f"{emb}.patch_embeddings.projection"),
        ParamTensor(f"{emb}.patch_embeddings.projection.bias", width, "vision", f"{emb}.patch_embeddings.projection"),
    ]
    for index in range(vision.num_layers):
        layer = f"{prefix}.encoder.layer.{index}"
        out += [ParamTensor(f"{layer}.lambda_1", width, "vision", layer),
                ParamTensor(f"{layer}.lambda_2", width, "vision", layer)]
        for proj in ("q_proj", "k_proj", "v_proj"):
            out += _linear(f"{layer}.attention.{proj}", proj, "vision", width, width, vision.qkv_bias)
        out += _linear(f"{layer}.attention.projection_layer", "proj", "vision", width, width, True)
        if vision.qk_norm:
            out += _norm(f"{layer}.attention.q_norm", "vision", width, "rms_norm")
            out += _norm(f"{layer}.attention.k_norm", "vision", width, "rms_norm")
        out += _linear(f"{layer}.mlp.fc1", "fc1", "vision", width, vision.intermediate_size, True)
        out += _linear(f"{layer}.mlp.fc2", "fc2", "vision", vision.intermediate_size, width, True)
        out += _norm(f"{layer}.layernorm_before", "vision", width, vision.norm)
        out += _norm(f"{layer}.layernorm_after", "vision", width, vision.norm)
    return out


def projector_tensors(profile: ModelProfile) -> list[ParamTensor]:
    """mlp1: LayerNorm(4·Dv) → Linear(4·Dv → Dl) → GELU → Linear(Dl → Dl)."""
    prefix, width_in, width_out = "model.multi_modal_projector", profile.projector_in_features, profile.llm.hidden_size
    return (_norm(f"{prefix}.layer_norm", "projector", width_in, "layer_norm")
            + _linear(f"{prefix}.linear_1", "linear_1", "projector", width_in, width_out, True)
            + _linear(f"{prefix}.linear_2", "linear_2", "projector", width_out, width_out, True))


def _attention(layer: str, llm: LanguageModel) -> list[ParamTensor]:
    hidden, q_width, kv_width = llm.hidden_size, llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    attn = f"{layer}.self_attn"
    if llm.arch == "phi3":
        return (_linear(f"{attn}.o_proj", "o_proj", "llm", q_width, hidden, False)
                + _linear(f"{attn}.qkv_proj", "qkv_proj", "llm", hidden, q_width + 2 * kv_width, False))
    return (_linear(f"{attn}.q_proj", "q_proj", "llm", hidden, q_width, llm.qkv_bias)
            + _linear(f"{attn}.k_proj", "k_proj", "llm", hidden, kv_width, llm.qkv_bias)
            + _linear(f"{attn}.v_proj", "v_proj", "llm", hidden, kv_width, llm.qkv_bias)
            + _linear(f"{attn}.o_proj", "o_proj", "llm", q_width, hidden, False))


def _mlp(layer: str, llm: LanguageModel) -> list[ParamTensor]:
    hidden, inter, mlp = llm.hidden_size, llm.intermediate_size, f"{layer}.mlp"
    if llm.arch == "phi3":
        return (_linear(f"{mlp}.gate_up_proj", "gate_up_proj", "llm", hidden, 2 * inter, False)
                + _linear(f"{mlp}.down_proj", "down_proj", "llm", inter, hidden, False))
    return (_linear(f"{mlp}.gate_proj", "gate_proj", "llm", hidden, inter, False)
            + _linear(f"{mlp}.up_proj", "up_proj", "llm", hidden, inter, False)
            + _linear(f"{mlp}.down_proj", "down_proj", "llm", inter, hidden, False))


def llm_tensors(llm: LanguageModel) -> list[ParamTensor]:
    """Decoder-only LLM: embeddings, per layer attention + SwiGLU MLP + two RMSNorms, final norm, lm_head."""
    prefix = "model.language_model"
    out = [ParamTensor(f"{prefix}.embed_tokens.weight", llm.vocab_size * llm.hidden_size, "llm",
                       f"{prefix}.embed_tokens")]
    for index in range(llm.num_layers):
        layer = f"{prefix}.layers.{index}"
        out += _attention(layer, llm) + _mlp(layer, llm)
        out += _norm(f"{layer}.input_layernorm", "llm", llm.hidden_size, "rms_norm")
        out += _norm(f"{layer}.post_attention_layernorm", "llm", llm.hidden_size, "rms_norm")
    out += _norm(f"{prefix}.norm", "llm", llm.hidden_size, "rms_norm")
    if not llm.tie_word_embeddings:
        out.append(ParamTensor("lm_head.weight", llm.vocab_size * llm.hidden_size, "llm", "lm_head"))
    return out


@lru_cache(maxsize=64)
def model_tensors(profile: ModelProfile) -> tuple[ParamTensor, ...]:
    """Every parameter tensor of the model, in transformers' named_parameters() order."""
    return tuple(vision_tensors(profile.vision) + projector_tensors(profile) + llm_tensors(profile.llm))


def lora_tensors(profile: ModelProfile, rank: int) -> tuple[ParamTensor, ...]:
    """PEFT LoRA adapters (A: r×in, B: out×r) on every attention and MLP projection of the LLM,
    InternVL's `use_llm_lora` target list, in the order PEFT registers them."""
    out: list[ParamTensor] = []
    for tensor in llm_tensors(profile.llm):
        module_name = tensor.module.rsplit(".", 1)[-1]
        if not tensor.name.endswith(".weight") or module_name not in LORA_TARGETS + ("qkv_proj", "gate_up_proj"):
            continue
        fan_in, fan_out = _linear_shape(profile.llm, module_name)
        out.append(ParamTensor(f"{tensor.module}.lora_A.default.weight", rank * fan_in, "lora", tensor.module))
        out.append(ParamTensor(f"{tensor.module}.lora_B.default.weight", fan_out * rank, "lora", tensor.module))
    return tuple(out)


def _linear_shape(llm: LanguageModel, module_name: str) -> tuple[int, int]:
    hidden, inter = llm.hidden_size, llm.intermediate_size
    q_width, kv_width = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    return {
        "q_proj": (hidden, q_width), "k_proj": (hidden, kv_width), "v_proj": (hidden, kv_width),
        "o_proj": (q_width, hidden), "qkv_proj": (hidden, q_width + 2 * kv_width),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
        "gate_up_proj": (hidden, 2 * inter),
    }[module_name]


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts per tower and the largest single module (DeepSpeed's 'largest layer')."""

    total: int
    vision: int
    projector: int
    llm: int
    largest_layer: int
    largest_layer_name: str


@lru_cache(maxsize=64)
def count_parameters(profile: ModelProfile) -> ParamCounts:
    """Totals per tower, and the module holding most parameters directly (non-recursively), which
    is what DeepSpeed's estimate_zero3_model_states_mem_needs calls `largest_layer_params`."""
    tensors = model_tensors(profile)
    per_tower = {tower: sum(t.numel for t in tensors if t.tower == tower) for tower in TOWERS}
    per_module: dict[str, int] = {}
    for tensor in tensors:
        per_module[tensor.module] = per_module.get(tensor.module, 0) + tensor.numel
    largest_name = max(per_module, key=per_module.__getitem__)
    return ParamCounts(total=sum(per_tower.values()), largest_layer=per_module[largest_name],
                       largest_layer_name=largest_name, **per_tower)
