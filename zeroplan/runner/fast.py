"""The runner's speed options, each a thin adapter over a maintained library:

- varlen attention over packed rows: torch.nn.attention.varlen (PyTorch's own flash-attention
  varlen kernel), registered with transformers' AttentionInterface so the native InternVL LLM
  calls it; each packed sample attends only to itself. On the CPU (tests) the same function runs
  one sdpa call per sample, so the code path and its masking are checked without a GPU.
- Liger-Kernel's fused RMSNorm/LayerNorm, SwiGLU, RoPE and fused linear cross-entropy
  (`apply_liger_kernel_to_internvl`), CUDA only.
- torch.compile of each LLM decoder layer and vision encoder layer (regional compilation: one
  graph per layer class, reused by every layer).
- (the vocabulary padding the runner's `vocab_multiple` asks for is zeroplan.core.profiles.pad_vocab:
  the model is built from the padded profile.)
"""

from __future__ import annotations

import inspect

VARLEN = "zeroplan_varlen"


def varlen_kwargs(position_ids) -> dict:
    """cu_seq_lens / max_length for the flattened [rows × seq_len] tokens, from position ids that
    restart at 0 where each sample (and each row's padding tail) starts. Computed on the host
    tensors before they move to the GPU, so no layer has to synchronise to find them."""
    import torch

    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: query [B, Hq, S, D], key/value [B, Hkv, S, D] → ([B, S, Hq, D], None),
    causal within each packed sample given by kwargs' cu_seq_lens_q / max_length_q."""
    import torch

    batch, heads, seq, dim = query.shape
    if kwargs.get("cu_seq_lens_q") is not None:
        cu, longest = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    else:  # called without sample bounds (generation, a plain forward): each row is one sequence
        cu, longest = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=query.device), seq
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], dim)
    if k.shape[1] != heads:  # grouped-query attention: share each KV head across its query group
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    if q.is_cuda:
        out = _varlen_cuda(q, k, v, cu.to(q.device), longest, scaling)
    else:
        out = _varlen_reference(q, k, v, cu, scaling)
    return out.reshape(batch, seq, heads, dim), None


def _varlen_cuda(q, k, v, cu, longest: int, scale):
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **causal)


def _varlen_reference(q, k, v, cu, scale):
    """One causal sdpa per sample: the CPU stand-in with the same semantics."""
    import torch
    import torch.nn.functional as F

    bounds = cu.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(parts)


def register_varlen() -> str:
    """Register the varlen attention (and flash-style mask handling: no mask tensor) with
    transformers under VARLEN; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)
    return VARLEN


def attn_config(config, attn_implementation: str) -> None:
    """Set the model config's attention: "varlen" for the LLM (the vision tower's tiles are whole
    images, so it keeps sdpa), else the named implementation everywhere."""
    if attn_implementation == "varlen":
        config._attn_implementation = {"": "sdpa", "text_config": register_varlen(), "vision_config": "sdpa"}
    else:
        config._attn_implementation = attn_implementation


def apply_liger(model, zero3: bool, loss_only: bool = False) -> None:
    """Liger-Kernel's InternVL patch on the built model (`loss_only`: just the fused linear
    cross-entropy). The fused loss reads lm_head.weight outside lm_head's own forward, so under
    ZeRO-3 the weight is registered as an external parameter of the model (gathered for the whole
    forward/backward)."""
    from liger_kernel.transformers import apply_liger_kernel_to_internvl

    if loss_only:
        apply_liger_kernel_to_internvl(model=model, rms_norm=False, layer_norm=False, rope=False, swiglu=False)
    else:
        apply_liger_kernel_to_internvl(model=model)
    if zero3:
        import deepspeed

        deepspeed.zero.register_external_parameter(model, model.lm_head.weight)


def compile_layers(model) -> int:
    """torch.compile each LLM decoder layer and vision encoder layer in place; returns how many.
    ZEROPLAN_COMPILE_BACKEND names another torch.compile backend than torch's default (inductor),
    e.g. "aot_eager" to check the compiled code path where generating kernels is not wanted (the
    CPU test suite, where inductor would build C++ for every layer)."""
    import os

    backend = os.environ.get("ZEROPLAN_COMPILE_BACKEND") or None
    layers = list(model.model.language_model.layers) + list(model.model.vision_tower.encoder.layer)
    for layer in layers:
        layer.compile(**({"backend": backend} if backend else {}))
    return len(layers)
