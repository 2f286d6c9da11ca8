"""Enumerate plans, keep those that fit, rank them by predicted step time.

Candidates: ZeRO stage 0-3 × micro-batch (powers of two dividing the per-GPU batch) × gradient
checkpointing (off, the first quarter, half or three quarters of the decoder layers, all) × optimizer offload × (stage 3) parameter offload × the loss (transformers' own, or
Liger's fused linear cross-entropy, which never holds the [tokens, vocab] logits: slower per step on
the H100 but 8-10 GB smaller for 2B-4B at 8192 tokens). With `speed` on, layers run under
torch.compile under stages 0-2 (measured 40.8 % MFU for 2B ZeRO-1 against 20.9 % plain:
reports/speed); not under ZeRO-3, whose per-module hooks split the compiled graphs (7.9 % measured). A plan fits when its predicted
peak (reserved + CUDA context) leaves `headroom` of the GPU free. Among fitting plans the fastest
wins; plans within 1 % of the fastest count as a tie, broken by the simpler plan: no offload before
offload, then ZeRO-1, 2, 0, 3 (ZeRO-1 moves the same bytes as ZeRO-0 and holds less; every step up
adds collectives whose cost the model knows least), then the lower peak."""

from __future__ import annotations

from dataclasses import dataclass, replace

from zeroplan.core.errors import DoesNotFit, InvalidInput
from zeroplan.core.fit import DEFAULT_HEADROOM, usable_bytes
from zeroplan.core.hostmem import HostMemory, host_fits
from zeroplan.core.memory import MemoryBreakdown, estimate
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import GPUProfile, ModelProfile
from zeroplan.core.steptime import StepTime, step_time
from zeroplan.core.trainers import TrainerStack

TIE_FRACTION = 0.01
STAGE_PREFERENCE = {1: 0, 2: 1, 0: 2, 3: 3}
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
RUNNERS_UP = 12
OPTIMIZER_GROUP_ELEMS = 500_000_000  # ZeRO-1/2 step temporaries of at most 3 GB (6 bytes per element)


@dataclass(frozen=True)
class Candidate:
    """One plan with its micro-batch, accumulation, memory and speed, and why it lost if it did."""

    plan: Plan
    shape: TrainShape
    gradient_accumulation: int
    memory: MemoryBreakdown
    time: StepTime
    fits: bool
    rejected_because: str = ""

    def summary(self) -> dict:
        """The fields `recommend --json` documents for a plan."""
        return {
            "stage": self.plan.stage, "micro_batch": self.shape.micro_batch,
            "gradient_accumulation": self.gradient_accumulation, "grad_ckpt": self.shape.grad_ckpt,
            "ckpt_layers": self.shape.ckpt_layers, "optimizer_group_elems": self.plan.optimizer_group_elems,
            "offload_optimizer": self.plan.offload_optimizer, "offload_params": self.plan.offload_params,
            "predicted_peak_bytes": self.memory.peak, "predicted_tokens_per_s": round(self.time.tokens_per_s, 1),
            "predicted_step_s": round(self.time.step_s, 4), "predicted_mfu": round(self.time.mfu, 4),
            "loss": self.shape.kernels, "compiled_layers": self.shape.compiled, "packed": self.shape.packed,
            "cpu_bytes_per_node": self.memory.cpu_bytes_per_node, "fits": self.fits,
        }


@dataclass(frozen=True)
class Recommendation:
    """The chosen candidate, every other one (ranked), and the budget they were held to."""

    best: Candidate
    others: tuple[Candidate, ...]
    budget_bytes: int
    global_batch: int
    host: HostMemory | None = None


def per_gpu_batch(global_batch: int, world_size: int) -> int:
    """Samples each GPU processes per optimizer step; the global batch must split evenly."""
    if global_batch < 1:
        raise InvalidInput(f"--global-batch must be at least 1, got {global_batch}")
    if global_batch % world_size:
        raise InvalidInput(f"--global-batch {global_batch} does not split evenly over {world_size} GPUs "
                           f"(use a multiple of {world_size})")
    return global_batch // world_size


def candidate_plans(profile: ModelProfile, base: Plan, shape: TrainShape, per_gpu: int, stages=(0, 1, 2, 3),
                    allow_offload: bool = True, speed: bool = True, stack: TrainerStack | None = None):
    """Yield (plan, shape, accumulation) for every combination worth predicting; each plan's buckets
    and ZeRO-3 settings are the tuned ones its DeepSpeed config will carry (tuning.tuned_plan).
    `speed` adds the fused loss as an alternative and compiles the layers under stages 0-2, as far
    as the training `stack` can (its checkpointing choices too; None: zeroplan's runner)."""
    from zeroplan.core.tuning import tuned_plan

    fused = speed and (stack is None or stack.fused_loss)
    compiles = speed and (stack is None or stack.compiled_layers)
    layers = profile.llm.num_layers
    if stack is None:
        ckpt_options = tuple((count != 0, count or None) for count in checkpoint_choices(layers))
    else:
        ckpt_options = stack.checkpoint_options(layers, checkpoint_choices(layers)[1:-1])

    for stage in stages:
        offloads = [("none", "none")]
        if allow_offload and stage >= 1:
            offloads.append(("cpu", "none"))
        if allow_offload and stage == 3:
            offloads.append(("cpu", "cpu"))
        for offload_optimizer, offload_params in offloads:
            plan = tuned_plan(profile, shape, base.with_(stage=stage, offload_optimizer=offload_optimizer,
                                                      offload_params=offload_params))
            for micro in MICRO_BATCHES:
                if micro > per_gpu or per_gpu % micro:
                    continue
                for grad_ckpt, ckpt_layers in ckpt_options:
                    for kernels in (("eager", "liger-loss") if fused else (shape.kernels,)):
                        compiled = compiles and stage != 3
                        yield (plan, _reshape(shape, micro, grad_ckpt, ckpt_layers, kernels, compiled),
                               per_gpu // micro)


def checkpoint_choices(num_layers: int) -> tuple[int | None, ...]:
    """Checkpointing off (0), the first quarter, half or three quarters of the decoder layers
    (the vision tower's with them), or every layer (None)."""
    partial = sorted({num_layers * quarter // 4 for quarter in (1, 2, 3)} - {0, num_layers})
    return (0, *partial, None)


def _reshape(shape: TrainShape, micro_batch: int, grad_ckpt: bool, ckpt_layers: int | None, kernels: str,
             compiled: bool) -> TrainShape:
    return replace(shape, micro_batch=micro_batch, grad_ckpt=grad_ckpt, ckpt_layers=ckpt_layers,
                   kernels=kernels, compiled=compiled)


def evaluate(profile: ModelProfile, shape: TrainShape, plan: Plan, gpu: GPUProfile, accumulation: int,
             budget_bytes: int, time: StepTime | None = None, host: HostMemory | None = None,
             groups: bool = True) -> Candidate:
    """Predict one candidate's memory and speed and whether it fits the budget. A ZeRO-1/2 plan
    that does not fit is tried again with the optimizer's parameters in groups
    (OPTIMIZER_GROUP_ELEMS), which shrinks the step's fp32 gradient copy to one group's: as fast,
    but the training script has to build the groups, so only where they decide the fit (and only
    with `groups`: a training stack that cannot build them)."""
    memory = estimate(profile, shape, plan, gpu, gradient_accumulation=accumulation, compiled=shape.compiled)
    time = time or step_time(profile, shape, plan, gpu, accumulation)
    fits = memory.peak <= budget_bytes
    if (groups and not fits and plan.stage in (1, 2) and plan.offload_optimizer == "none" and not plan.optimizer_group_elems
            and memory.peak - budget_bytes < memory.step_transient * 3 // 2):  # what groups can save at most
        grouped = plan.with_(optimizer_group_elems=OPTIMIZER_GROUP_ELEMS)
        grouped_memory = estimate(profile, shape, grouped, gpu, gradient_accumulation=accumulation,
                                  compiled=shape.compiled)
        if grouped_memory.peak < memory.peak:
            plan, memory = grouped, grouped_memory
            fits = memory.peak <= budget_bytes
    reason = "" if fits else f"does not fit: GPU peak {memory.peak / 2**30:.1f} > {budget_bytes / 2**30:.1f} GiB"
    if fits and not host_fits(memory.cpu_bytes_per_node, host):
        fits = False
        reason = (f"does not fit: host RAM {memory.cpu_bytes_per_node / 2**30:,.0f} > "
                  f"{host.budget_bytes / 2**30:,.0f} GiB/node")
    return Candidate(plan, shape, accumulation, memory, time, fits, reason)


def recommend(profile: ModelProfile, shape: TrainShape, base: Plan, gpu: GPUProfile, global_batch: int,
              headroom: float = DEFAULT_HEADROOM, stages=(0, 1, 2, 3), allow_offload: bool = True,
              speed: bool = True, host: HostMemory | None = None,
              stack: TrainerStack | None = None) -> Recommendation:
    """The fastest plan that fits the GPU (and, with `host`, the node's RAM), among the plans the
    training `stack` can execute (None: zeroplan's runner, every option), with every alternative
    and why it lost (`why_not`, from the same keys the ranking uses).

    Raises DoesNotFit when no candidate fits (core.hints finds, and verifies, what would)."""
    budget = usable_bytes(gpu.memory_bytes, headroom)
    per_gpu = per_gpu_batch(global_batch, base.world_size)
    candidates = _evaluate_fastest_first(profile, base, shape, gpu, per_gpu, stages, allow_offload, speed, budget,
                                         host=host, stack=stack)
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise DoesNotFit(_nothing_fits_message(candidates, budget))
    fastest = min(c.time.step_s for c in fitting)
    fitting.sort(key=lambda c: rank_key(c, fastest))
    best = fitting[0]
    others = [replace(c, rejected_because=why_not(c, best, fastest)) for c in fitting[1:]]
    others += sorted((c for c in candidates if not c.fits), key=lambda c: c.time.step_s)
    return Recommendation(best=best, others=tuple(others), budget_bytes=budget, global_batch=global_batch, host=host)


def _offloads(candidate: Candidate) -> int:
    return (candidate.plan.offload_optimizer != "none") + (candidate.plan.offload_params != "none")


# The tie-breaks among plans as fast as the fastest (within TIE_FRACTION), in order: a key (lower
# wins) and what a runner-up that lost on it is told. rank_key and why_not both read this table, so
# the reason printed is the comparison the ranking made.
TIE_BREAKS = (
    (_offloads, lambda lost, best: "as fast, but offloads to the CPU" if not _offloads(best)
     else "as fast, but offloads more"),
    (lambda c: STAGE_PREFERENCE[c.plan.stage],
     lambda lost, best: f"as fast; ZeRO-{best.plan.stage} preferred to ZeRO-{lost.plan.stage}"),
    (lambda c: c.shape.kernels != "eager", lambda lost, best: "as fast; eager loss preferred to fused"),
    (lambda c: c.memory.peak,
     lambda lost, best: f"as fast; peak {(lost.memory.peak - best.memory.peak) / 2**30:.1f} GiB higher"),
)


def rank_key(candidate: Candidate, fastest_step_s: float) -> tuple:
    """How fitting plans are ranked (lowest first): those within TIE_FRACTION of the fastest by
    TIE_BREAKS (simpler first), then the rest by step time."""
    if candidate.time.step_s > fastest_step_s * (1 + TIE_FRACTION):
        return (1, candidate.time.step_s)
    return (0, *(key(candidate) for key, _ in TIE_BREAKS))


def why_not(candidate: Candidate, best: Candidate, fastest_step_s: float) -> str:
    """The comparison of rank_key that put `candidate` behind `best`, in words."""
    lost, won = rank_key(candidate, fastest_step_s), rank_key(best, fastest_step_s)
    if lost[0]:
        return f"slower by {candidate.time.step_s / best.time.step_s - 1:.1%}"
    for (_, say), mine, theirs in zip(TIE_BREAKS, lost[1:], won[1:]):
        if mine != theirs:
            return say(candidate, best)
    return "as fast and as simple (an exact tie)"


def _evaluate_fastest_first(profile, base, shape, gpu, per_gpu, stages, allow_offload, speed, budget,
                            runners_up: int = RUNNERS_UP, host: HostMemory | None = None,
                            stack: TrainerStack | None = None) -> list[Candidate]:
    """Candidates with their memory predicted, fastest first, as far as the choice needs: the
    step time of every candidate is cheap, the memory prediction (an allocator replay) is not, so
    memory is predicted down the speed order until a plan fits, through the plans tied with it,
    and until `runners_up` more fit; slower plans are not predicted (they could not win)."""
    timed = sorted(((step_time(profile, s, p, gpu, acc), p, s, acc)
                    for p, s, acc in candidate_plans(profile, base, shape, per_gpu, stages, allow_offload, speed,
                                                     stack)),
                   key=lambda item: item[0].step_s)
    out: list[Candidate] = []
    fastest_fit = None
    for time, plan, candidate_shape, accumulation in timed:
        if (fastest_fit is not None and time.step_s > fastest_fit * (1 + TIE_FRACTION)
                and sum(c.fits for c in out) > runners_up):
            break
        candidate = evaluate(profile, candidate_shape, plan, gpu, accumulation, budget, time, host,
                             groups=stack is None or stack.optimizer_groups)
        out.append(candidate)
        if candidate.fits and fastest_fit is None:
            fastest_fit = time.step_s
    return out


def _nothing_fits_message(candidates: list[Candidate], budget: int) -> str:
    smallest = min(candidates, key=lambda c: c.memory.peak)
    message = (f"no plan fits: the smallest peak is {smallest.memory.peak / 2**30:.1f} GiB "
               f"(stage {smallest.plan.stage}, micro-batch {smallest.shape.micro_batch}, offload "
               f"{smallest.plan.offload_optimizer}/{smallest.plan.offload_params}) against "
               f"{budget / 2**30:.1f} GiB usable")
    host_bound = [c for c in candidates if c.memory.peak <= budget]
    if host_bound:
        least = min(host_bound, key=lambda c: c.memory.cpu_bytes_per_node)
        message += (f"; the plans that fit the GPU need {least.memory.cpu_bytes_per_node / 2**30:,.0f} GiB of host "
                    f"RAM per node or more ({least.rejected_because.removeprefix('does not fit: ')})")
    return message
