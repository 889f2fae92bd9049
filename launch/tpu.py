"""Cloud TPU: create a TPU VM (or a queued resource), install, train on every worker, follow
the logs, delete. Every step takes --dry-run (print the gcloud commands, run nothing).

    python launch/tpu.py up     --name=tp --zone=us-west4-a --accelerator-type=v5litepod-16 \\
        --config=configs/tokenpacker.py:llm=vicuna7b,stage=2 --workdir=gs://BUCKET/runs/7b-s2 \\
        [--queued] [--spot] [--project=P] [--config.train.init_from=gs://...]
    python launch/tpu.py logs   --name=tp --zone=us-west4-a
    python launch/tpu.py delete --name=tp --zone=us-west4-a [--queued]

``up`` = ``create`` + ``install`` + ``run``; each is also a command of its own. ``install``
copies this checkout's committed HEAD (``git archive``; or clones ``--git-url``) to every
worker and installs requirements.txt, ``jax[tpu]`` and the package. ``run`` starts the same
training command on all workers (``jax.distributed.initialize`` finds the pod's hosts) in
the background, logging to ~/tokenpacker-run.log; rerunning it resumes from the workdir's
newest checkpoint. With a ``gs://`` workdir the checkpoints go to Cloud Storage through
Orbax; data and pretrained checkpoints must be readable on every worker (a local copy or a
gcsfuse mount).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

# Accelerator family (as --accelerator-type starts) -> TPU VM software version.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
LOG_FILE = "~/tokenpacker-run.log"
ARCHIVE = "tokenpacker-jax.tar.gz"


def accelerator_type(text: str) -> str:
    """Cloud TPU's name for a slice; ``v5e-16`` is spelled ``v5litepod-16`` there."""
    family, _, size = text.partition("-")
    if family == "v5e":
        family = "v5litepod"
    if family not in RUNTIME_VERSIONS or not size.isdigit():
        raise common.UserError(f"--accelerator-type {text!r}: expected one of "
                         f"{sorted(RUNTIME_VERSIONS)} (or v5e) and a size, e.g. v5litepod-16")
    return f"{family}-{size}"


def runtime_version(args) -> str:
    return args.version or RUNTIME_VERSIONS[accelerator_type(args.accelerator_type)
                                            .split("-")[0]]


def _gcloud(args, *words: str) -> list[str]:
    argv = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
    if args.project:
        argv.append(f"--project={args.project}")
    return argv


def _ssh(args, command: str, worker: str = "all") -> list[str]:
    return _gcloud(args, "tpu-vm", "ssh", args.name, f"--worker={worker}",
                   f"--command={command}")


def create(args, runner: common.Runner) -> None:
    kind = accelerator_type(args.accelerator_type)
    version = runtime_version(args)
    if args.queued:
        argv = _gcloud(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                       f"--accelerator-type={kind}", f"--runtime-version={version}")
        if args.spot:
            argv.append("--spot")
        runner.run(argv)
        describe = _gcloud(args, "queued-resources", "describe", args.name,
                           "--format=value(state.state)")
        runner.wait_until(describe, lambda state: state == "ACTIVE",
                          what="the queued resource is ACTIVE", timeout_s=args.wait_s)
    else:
        argv = _gcloud(args, "tpu-vm", "create", args.name, f"--accelerator-type={kind}",
                       f"--version={version}")
        if args.spot:
            argv.append("--spot")
        runner.run(argv)


def install(args, runner: common.Runner) -> None:
    target = f"~/{common.REMOTE_DIR}"
    if args.git_url:
        fetch = (f"rm -rf {target} && git clone --depth 1 --branch {shlex.quote(args.branch)} "
                 f"{shlex.quote(args.git_url)} {target}")
    else:
        archive = str(Path(args.archive_dir) / ARCHIVE)
        repo = str(Path(__file__).resolve().parents[1])
        runner.say("committed HEAD only: uncommitted changes are not shipped")
        runner.run(["git", "-C", repo, "archive", "--format=tar.gz", f"--output={archive}",
                    "HEAD"])
        runner.run(_gcloud(args, "tpu-vm", "scp", archive, f"{args.name}:~/{ARCHIVE}",
                           "--worker=all"))
        fetch = f"rm -rf {target} && mkdir -p {target} && tar -xzf ~/{ARCHIVE} -C {target}"
    runner.run(_ssh(args, f"{fetch} && cd {target} && {common.pip_install(common.JAX_TPU)}"))


def run(args, runner: common.Runner) -> None:
    if not args.config or not args.workdir:
        raise common.UserError("run: --config and --workdir are required")
    train = common.train_command(args.config, args.workdir, args.overrides, distributed=True,
                                 python="python3")
    # setsid + nohup: the run outlives the ssh session; every worker logs to its own file.
    command = (f"cd ~/{common.REMOTE_DIR} && setsid nohup {shlex.join(train)} "
               f"> {LOG_FILE} 2>&1 < /dev/null &")
    runner.run(_ssh(args, command))
    runner.say(f"follow it: python launch/tpu.py logs --name={args.name} --zone={args.zone}")


def logs(args, runner: common.Runner) -> None:
    follow = "-f " if args.follow else ""
    runner.run(_ssh(args, f"tail -n {args.lines} {follow}{LOG_FILE}", worker=args.worker))


def delete(args, runner: common.Runner) -> None:
    if args.queued:
        runner.run(_gcloud(args, "queued-resources", "delete", args.name, "--force",
                           "--quiet"))
    else:
        runner.run(_gcloud(args, "tpu-vm", "delete", args.name, "--quiet"))


def up(args, runner: common.Runner) -> None:
    create(args, runner)
    install(args, runner)
    run(args, runner)


STEPS = {"create": create, "install": install, "run": run, "logs": logs, "delete": delete,
         "up": up}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = common.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name.")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default="", help="Default: gcloud's configured one.")
    parser.add_argument("--accelerator-type", default="v5litepod-16",
                        help="v5litepod-16 (or v5e-16), v5p-8, v4-8, v6e-8, ...")
    parser.add_argument("--version", default="", help="TPU software version (default: "
                        "the accelerator's, e.g. v2-alpha-tpuv5-lite).")
    parser.add_argument("--queued", action="store_true",
                        help="Create / delete through a queued resource.")
    parser.add_argument("--spot", action="store_true", help="Spot (preemptible) capacity.")
    parser.add_argument("--wait-s", type=float, default=6 * 3600,
                        help="How long to wait for a queued resource.")
    parser.add_argument("--git-url", default="", help="Clone this on the workers instead of "
                        "copying the local checkout.")
    parser.add_argument("--branch", default="main")
    parser.add_argument("--archive-dir", default="/tmp", help="Where the local archive goes.")
    parser.add_argument("--config", default="", help="configs/FILE.py[:variant]")
    parser.add_argument("--workdir", default="", help="Run directory, e.g. gs://BUCKET/run.")
    parser.add_argument("--worker", default="0", help="logs: which worker (or all).")
    parser.add_argument("--lines", type=int, default=100)
    parser.add_argument("--no-follow", dest="follow", action="store_false")
    common.add_common_flags(parser)
    return common.parse_with_overrides(parser, argv)


def main(argv: list[str] | None = None) -> None:
    common.main(STEPS, parse_args, "launch/tpu.py", argv)


if __name__ == "__main__":
    main()
