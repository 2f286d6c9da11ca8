"""The model-state bytes a DeepSpeed engine really holds, read off its tensors: 16-bit parameters,
fp32 master weights, Adam's states, the gradient buffers and, with offload, what sits on the host.
A run records them after its steps (so a rehearsal shows the optimizer states were made), and
tests/_ds_worker.py compares them with zeroplan.core.partition rank by rank."""

from __future__ import annotations

STATE_KEYS = ("exp_avg", "exp_avg_sq")
GRAD_BUFFERS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
                "temp_grad_buffer_for_gpu_offload")
HOST_BUFFERS = ("param_buffer_of_bit16_for_cpu_offload_groups", "temp_grad_buffer_for_cpu_offload",
                "grad_partitions_flat_buffer")


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind the tensors (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def flatten(value) -> list:
    """Every tensor inside nested lists, tuples and dicts."""
    import torch

    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, (list, tuple)):
        return []
    out = []
    for item in value:
        out += flatten(item)
    return out


def param_bytes(engine, stage: int) -> int:
    """16-bit parameters: the module's (views of the flat buffer at stages 1/2), and at stage 3
    each parameter's shard plus whatever is gathered (persistent parameters)."""
    if stage < 3:
        return storage_bytes(p.data for p in engine.module.parameters())
    tensors = []
    for param in engine.module.parameters():
        tensors += [param.ds_tensor, param.data]
    return storage_bytes(tensors)


def master_tensors(optimizer, stage: int) -> list:
    """The fp32 master copies of a ZeRO optimizer (or stage 0's unfused wrapper)."""
    if stage == 0:
        return flatten(getattr(optimizer, "fp32_groups", None))
    if stage in (1, 2):
        return list(getattr(optimizer, "single_partition_of_fp32_groups", []))
    return list(getattr(optimizer, "fp32_partitioned_groups_flat", []))


def adam_state_bytes(basic) -> int:
    """Adam's exp_avg and exp_avg_sq of the inner (torch or DeepSpeed) optimizer."""
    return storage_bytes(state[key] for state in basic.state.values() for key in STATE_KEYS if key in state)


def grad_bytes(engine) -> int:
    """Distinct storages behind the `.grad`s and the optimizer's gradient buffers."""
    optimizer = engine.optimizer
    tensors = [p.grad for p in engine.module.parameters()]
    for attr in GRAD_BUFFERS:
        tensors += flatten(getattr(optimizer, attr, None))
    return storage_bytes(tensors)


def host_bytes(engine, stage: int) -> int:
    """What optimizer offload keeps on the host: masters and their gradients, the 16-bit staging
    buffers and Adam's states."""
    optimizer = engine.optimizer
    tensors = master_tensors(optimizer, stage)
    tensors += [t.grad for t in tensors]
    for attr in HOST_BUFFERS:
        tensors += flatten(getattr(optimizer, attr, None))
    return storage_bytes(tensors) + adam_state_bytes(optimizer.optimizer)


def partition_counts(engine, stage: int) -> tuple[int, int]:
    """(elements this rank's optimizer owns, of which padding), as DeepSpeed counts them."""
    optimizer = engine.optimizer
    if stage == 0:
        return sum(p.numel() for p in flatten(optimizer.fp32_groups)), 0
    if stage in (1, 2):
        return int(sum(optimizer.partition_size)), int(sum(optimizer.groups_padding))
    elems = sum(int(p.partition_numel()) for group in optimizer.fp16_groups for p in group)
    return elems, int(sum(sum(group) for group in optimizer.groups_padding))


def engine_states(engine, stage: int, offloaded: bool) -> dict:
    """The record's view of the model states after the steps (bytes, on this rank)."""
    optimizer = engine.optimizer
    elems, padding = partition_counts(engine, stage)
    basic = getattr(optimizer, "optimizer", None)
    return {
        "params": param_bytes(engine, stage),
        "master_weights": 0 if offloaded else storage_bytes(master_tensors(optimizer, stage)),
        "optimizer_states": 0 if offloaded or basic is None else adam_state_bytes(basic),
        "cpu_bytes": host_bytes(engine, stage) if offloaded else 0,
        "partition_elems": elems,
        "padding_elems": padding,
        "optimizer_class": type(optimizer).__name__,
    }
