"""transformers adapter: the real InternVL model (native InternVLForConditionalGeneration) from a
zeroplan profile. Heavy imports happen inside the functions, so importing this module is cheap."""

from __future__ import annotations

from typing import Any

from zeroplan.core.errors import MissingDependency
from zeroplan.core.profiles import ModelProfile

# transformers' text config per profile arch; InternLM2/3, Yi and Llama-3 are Llama-shaped.
HF_TEXT_MODEL_TYPE = {"qwen2": "qwen2", "llama": "llama", "phi3": "phi3"}


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise MissingDependency(f"transformers is not importable ({error}); install zeroplan[train]") from None
    return transformers


def text_config_dict(profile: ModelProfile) -> dict[str, Any]:
    """The LLM's transformers config as a dict (model_type picks the class)."""
    llm = profile.llm
    config: dict[str, Any] = {
        "model_type": HF_TEXT_MODEL_TYPE[llm.arch],
        "hidden_size": llm.hidden_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads,
        "intermediate_size": llm.intermediate_size,
        "vocab_size": llm.vocab_size,
        "tie_word_embeddings": llm.tie_word_embeddings,
    }
    if llm.arch == "llama":
        config["attention_bias"] = llm.qkv_bias
        config["head_dim"] = llm.head_dim
    if llm.arch == "phi3":
        config["pad_token_id"] = 0
    return config


def internvl_config(profile: ModelProfile, attn_implementation: str | None = None):
    """transformers.InternVLConfig for the profile; the image token is the last vocabulary id."""
    transformers = _transformers()
    vision = profile.vision
    config = transformers.InternVLConfig(
        vision_config={
            "hidden_size": vision.hidden_size, "num_hidden_layers": vision.num_layers,
            "num_attention_heads": vision.num_heads, "intermediate_size": vision.intermediate_size,
            "patch_size": vision.patch_size, "image_size": vision.image_size, "norm_type": vision.norm,
            "attention_bias": vision.qkv_bias, "use_qk_norm": vision.qk_norm,
        },
        text_config=text_config_dict(profile),
        downsample_ratio=profile.downsample_ratio,
        image_token_id=image_token_id(profile),
        image_seq_length=profile.tokens_per_tile,
        tie_word_embeddings=profile.llm.tie_word_embeddings,
    )
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return config


def image_token_id(profile: ModelProfile) -> int:
    """InternVL's <IMG_CONTEXT> is one of its added tokens, at the end of the vocabulary."""
    return profile.llm.vocab_size - 1


def build_model(profile: ModelProfile, device: str = "meta", dtype=None, attn_implementation: str | None = None):
    """The native InternVLForConditionalGeneration for the profile, on `device` (meta: no memory)."""
    transformers = _transformers()
    import torch

    config = internvl_config(profile, attn_implementation)
    with torch.device(device):
        model = transformers.InternVLForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


def meta_parameter_counts(profile: ModelProfile) -> dict[str, Any]:
    """Counts of the model transformers builds on the meta device: total, per tower, largest module,
    and the ordered (name, numel) list, for comparison with zeroplan.core.params."""
    model = build_model(profile, "meta")
    named = [(name, param.numel()) for name, param in model.named_parameters()]

    def tower_of(name: str) -> str:
        if name.startswith("model.vision_tower."):
            return "vision"
        if name.startswith("model.multi_modal_projector."):
            return "projector"
        return "llm"

    towers = {"vision": 0, "projector": 0, "llm": 0}
    for name, numel in named:
        towers[tower_of(name)] += numel
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return {"total": sum(n for _, n in named), **towers, "largest_layer": largest, "tensors": named}
