"""What autograd keeps for backward in transformers' InternVL, module by module, on the CPU.

Builds the model of a profile with two vision and two LLM layers (real widths), runs one bf16
forward with labels under `saved_tensors_hooks`, and adds up every storage autograd saves
(each once, parameters left out) under the module that saved it. Attention goes through a
stand-in for CUDA's flash SDPA that saves what the kernel saves (q, k, v, the output laid out as
[b, s, h, d], an fp32 log-sum-exp per head), since the CPU kernels save other things. Per-token
figures printed here are what zeroplan.core.activations counts:

    .venv/bin/python benchmarks/saved_tensors.py 2b        # Llama-style LLM (InternLM2.5-1.8B)
    .venv/bin/python benchmarks/saved_tensors.py 1b        # Qwen2 LLM
"""

from __future__ import annotations

import collections
import dataclasses
import sys

import torch
import torch.nn.functional as F

from zeroplan.adapters.hf_model import build_model, image_token_id
from zeroplan.core.profiles import load_model

_sdpa = F.scaled_dot_product_attention


class FlashStandIn(torch.autograd.Function):
    """SDPA whose saved tensors are flash attention's: q, k, v, output and fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, query, key, value, causal, gqa):
        batch, heads, seq, dim = query.shape
        repeat = heads // key.shape[1] if gqa else 1
        with torch.no_grad():
            result = _sdpa(query, key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1),
                           is_causal=causal)
        out = torch.empty(batch, seq, heads, dim, dtype=query.dtype).transpose(1, 2)
        out.copy_(result)
        ctx.save_for_backward(query, key, value, out, torch.empty(batch, heads, seq, dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value), None, None


def flash_like(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None:
        raise ValueError("the stand-in models the mask-free (causal flash) path only")
    return FlashStandIn.apply(query, key, value, is_causal, enable_gqa)


def saved_by_module(name: str, seq_len: int = 1024, tiles: int = 1) -> tuple[dict[str, int], int, int]:
    """(bytes saved per module path with layer indices folded to N, tokens, patch tokens)."""
    profile = load_model(name)
    profile = dataclasses.replace(profile, llm=dataclasses.replace(profile.llm, num_layers=2),
                                  vision=dataclasses.replace(profile.vision, num_layers=2))
    torch.manual_seed(0)
    model = build_model(profile, "cpu", torch.bfloat16, "sdpa").train()
    scope = ["top"]
    for module_name, module in model.named_modules():
        module.register_forward_pre_hook(lambda mod, *_, n=module_name: scope.append(n))
        module.register_forward_hook(lambda *_: scope.pop() and None)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    totals: collections.Counter = collections.Counter()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in parameters:
            seen.add(storage.data_ptr())
            folded = ".".join("N" if part.isdigit() else part for part in scope[-1].split("."))
            totals[folded] += storage.nbytes()
        return tensor

    image_tokens = tiles * profile.tokens_per_tile
    ids = torch.randint(3, 200, (1, seq_len))
    ids[0, 4:4 + image_tokens] = image_token_id(profile)
    labels = ids.clone()
    labels[0, :4 + image_tokens] = -100
    pixels = torch.randn(tiles, 3, profile.vision.image_size, profile.vision.image_size, dtype=torch.bfloat16)
    F.scaled_dot_product_attention = flash_like
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, pixel_values=pixels, labels=labels, attention_mask=torch.ones_like(ids),
                  use_cache=False)
    finally:
        F.scaled_dot_product_attention = _sdpa
    return dict(totals), seq_len, tiles * (profile.vision.patches_per_tile + 1)


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "2b"
    totals, tokens, patches = saved_by_module(name)
    llm = sum(v for k, v in totals.items() if ".language_model.layers.N" in k) / 2
    vision = sum(v for k, v in totals.items() if ".encoder.layer.N" in k) / 2
    for key in sorted(totals):
        print(f"{totals[key]:>12}  {key}")
    print(f"LLM layer: {llm / tokens:.0f} bytes per token; vision layer: {vision / patches:.0f} bytes per patch token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
