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
            "fits": self.fits,
        }


@dataclass(frozen=True)
class Recommendation:
    """The chosen candidate, every other one (ranked), and the budget they were held to."""

    best: Candidate
    others: tuple[Candidate, ...]
    budget_bytes: int
    global_batch: int


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
             budget_bytes: int, time: StepTime | None = None, groups: bool = True) -> Candidate:
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
    reason = "" if fits else (f"does not fit: peak {memory.peak / 2**30:.1f} GiB > "
                              f"{budget_bytes / 2**30:.1f} GiB usable")
    return Candidate(plan, shape, accumulation, memory, time, fits, reason)


def recommend(profile: ModelProfile, shape: TrainShape, base: Plan, gpu: GPUProfile, global_batch: int,
              headroom: float = 0.05, stages=(0, 1, 2, 3), allow_offload: bool = True,
              speed: bool = True, stack: TrainerStack | None = None) -> Recommendation:
    """The fastest plan that fits, with every alternative and why it lost, among the plans the
    training `stack` can execute (None: zeroplan's runner, every option).

    Raises DoesNotFit, with suggestions, when no candidate fits."""
    if not 0 <= headroom < 0.9:
        raise InvalidInput(f"--headroom must be a fraction between 0 and 0.9, got {headroom}")
    per_gpu = per_gpu_batch(global_batch, base.world_size)
    budget = int(gpu.memory_bytes * (1 - headroom))
    candidates = _evaluate_fastest_first(profile, base, shape, gpu, per_gpu, stages, allow_offload, speed, budget,
                                         stack=stack)
    fitting = sorted((c for c in candidates if c.fits), key=lambda c: c.time.step_s)
    if not fitting:
        raise DoesNotFit(_nothing_fits_message(candidates, budget), _suggestions(profile, shape, base))
    fastest = fitting[0].time.step_s
    tied = [c for c in fitting if c.time.step_s <= fastest * (1 + TIE_FRACTION)]
    best = min(tied, key=_simplicity)
    others = []
    for candidate in sorted(candidates, key=lambda c: (not c.fits, c.time.step_s)):
        if candidate is best:
            continue
        if candidate.fits:
            slower = candidate.time.step_s / best.time.step_s - 1
            why = (f"slower by {slower:.0%}" if slower >= TIE_FRACTION else
                   "as fast (within 1 %), but a more complex plan (higher stage or offload) or a higher peak")
            candidate = Candidate(**{**candidate.__dict__, "rejected_because": why})
        others.append(candidate)
    return Recommendation(best=best, others=tuple(others), budget_bytes=budget, global_batch=global_batch)


def _evaluate_fastest_first(profile, base, shape, gpu, per_gpu, stages, allow_offload, speed, budget,
                            runners_up: int = RUNNERS_UP, stack: TrainerStack | None = None) -> list[Candidate]:
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
        candidate = evaluate(profile, candidate_shape, plan, gpu, accumulation, budget, time,
                             groups=stack is None or stack.optimizer_groups)
        out.append(candidate)
        if candidate.fits and fastest_fit is None:
            fastest_fit = time.step_s
    return out


def _simplicity(candidate: Candidate) -> tuple:
    offloads = (candidate.plan.offload_optimizer != "none") + (candidate.plan.offload_params != "none")
    return (offloads, STAGE_PREFERENCE[candidate.plan.stage], candidate.shape.kernels != "eager",
            candidate.memory.peak)


def _nothing_fits_message(candidates: list[Candidate], budget: int) -> str:
    smallest = min(candidates, key=lambda c: c.memory.peak)
    return (f"no plan fits: the smallest peak is {smallest.memory.peak / 2**30:.1f} GiB "
            f"(stage {smallest.plan.stage}, micro-batch {smallest.shape.micro_batch}, offload "
            f"{smallest.plan.offload_optimizer}/{smallest.plan.offload_params}) against "
            f"{budget / 2**30:.1f} GiB usable")


def _suggestions(profile: ModelProfile, shape: TrainShape, base: Plan) -> tuple[str, ...]:
    return (
        f"more GPUs (try --gpus {base.world_size * 2})",
        "parameter and optimizer offload to CPU under ZeRO-3 (allowed unless --no-offload)",
        f"a shorter sequence (--seq-len {max(shape.seq_len // 2, 1)})",
        "fewer tiles per sample (--tiles)" if shape.tiles > 1 else "freeze the vision tower (--freeze vision)",
    )
