"""Thin adapters around the heavy dependencies (DeepSpeed, transformers, NVML)."""
