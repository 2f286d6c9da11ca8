"""What would make a plan fit when none does: each hint is a change of the inputs, re-planned
before it is offered, so `recommend` never suggests what still does not fit or what is already
allowed."""

from __future__ import annotations

from dataclasses import dataclass, replace

from zeroplan.core.errors import DoesNotFit, InvalidInput
from zeroplan.core.hostmem import HostMemory
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.trainers import TrainerStack
from zeroplan.core.planner import recommend
from zeroplan.core.profiles import GPUProfile, ModelProfile


@dataclass(frozen=True)
class Request:
    """Everything `planner.recommend` was asked, so a hint can change one thing and ask again."""

    profile: ModelProfile
    shape: TrainShape
    base: Plan
    gpu: GPUProfile
    global_batch: int
    headroom: float
    allow_offload: bool
    speed: bool
    host: HostMemory | None
    stack: TrainerStack | None = None

    def plan(self):
        """planner.recommend on these inputs."""
        return recommend(self.profile, self.shape, self.base, self.gpu, self.global_batch, self.headroom,
                         allow_offload=self.allow_offload, speed=self.speed, host=self.host, stack=self.stack)


@dataclass(frozen=True)
class Hint:
    """A verified change: the options to pass, and the plan it gives."""

    options: str
    stage: int
    predicted_tokens_per_s: float

    def as_dict(self) -> dict:
        """The fields `recommend --json` prints under `would_fit_with`."""
        return {"options": self.options, "stage": self.stage, "predicted_tokens_per_s": self.predicted_tokens_per_s}


def _changes(request: Request):
    """(options, changed request) for each single change worth trying, cheapest to the user first."""
    if not request.allow_offload:
        yield "allow CPU offload (drop --no-offload)", replace(request, allow_offload=True)
    shape, base, profile = request.shape, request.base, request.profile
    image_tokens = shape.tiles * profile.tokens_per_tile
    if shape.tiles > 1:
        fewer = max(shape.tiles // 2, 1)
        yield f"--tiles {fewer}", replace(request, shape=replace(shape, tiles=fewer))
    if shape.seq_len // 2 > image_tokens:
        yield f"--seq-len {shape.seq_len // 2}", replace(request, shape=replace(shape, seq_len=shape.seq_len // 2))
    if "vision" not in shape.frozen:
        yield "--freeze vision", replace(request, shape=replace(shape, frozen=shape.frozen | {"vision"}))
    for factor in (2, 4, 8):
        nodes = base.nodes * factor
        if request.global_batch % (nodes * base.gpus_per_node) == 0:
            yield (f"--nodes {nodes} --gpus-per-node {base.gpus_per_node} ({nodes * base.gpus_per_node} GPUs)",
                   replace(request, base=base.with_(nodes=nodes)))
    if request.host is not None and request.host.bytes_per_node:
        for factor in (2, 4):
            more = request.host.bytes_per_node * factor
            yield (f"nodes with {more / 2**30:,.0f} GiB of RAM (--host-memory-gib {more / 2**30:.0f})",
                   replace(request, host=HostMemory(more, "hint")))


def verified_hints(request: Request, limit: int = 3) -> list[Hint]:
    """Up to `limit` single changes of the request under which a plan fits, each re-planned with
    planner.recommend (a change that still does not fit, or is not valid, is not offered)."""
    found: list[Hint] = []
    for options, changed in _changes(request):
        try:
            result = changed.plan()
        except (DoesNotFit, InvalidInput):
            continue
        found.append(Hint(options, result.best.plan.stage, round(result.best.time.tokens_per_s, 1)))
        if len(found) >= limit:
            break
    return found

