"""Every notebook in notebooks/ runs top to bottom in a fresh kernel, at its smallest
settings (TOKENPACKER_NOTEBOOK_SMOKE=1: the tiny config, a couple of training steps); a cell
error fails the test. The quickstart notebook trains the run that the other two use, so the
three share one work folder and run in this order (run alone, the other two train their own
run with the quickstart's command line)."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("quickstart", "region_maps", "export_to_pytorch")


def read(name):
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def kernel_env(workdir: Path) -> dict[str, str]:
    """The kernel is a process of its own: one CPU device (not the tests' 8 simulated ones),
    the repository importable, the smallest settings. A smoke run executes each program a
    step or two, so compiling is what takes the time: XLA's CPU backend skips its expensive
    optimisations (about half the compile time)."""
    env = dict(os.environ)
    xla_flags = [flag for flag in env.get("XLA_FLAGS", "").split()
                 if not flag.startswith("--xla_force_host_platform_device_count")]
    xla_flags += ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    env.update(XLA_FLAGS=" ".join(xla_flags), JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false", TOKENPACKER_NOTEBOOK_SMOKE="1",
               TOKENPACKER_NOTEBOOK_WORKDIR=str(workdir / "work"),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    return env


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_and_colab_ready(name):
    notebook = read(name)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), (
        f"notebooks/{name}.ipynb: clear the outputs before committing")
    assert '"google.colab" in sys.modules' in code[0].source, (
        f"notebooks/{name}.ipynb: the first code cell installs on Colab")
    assert "parameters" in code[1].metadata.get("tags", []), (
        f"notebooks/{name}.ipynb: the second code cell holds the parameters")
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"\(https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/"
                     rf"main/notebooks/{name}\.ipynb\)", readme), f"README: no badge for {name}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, workdir):
    notebook = read(name)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute(env=kernel_env(workdir))  # raises CellExecutionError on a failing cell
    printed = "".join(output.get("text", "") for cell in notebook.cells
                      if cell.cell_type == "code" for output in cell.outputs)
    expected = {"quickstart": r"stage 2: 2 steps, loss \d",
                "region_maps": r"maps \(\d+, \d+, \d+\)",
                "export_to_pytorch": r"largest difference \d\.\d+e-\d\d"}[name]
    assert re.search(expected, printed), printed[-3000:]
