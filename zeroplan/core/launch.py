"""Launch lines for a plan: the deepspeed launcher, torchrun, and InternVL's slurm convention.

Plain strings for a user to paste; every user-given part is quoted with shlex. Shell variables
the user's environment supplies ($MASTER_ADDR, $PARTITION, ...) are left for the shell to expand.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from zeroplan.core.plan import Plan

MASTER_PORT = 29500
CPUS_PER_TASK = 10  # InternVL's shell scripts' CPUS_PER_TASK default


def _join(parts: Sequence[str]) -> str:
    return " ".join(shlex.quote(part) for part in parts)


def _program(entry: str, config_path: str, args: Sequence[str]) -> str:
    """The training script with the DeepSpeed config as the HF Trainer takes it (--deepspeed)."""
    return _join([entry, *args, "--deepspeed", config_path])


def deepspeed_line(plan: Plan, entry: str, config_path: str, args: Sequence[str] = ()) -> str:
    """`deepspeed` launcher: one node runs locally; several read a hostfile (one
    `host slots=N` line per node) and start the ranks over ssh/pdsh."""
    hostfile = "" if plan.nodes == 1 else "--hostfile hostfile "
    return (f"deepspeed {hostfile}--num_nodes {plan.nodes} --num_gpus {plan.gpus_per_node} "
            f"{_program(entry, config_path, args)}")


def torchrun_line(plan: Plan, entry: str, config_path: str, args: Sequence[str] = ()) -> str:
    """torchrun with the c10d rendezvous; run the same line on every node with MASTER_ADDR set to
    the first node (InternVL's LAUNCHER=pytorch). One node defaults it to localhost."""
    rendezvous = (f'--rdzv_backend c10d --rdzv_endpoint "${{MASTER_ADDR:-localhost}}:${{MASTER_PORT:-{MASTER_PORT}}}" '
                  "--rdzv_id zeroplan")
    return (f"LAUNCHER=pytorch torchrun --nnodes {plan.nodes} --nproc_per_node {plan.gpus_per_node} "
            f"{rendezvous} {_program(entry, config_path, args)}")


def srun_line(plan: Plan, entry: str, config_path: str, args: Sequence[str] = ()) -> str:
    """InternVL's slurm convention (LAUNCHER=slurm, its default): one task per GPU started by
    srun, the script initializing torch.distributed from the SLURM variables itself."""
    gpus, per_node = plan.world_size, plan.gpus_per_node
    return (f"GPUS={gpus} GPUS_PER_NODE={per_node} LAUNCHER=slurm "
            f'srun -p "${{PARTITION}}" --job-name=zeroplan --gres=gpu:{per_node} --nodes={plan.nodes} '
            f"--ntasks={gpus} --ntasks-per-node={per_node} --cpus-per-task={CPUS_PER_TASK} "
            f"--kill-on-bad-exit=1 python -u {_program(entry, config_path, args)}")


def launch_lines(plan: Plan, entry: str, config_path: str, args: Sequence[str] = ()) -> dict[str, str]:
    """The three ways to start `entry` on the plan's cluster with `config_path`, by launcher name."""
    return {
        "deepspeed": deepspeed_line(plan, entry, config_path, args),
        "torchrun": torchrun_line(plan, entry, config_path, args),
        "srun": srun_line(plan, entry, config_path, args),
    }
