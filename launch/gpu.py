"""NVIDIA GPUs: one node (this machine or one over ssh), or several through SLURM. Every step
takes --dry-run (print the commands, run nothing).

    python launch/gpu.py install [--host=user@node]
    python launch/gpu.py run   --config=configs/tokenpacker.py:stage=2 --workdir=/runs/7b-s2 \\
        [--host=user@node] [--config.train.microbatches=16]
    python launch/gpu.py slurm --nodes=4 --gpus-per-node=8 --partition=gpu --time=24:00:00 \\
        --config=configs/tokenpacker.py:llm=vicuna13b,stage=2 --workdir=/shared/runs/13b-s2
    python launch/gpu.py srun  --nodes=4 --gpus-per-node=8 ...   # inside an allocation

One process per node sees all of its GPUs; with several nodes every process calls
``jax.distributed.initialize`` (``--config.distributed.initialize=true``), which reads the
coordinator, process count and rank from SLURM's environment. The workdir must be on a file
system every node sees (or gs://). Rerunning the same command resumes from its checkpoints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

REPO = Path(__file__).resolve().parents[1]


def _on_host(args, command: str) -> list[str]:
    """``command`` run in the repository: here, or in ~/REMOTE_DIR on ``--host`` over ssh."""
    if args.host:
        return ["ssh", args.host, f"cd ~/{common.REMOTE_DIR} && {command}"]
    return ["bash", "-c", f"cd {shlex.quote(str(REPO))} && {command}"]


def install(args, runner: common.Runner) -> None:
    if args.host:
        runner.say(f"copies this checkout to {args.host}:~/{common.REMOTE_DIR}")
        runner.run(["rsync", "-a", "--delete", "--exclude=.git", f"{REPO}/",
                    f"{args.host}:{common.REMOTE_DIR}/"])
    runner.run(_on_host(args, common.pip_install(common.JAX_CUDA, args.python)))


def _train(args, distributed: bool) -> list[str]:
    if not args.config or not args.workdir:
        raise common.UserError(f"{args.step}: --config and --workdir are required")
    return common.train_command(args.config, args.workdir, args.overrides,
                                distributed=distributed, python=args.python)


def run(args, runner: common.Runner) -> None:
    """One node, all of its GPUs, one process."""
    runner.run(_on_host(args, shlex.join(_train(args, distributed=False))))


def _srun(args) -> list[str]:
    argv = ["srun", f"--nodes={args.nodes}", "--ntasks-per-node=1",
            f"--gpus-per-node={args.gpus_per_node}", f"--cpus-per-task={args.cpus_per_task}"]
    return argv + _train(args, distributed=args.nodes > 1)


def srun(args, runner: common.Runner) -> None:
    """Inside an existing allocation (salloc): one task per node."""
    runner.run(_srun(args))


def slurm_script(args) -> str:
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={args.job_name}",
             f"#SBATCH --nodes={args.nodes}",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --gpus-per-node={args.gpus_per_node}",
             f"#SBATCH --cpus-per-task={args.cpus_per_task}",
             f"#SBATCH --time={args.time}",
             f"#SBATCH --output={args.job_name}-%j.out"]
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        lines.append(f"#SBATCH --account={args.account}")
    lines += ["set -euo pipefail",
              f"cd {shlex.quote(str(REPO))}",  # this checkout, on a file system all nodes see
              shlex.join(_srun(args))]
    return "\n".join(lines) + "\n"


def slurm(args, runner: common.Runner) -> None:
    """Writes the batch script and submits it with sbatch."""
    script = slurm_script(args)
    path = args.script or f"{args.job_name}.sbatch"
    # The dry run shows the file as a here-document: pasted into a shell, it writes it.
    print(f"cat > {shlex.quote(path)} <<'EOF'\n{script}EOF", file=runner.out)
    if not runner.dry_run:
        Path(path).write_text(script, encoding="utf-8")
    runner.run(["sbatch", path])
    runner.say(f"its log: {args.job_name}-<job id>.out (squeue -u $USER for the id)")


STEPS = {"install": install, "run": run, "srun": srun, "slurm": slurm}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = common.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--config", default="", help="configs/FILE.py[:variant]")
    parser.add_argument("--workdir", default="", help="Run directory (shared by all nodes).")
    parser.add_argument("--host", default="", help="install / run: on this ssh host "
                        "(default: here).")
    parser.add_argument("--python", default="python3")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-task", type=int, default=32)
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--job-name", default="tokenpacker")
    parser.add_argument("--script", default="", help="slurm: where the batch script goes "
                        "(default: JOB_NAME.sbatch here).")
    common.add_common_flags(parser)
    args = common.parse_with_overrides(parser, argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    common.main(STEPS, parse_args, "launch/gpu.py", argv)


if __name__ == "__main__":
    main()
