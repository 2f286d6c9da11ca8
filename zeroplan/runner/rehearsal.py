"""Rehearsal: one process plays rank R of an N-rank job on torch's fake process group.

DeepSpeed sizes every partition, flat buffer, bucket and padding from the process group's rank and
world size, so a rank's memory can be measured without the other ranks. torch's fake process group
(`torch.testing._internal.distributed.fake_pg`, backend "fake") answers every collective at once and
moves no data; its outputs keep whatever the allocator handed out, which may be NaN and could send
a run down another path. `start(rank, world)` therefore wraps torch.distributed's collectives so
their outputs are filled as if every other rank had sent zeros:

- all-gathers: this rank's input in its place, zeros elsewhere;
- reduce-scatters: this rank's chunk of its own input (the others add zeros);
- all-reduce, broadcast: the tensor as it is (a sum with zeros; a broadcast from another rank
  leaves the local values);
- all_gather_object: this rank's object in every place (zeroplan's own records, and DeepSpeed's
  checks that ranks agree).

The fills are in-place writes into the buffers DeepSpeed allocated, so they allocate nothing. They
must be installed before `deepspeed.init_distributed`, which binds the all-gather and
reduce-scatter functions when it starts.

ZeRO-3 also checks now and then that every rank traced the same modules
(`assert_ints_same_as_other_ranks`: rank 0 broadcasts its list, the others hold -1 until it
arrives). Alone on the fake group there is no other rank to disagree with, and the broadcast never
arrives, so rehearsal makes that check a no-op (`_no_rank_checks`). What a rehearsal leaves out: the collectives' time, and
NCCL's own buffers (NCCL allocates them outside PyTorch's allocator when a communicator starts).
"""

from __future__ import annotations

import functools
import os

WRAPPED = ("all_gather_into_tensor", "_all_gather_base", "all_gather", "reduce_scatter_tensor",
           "_reduce_scatter_base", "reduce_scatter", "all_gather_object")
_STATE: dict = {}


def active() -> tuple[int, int] | None:
    """(rank, world size) this process rehearses, or None in a real run."""
    return _STATE.get("world")


def start(rank: int, world_size: int, local_rank: int = 0) -> None:
    """Start the fake process group as rank `rank` of `world_size` and install the fills. The
    environment is set as a launcher would set it (RANK, WORLD_SIZE, LOCAL_RANK), so code that reads
    it (samplers, DeepSpeed) sees the rank it plays."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(min(world_size, 8)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    install_fills()
    _no_rank_checks()
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    _STATE["world"] = (rank, world_size)


def install_fills() -> None:
    """Wrap torch.distributed's collectives (in both of its namespaces) with the fills; idempotent."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    fills = {"all_gather_into_tensor": _fill_gathered_tensor, "_all_gather_base": _fill_gathered_tensor,
             "all_gather": _fill_gathered_list, "reduce_scatter_tensor": _fill_scattered_tensor,
             "_reduce_scatter_base": _fill_scattered_tensor, "reduce_scatter": _fill_scattered_list}
    for namespace in (dist, c10d):
        for name, fill in fills.items():
            original = getattr(namespace, name, None)
            if original is not None and not getattr(original, "_zeroplan_fill", False):
                setattr(namespace, name, _wrap(original, fill))
        original = getattr(namespace, "all_gather_object", None)
        if original is not None and not getattr(original, "_zeroplan_fill", False):
            setattr(namespace, "all_gather_object", _own_object_everywhere)


CHECKING_MODULES = ("deepspeed.runtime.zero.utils", "deepspeed.runtime.zero.partition_parameters",
                    "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.partitioned_param_coordinator")


def _no_rank_checks() -> None:
    """DeepSpeed's cross-rank agreement check, a no-op in every module that imported it."""
    import importlib

    for name in CHECKING_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "assert_ints_same_as_other_ranks"):
            module.assert_ints_same_as_other_ranks = _agrees


def _agrees(ints) -> None:
    """Alone on the fake group, a rank agrees with itself."""


def _wrap(collective, fill):
    @functools.wraps(collective)
    def wrapper(*args, **kwargs):
        work = collective(*args, **kwargs)
        fill(*args, **kwargs)
        return work

    wrapper._zeroplan_fill = True
    return wrapper


def _rank(group) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _first(args, kwargs, names):
    """The first two positional-or-keyword arguments of a collective, by their torch names."""
    values = list(args[:2])
    for name in names[len(values):]:
        values.append(kwargs.get(name))
    return values


def _fill_gathered_tensor(*args, **kwargs):
    output, local = _first(args, kwargs, ("output_tensor", "input_tensor"))
    group = kwargs.get("group", args[2] if len(args) > 2 else None)
    rank, world = _rank(group)
    flat = output.view(-1) if output.is_contiguous() else None
    if flat is None or flat.numel() != local.numel() * world:
        return
    flat.zero_()
    flat[rank * local.numel():(rank + 1) * local.numel()].copy_(local.reshape(-1))


def _fill_gathered_list(*args, **kwargs):
    outputs, local = _first(args, kwargs, ("tensor_list", "tensor"))
    group = kwargs.get("group", args[2] if len(args) > 2 else None)
    rank, _ = _rank(group)
    for index, output in enumerate(outputs):
        if index == rank:
            output.copy_(local)
        else:
            output.zero_()


def _fill_scattered_tensor(*args, **kwargs):
    output, full = _first(args, kwargs, ("output", "input"))
    group = kwargs.get("group", args[3] if len(args) > 3 else None)
    rank, world = _rank(group)
    if full.numel() != output.numel() * world or not full.is_contiguous():
        return
    output.copy_(full.view(-1)[rank * output.numel():(rank + 1) * output.numel()].view_as(output))


def _fill_scattered_list(*args, **kwargs):
    output, inputs = _first(args, kwargs, ("output", "input_list"))
    group = kwargs.get("group", args[3] if len(args) > 3 else None)
    rank, _ = _rank(group)
    output.copy_(inputs[rank])


def _own_object_everywhere(object_list, obj, group=None):
    """all_gather_object on the fake group: this rank's object in every slot."""
    for index in range(len(object_list)):
        object_list[index] = obj


_own_object_everywhere._zeroplan_fill = True
