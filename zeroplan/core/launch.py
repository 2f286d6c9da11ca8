"""Launch lines for a plan: the deepspeed launcher, torchrun, and InternVL's slurm convention.

Plain strings for a user to paste; every user-given part is quoted with shlex. Shell variables
the user's environment supplies ($MASTER_ADDR, $PARTITION, ...) are left for the shell to expand.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from zeroplan.core.plan import Plan

MASTER_PORT = 29500
CPUS_PER_TASK = 10  # InternVL's shell scripts' CPUS_PER_TASK default
# ${NAME:-default}: a value the user's shell supplies (trainer_args' data and output paths).
SHELL_VARIABLE = re.compile(r"\$\{[A-Z_][A-Z0-9_]*(:-[\w./-]*)?\}")


def _quote(part: str) -> str:
    """shlex quoting, except a whole ${NAME:-default} is double-quoted so the shell expands it."""
    return f'"{part}"' if SHELL_VARIABLE.fullmatch(part) else shlex.quote(part)


def _join(parts: Sequence[str]) -> str:
    return " ".join(_quote(part) for part in parts)


def _program(entry: str | Sequence[str], config_path: str, args: Sequence[str]) -> str:
    """The training program and its arguments. `entry` is a script path or its parts (`-m`,
    `module`); without --deepspeed among `args` the config is passed as the HF Trainer takes it."""
    parts = [entry] if isinstance(entry, str) else list(entry)
    tail = [] if "--deepspeed" in args or not config_path else ["--deepspeed", config_path]
    return _join([*parts, *args, *tail])


def _env(env: str) -> str:
    return f"{env} " if env else ""


def deepspeed_line(plan: Plan, entry: str | Sequence[str], config_path: str, args: Sequence[str] = (),
                   env: str = "") -> str:
    """`deepspeed` launcher: one node runs locally; several read a hostfile (one
    `host slots=N` line per node) and start the ranks over ssh/pdsh. A module entry
    (`-m name`) becomes the launcher's `--module name`."""
    hostfile = "" if plan.nodes == 1 else "--hostfile hostfile "
    parts = [entry] if isinstance(entry, str) else list(entry)
    if parts[:1] == ["-m"]:
        parts = ["--module", *parts[1:]]
    return (f"{_env(env)}deepspeed {hostfile}--num_nodes {plan.nodes} --num_gpus {plan.gpus_per_node} "
            f"{_program(parts, config_path, args)}")


def torchrun_line(plan: Plan, entry: str | Sequence[str], config_path: str, args: Sequence[str] = (),
                  env: str = "LAUNCHER=pytorch") -> str:
    """torchrun with the c10d rendezvous; run the same line on every node with MASTER_ADDR set to
    the first node (InternVL's LAUNCHER=pytorch). One node defaults it to localhost."""
    rendezvous = (f'--rdzv_backend c10d --rdzv_endpoint "${{MASTER_ADDR:-localhost}}:${{MASTER_PORT:-{MASTER_PORT}}}" '
                  "--rdzv_id zeroplan")
    return (f"{_env(env)}torchrun --nnodes {plan.nodes} --nproc_per_node {plan.gpus_per_node} "
            f"{rendezvous} {_program(entry, config_path, args)}")


def srun_line(plan: Plan, entry: str | Sequence[str], config_path: str, args: Sequence[str] = (),
              env: str = "LAUNCHER=slurm") -> str:
    """InternVL's slurm convention (LAUNCHER=slurm, its default): one task per GPU started by
    srun, the script initializing torch.distributed from the SLURM variables itself."""
    gpus, per_node = plan.world_size, plan.gpus_per_node
    return (f"GPUS={gpus} GPUS_PER_NODE={per_node} {_env(env)}"
            f'srun -p "${{PARTITION}}" --job-name=zeroplan --gres=gpu:{per_node} --nodes={plan.nodes} '
            f"--ntasks={gpus} --ntasks-per-node={per_node} --cpus-per-task={CPUS_PER_TASK} "
            f"--kill-on-bad-exit=1 python -u {_program(entry, config_path, args)}")


def launch_lines(plan: Plan, entry: str | Sequence[str], config_path: str, args: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> dict[str, str]:
    """The three ways to start `entry` on the plan's cluster with `config_path`, by launcher name;
    `env` maps a launcher to the variables its line sets (default: InternVL's LAUNCHER values)."""
    env = {"deepspeed": "", "torchrun": "LAUNCHER=pytorch", "srun": "LAUNCHER=slurm"} if env is None else env
    return {
        "deepspeed": deepspeed_line(plan, entry, config_path, args, env.get("deepspeed", "")),
        "torchrun": torchrun_line(plan, entry, config_path, args, env.get("torchrun", "")),
        "srun": srun_line(plan, entry, config_path, args, env.get("srun", "")),
    }


def srun_torchrun_line(plan: Plan, entry: str | Sequence[str], config_path: str, args: Sequence[str] = ()) -> str:
    """slurm for programs that take torch.distributed's variables from torchrun (an HF Trainer
    script, zeroplan's runner): srun starts one torchrun per node, the first node of the
    allocation being the rendezvous host."""
    rendezvous = (f'--rdzv_backend c10d --rdzv_endpoint "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
                  f':${{MASTER_PORT:-{MASTER_PORT}}}" --rdzv_id zeroplan')
    return (f'srun -p "${{PARTITION}}" --job-name=zeroplan --gres=gpu:{plan.gpus_per_node} --nodes={plan.nodes} '
            f"--ntasks={plan.nodes} --ntasks-per-node=1 --cpus-per-task={CPUS_PER_TASK * plan.gpus_per_node} "
            f"--kill-on-bad-exit=1 torchrun --nnodes {plan.nodes} --nproc_per_node {plan.gpus_per_node} "
            f"{rendezvous} {_program(entry, config_path, args)}")
