"""The launch scripts' dry runs: every command they would run, printed exactly."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ZONE = "--zone=us-west4-a"


def dry_run(script: str, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args, "--dry-run"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def commands(lines: list[str]) -> list[list[str]]:
    """The printed commands (not the '#' notes), split as a shell would."""
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_tpu_up_with_a_queued_resource():
    lines = dry_run("tpu.py", "up", "--name=tp", ZONE, "--accelerator-type=v5e-16",
                    "--queued", "--spot", "--project=proj",
                    "--config=configs/tokenpacker.py:llm=vicuna7b,stage=2",
                    "--workdir=gs://bucket/runs/7b", "--config.optim.lr=1e-5")
    create, describe, archive, scp, install, run = commands(lines)
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "tp",
                      "--node-id=tp", "--accelerator-type=v5litepod-16",
                      "--runtime-version=v2-alpha-tpuv5-lite", ZONE, "--project=proj",
                      "--spot"]
    assert describe == ["gcloud", "compute", "tpus", "queued-resources", "describe", "tp",
                        "--format=value(state.state)", ZONE, "--project=proj"]
    assert "# repeated every 30 s until the queued resource is ACTIVE:" in lines
    assert archive == ["git", "-C", str(ROOT), "archive", "--format=tar.gz",
                       "--output=/tmp/tokenpacker-jax.tar.gz", "HEAD"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/tokenpacker-jax.tar.gz",
                   "tp:~/tokenpacker-jax.tar.gz", "--worker=all", ZONE, "--project=proj"]
    assert install[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tp", "--worker=all"]
    remote = install[7].removeprefix("--command=")
    assert remote.startswith("rm -rf ~/tokenpacker-jax && mkdir -p ~/tokenpacker-jax && "
                             "tar -xzf ~/tokenpacker-jax.tar.gz -C ~/tokenpacker-jax && "
                             "cd ~/tokenpacker-jax && ")
    assert shlex.split(remote.split(" && ")[4]) == [
        "python3", "-m", "pip", "install", "-q", "-r", "requirements.txt"]
    assert shlex.split(remote.split(" && ")[5]) == [
        "python3", "-m", "pip", "install", "-q", "jax[tpu]==0.10.2"]
    assert run[:7] == install[:7] and run[8:] == [ZONE, "--project=proj"]
    remote = run[7].removeprefix("--command=")
    assert remote.startswith("cd ~/tokenpacker-jax && setsid nohup python3 -m "
                             "tokenpacker_jax.train ")
    assert remote.endswith(" > ~/tokenpacker-run.log 2>&1 < /dev/null &")
    train = shlex.split(remote.split(" && ")[1].split(" > ")[0])[2:]
    assert train == ["python3", "-m", "tokenpacker_jax.train",
                     "--config=configs/tokenpacker.py:llm=vicuna7b,stage=2",
                     "--workdir=gs://bucket/runs/7b", "--config.distributed.initialize=true",
                     "--config.optim.lr=1e-5"]


def test_tpu_vm_create_install_from_git_logs_and_delete():
    [create] = commands(dry_run("tpu.py", "create", "--name=tp", ZONE,
                                "--accelerator-type=v5p-8"))
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tp",
                      "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5", ZONE]
    [install] = commands(dry_run("tpu.py", "install", "--name=tp", ZONE,
                                 "--git-url=https://example.com/tp.git", "--branch=dev"))
    assert install[7].startswith(
        "--command=rm -rf ~/tokenpacker-jax && git clone --depth 1 --branch dev "
        "https://example.com/tp.git ~/tokenpacker-jax && cd ~/tokenpacker-jax && ")
    [logs] = commands(dry_run("tpu.py", "logs", "--name=tp", ZONE))
    assert logs == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tp", "--worker=0",
                    "--command=tail -n 100 -f ~/tokenpacker-run.log", ZONE]
    [delete] = commands(dry_run("tpu.py", "delete", "--name=tp", ZONE))
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "tp", "--quiet", ZONE]
    [delete] = commands(dry_run("tpu.py", "delete", "--name=tp", ZONE, "--queued"))
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "tp",
                      "--force", "--quiet", ZONE]


@pytest.mark.parametrize("args,message", [
    (["run", "--name=tp", ZONE], "--config and --workdir are required"),
    (["create", "--name=tp", ZONE, "--accelerator-type=v9-8"], "--accelerator-type"),
    (["run", "--name=tp", ZONE, "--config=c.py", "--workdir=w", "--lr=1"],
     "unrecognized arguments: --lr=1"),
])
def test_tpu_errors(args, message):
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "tpu.py"), *args,
                             "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr


def test_gpu_one_node_here_and_over_ssh():
    [install] = commands(dry_run("gpu.py", "install"))
    assert install[:2] == ["bash", "-c"] and install[2].startswith(f"cd {ROOT} && ")
    assert "python3 -m pip install -q 'jax[cuda13]==0.10.2'" in install[2]
    rsync, install = commands(dry_run("gpu.py", "install", "--host=me@gpu1"))
    assert rsync == ["rsync", "-a", "--delete", "--exclude=.git", f"{ROOT}/",
                     "me@gpu1:tokenpacker-jax/"]
    assert install[:2] == ["ssh", "me@gpu1"]
    assert install[2].startswith("cd ~/tokenpacker-jax && python3 -m pip install -q -r "
                                 "requirements.txt")
    [run] = commands(dry_run("gpu.py", "run", "--host=me@gpu1", "--config=configs/tiny.py",
                             "--workdir=/runs/a", "--config.train.num_steps=5"))
    assert run == ["ssh", "me@gpu1", "cd ~/tokenpacker-jax && python3 -m tokenpacker_jax.train "
                   "--config=configs/tiny.py --workdir=/runs/a --config.train.num_steps=5"]
    [run] = commands(dry_run("gpu.py", "run", "--config=configs/tiny.py", "--workdir=/runs/a"))
    assert run == ["bash", "-c", f"cd {ROOT} && python3 -m tokenpacker_jax.train "
                   "--config=configs/tiny.py --workdir=/runs/a"]


SRUN = ["srun", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=32",
        "python3", "-m", "tokenpacker_jax.train",
        "--config=configs/tokenpacker.py:llm=vicuna13b,stage=2", "--workdir=/shared/13b",
        "--config.distributed.initialize=true", "--config.optim.lr=1e-5"]


def test_gpu_slurm_batch_script_and_srun(tmp_path):
    script = tmp_path / "job.sbatch"
    args = ["--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--account=lab",
            "--time=12:00:00", "--config=configs/tokenpacker.py:llm=vicuna13b,stage=2",
            "--workdir=/shared/13b", "--config.optim.lr=1e-5"]
    lines = dry_run("gpu.py", "slurm", f"--script={script}", *args)
    start = lines.index(f"cat > {script} <<'EOF'")
    end = lines.index("EOF")
    body = lines[start + 1:end]
    assert body[0] == "#!/bin/bash"
    for directive in ("--job-name=tokenpacker", "--nodes=4", "--ntasks-per-node=1",
                      "--gpus-per-node=8", "--cpus-per-task=32", "--time=12:00:00",
                      "--output=tokenpacker-%j.out", "--partition=gpu", "--account=lab"):
        assert f"#SBATCH {directive}" in body
    assert body[-2] == f"cd {ROOT}"
    assert shlex.split(body[-1]) == SRUN
    assert lines[end + 1] == f"sbatch {script}"
    assert not script.exists()  # a dry run writes nothing
    [srun] = commands(dry_run("gpu.py", "srun", *args))
    assert srun == SRUN
    # One node: no jax.distributed.initialize.
    [srun] = commands(dry_run("gpu.py", "srun", "--nodes=1", "--config=c.py", "--workdir=w"))
    assert "--config.distributed.initialize=true" not in srun
