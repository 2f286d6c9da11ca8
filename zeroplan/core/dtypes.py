"""Bytes per element of the dtypes the memory and time models count: bf16 for the weights,
activations and gradients DeepSpeed keeps in 16 bits, fp32 for master weights, Adam's moments and
the loss's upcast logits."""

BF16_BYTES = 2
FP32_BYTES = 4
