"""What a torch.compile'd decoder layer keeps for backward: the values AOTAutograd's min-cut
partitioner (the one Inductor uses) passes from the forward graph to the backward graph.

Compiles one decoder layer and one vision layer of transformers' InternVL (real widths, CPU, bf16)
with a backend that runs AOTAutograd with `min_cut_rematerialization_partition` and records the
forward graph's extra outputs (the saved values; parameters left out). The LLM layer keeps the
layer input, each RMSNorm's fp32 rsqrt and bf16 output, o_proj's output (to recompute the
residual), rotated q and k, v, the attention output and log-sum-exp, gate, up and their product:
zeroplan.core.activations' `compiled` count. The vision layer keeps what it keeps in eager mode.

    .venv/bin/python benchmarks/compiled_saved_tensors.py 2b
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition

from zeroplan.adapters.hf_model import build_model
from zeroplan.core.profiles import load_model


def saved_values(module, *args, **kwargs) -> list[tuple[str, tuple, str, int]]:
    """(name, shape, dtype, bytes) of every non-parameter value the compiled forward saves."""
    found: list[tuple[str, tuple, str, int]] = []

    def forward_compiler(graph_module, _inputs):
        outputs = next(n for n in graph_module.graph.nodes if n.op == "output").args[0]
        for node in outputs[1:]:
            value = node.meta.get("val")
            if value is not None and not isinstance(value, torch.nn.Parameter) and node.name != "primals_2":
                found.append((node.name, tuple(value.shape), str(value.dtype), value.numel() * value.element_size()))
        return graph_module.forward

    def backend(graph_module, example_inputs):
        return aot_module_simplified(graph_module, example_inputs, fw_compiler=forward_compiler,
                                     bw_compiler=lambda gm, _: gm.forward,
                                     partition_fn=min_cut_rematerialization_partition)

    torch._dynamo.reset()
    torch.compile(module, backend=backend)(*args, **kwargs)
    weights = {tuple(p.shape) for p in module.parameters()}
    return [v for v in found if v[1] not in weights]


def main() -> int:
    profile = load_model(sys.argv[1] if len(sys.argv) > 1 else "2b")
    profile = dataclasses.replace(profile, llm=dataclasses.replace(profile.llm, num_layers=1),
                                  vision=dataclasses.replace(profile.vision, num_layers=1))
    model = build_model(profile, "cpu", torch.bfloat16, "sdpa").train()
    tokens, patches = 256, profile.vision.patches_per_tile + 1
    hidden = torch.randn(1, tokens, profile.llm.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    cos, sin = model.model.language_model.rotary_emb(hidden, positions)
    llm = saved_values(model.model.language_model.layers[0], hidden, position_embeddings=(cos, sin),
                       attention_mask=None, position_ids=positions)
    patch = torch.randn(1, patches, profile.vision.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    vision = saved_values(model.model.vision_tower.encoder.layer[0], patch)
    for title, values, count in (("LLM layer", llm, tokens), ("vision layer", vision, patches)):
        print(title)
        for value in values:
            print("   ", value)
        # The CPU attention output is copied once more for o_proj (CUDA's flash layout makes it a view).
        print(f"  {sum(v[3] for v in values) / count:.0f} bytes per token (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
