"""The model a run trains: native InternVLForConditionalGeneration from a zeroplan profile (or a
local checkpoint folder), initialised identically under every ZeRO stage, then frozen / LoRA /
gradient checkpointing as the spec says."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from zeroplan.core.errors import InvalidInput
from zeroplan.core.profiles import LanguageModel, ModelProfile, VisionTower, load_model

TOWER_PREFIXES = {"vision": ("model.vision_tower.",), "projector": ("model.multi_modal_projector.",),
                  "llm": ("model.language_model.", "lm_head.")}
LORA_PATTERN = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
HF_ARCH = {"qwen2": "qwen2", "llama": "llama", "phi3": "phi3"}


def is_checkpoint(model: str) -> bool:
    """Whether the spec's model names a local checkpoint folder rather than a profile."""
    return Path(model).is_dir() and (Path(model) / "config.json").is_file()


def profile_from_hf_config(config, name: str) -> ModelProfile:
    """A ModelProfile mirroring a transformers InternVLConfig (for FLOPs, data and the estimate)."""
    vision, text = config.vision_config, config.text_config
    if text.model_type not in HF_ARCH:
        raise InvalidInput(f"checkpoint {name}: LLM type {text.model_type!r} is not one zeroplan models")
    return ModelProfile(
        name=name, aliases=(), family="checkpoint", downsample_ratio=float(config.downsample_ratio),
        internvl_ds_config="", source=f"config.json of {name}", path=name,
        vision=VisionTower(name="vision", hidden_size=vision.hidden_size, num_layers=vision.num_hidden_layers,
                           num_heads=vision.num_attention_heads, intermediate_size=vision.intermediate_size,
                           patch_size=_first(vision.patch_size), image_size=_first(vision.image_size),
                           norm=vision.norm_type, qkv_bias=bool(vision.attention_bias),
                           qk_norm=bool(vision.use_qk_norm)),
        llm=LanguageModel(name="llm", arch=HF_ARCH[text.model_type], hidden_size=text.hidden_size,
                          num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
                          num_kv_heads=text.num_key_value_heads, intermediate_size=text.intermediate_size,
                          vocab_size=text.vocab_size, qkv_bias=bool(getattr(text, "attention_bias", text.model_type == "qwen2")),
                          tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                          head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads),
    )


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def resolve(spec) -> tuple[ModelProfile, int]:
    """(profile, image token id) of the spec's model, its vocabulary padded as the spec says."""
    if is_checkpoint(spec.model):
        import transformers

        config = transformers.AutoConfig.from_pretrained(spec.model, local_files_only=True)
        return profile_from_hf_config(config, spec.model), int(config.image_token_id)
    from zeroplan.adapters.hf_model import image_token_id
    from zeroplan.core.profiles import pad_vocab

    profile = pad_vocab(load_model(spec.model), spec.vocab_multiple)
    return profile, image_token_id(profile)


def flops_profile(spec, profile: ModelProfile) -> ModelProfile:
    """The profile whose FLOPs a step is credited with: the model's own vocabulary, without the
    rows `vocab_multiple` pads on (they are not the model's work)."""
    if is_checkpoint(spec.model) or spec.vocab_multiple <= 1:
        return profile
    return load_model(spec.model)


def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _owners(model) -> dict:
    """For each module name, the PreTrainedModel whose `_init_weights` applies to it (the nearest
    enclosing sub-model: the vision tower has its own rules for class token and layer scale)."""
    from transformers import PreTrainedModel

    roots = {name: module for name, module in model.named_modules() if isinstance(module, PreTrainedModel)}
    owners = {}
    for name, _ in model.named_modules():
        prefix = max((root for root in roots if root == "" or name == root or name.startswith(root + ".")), key=len)
        owners[name] = roots[prefix]
    return owners


def initialise_weights(model, seed: int, zero3: bool) -> None:
    """Re-initialise every weight with transformers' own `_init_weights`, reseeding per module from
    (seed, module name), so the values do not depend on construction order or on ZeRO-3: under
    stage 3 each module's partitioned parameters are gathered, rank 0 initialises them and
    DeepSpeed scatters the result (GatheredParameters with modifier_rank=0). A rehearsed rank
    initialises them itself (the broadcast from rank 0 moves nothing on the fake group), with the
    same seeds, so it keeps the slice of the values rank 0 would have sent."""
    import torch

    from zeroplan.runner import rehearsal

    owners = _owners(model)
    gathered = _gatherer(zero3)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() and not rehearsal.active() else 0
    with torch.no_grad():
        for name, module in model.named_modules():
            params = list(module.parameters(recurse=False))
            if not params:
                continue
            for param in params:
                if hasattr(param, "_is_hf_initialized"):
                    del param._is_hf_initialized
            with gathered(params):
                if not zero3 or rank == 0:
                    torch.manual_seed(_module_seed(seed, name))
                    owners[name]._init_weights(module)


def _gatherer(zero3: bool):
    if not zero3:
        return lambda params: contextlib.nullcontext()
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(spec, profile: ModelProfile, ds_config: dict, device):
    """The bf16 model, built directly on `device` (stages 0-2) or partitioned as it is built
    (stage 3, inside deepspeed.zero.Init), then initialised the same way in both cases."""
    import deepspeed
    import torch
    import transformers

    zero3 = spec.stage == 3
    if is_checkpoint(spec.model):
        return _load_checkpoint(spec, ds_config, device)
    from zeroplan.adapters.hf_model import internvl_config

    from zeroplan.runner import fast

    config = internvl_config(profile)
    fast.attn_config(config, spec.attn_implementation)
    if zero3:
        context = deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=torch.bfloat16)
    else:
        context = torch.device(device)
    with context, _default_dtype(torch.bfloat16):
        model = transformers.InternVLForConditionalGeneration(config)
    model = model.to(torch.bfloat16)
    initialise_weights(model, spec.seed, zero3)
    return model


def speed_up(model, spec) -> dict:
    """The spec's speed options on the built model (before DeepSpeed wraps it): Liger-Kernel's
    fused kernels, torch.compile of the layers. Returns what was applied, for the result."""
    from zeroplan.runner import fast

    applied = {}
    if spec.kernels in ("liger", "liger-loss"):
        fast.apply_liger(model, spec.stage == 3, loss_only=spec.kernels == "liger-loss")
        applied["kernels"] = spec.kernels
    if spec.compile:
        applied["compiled_layers"] = fast.compile_layers(model)
    return applied


def _load_checkpoint(spec, ds_config: dict, device):
    """from_pretrained on a local folder, local files only; under stage 3 transformers partitions
    it through zero.Init when it sees DeepSpeed's config (HfDeepSpeedConfig, kept alive)."""
    import torch
    import transformers

    from zeroplan.runner import fast

    attn = ({"": "sdpa", "text_config": fast.register_varlen(), "vision_config": "sdpa"}
            if spec.attn_implementation == "varlen" else spec.attn_implementation)
    keep = None
    if spec.stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)
    model = transformers.InternVLForConditionalGeneration.from_pretrained(
        spec.model, local_files_only=True, dtype=torch.bfloat16, attn_implementation=attn)
    model._zeroplan_hf_ds_config = keep
    return model if spec.stage == 3 else model.to(device)


def tower_of(name: str) -> str | None:
    """Which tower a parameter name belongs to (peft's base_model.model. prefix allowed)."""
    name = name.removeprefix("base_model.model.")
    for tower, prefixes in TOWER_PREFIXES.items():
        if name.startswith(prefixes):
            return tower
    return None


def prepare_for_training(model, spec, shape):
    """Freeze towers, add bf16 LoRA to the LLM (peft; alpha = 2·rank), and turn on gradient
    checkpointing (non-reentrant, so it works when the vision tower's input needs no gradient)."""
    import torch

    if spec.lora_rank:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(_module_seed(spec.seed, "lora"))
        lora = LoraConfig(r=spec.lora_rank, lora_alpha=2 * spec.lora_rank, lora_dropout=0.0,
                          target_modules=LORA_PATTERN)
        with _default_dtype(torch.bfloat16):
            model = get_peft_model(model, lora, autocast_adapter_dtype=False)
        for name, param in model.named_parameters():
            if "lora_" in name and param.dtype != torch.bfloat16:
                param.data = param.data.to(torch.bfloat16)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            continue
        tower = tower_of(name)
        param.requires_grad_(tower is not None and shape.trains(tower))
    if spec.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.ckpt_layers is not None:  # only the first ckpt_layers decoder layers recompute
            for layer in list(decoder_layers(model))[spec.ckpt_layers:]:
                layer.gradient_checkpointing = False
    model.train()
    return model


def decoder_layers(model):
    """The LLM's decoder layers, in order (PEFT's wrapper looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.language_model.layers


def trainable_parameters(model) -> list:
    """Parameters that get gradients (what the optimizer sees)."""
    return [p for p in model.parameters() if p.requires_grad]
