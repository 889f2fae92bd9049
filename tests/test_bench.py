"""The benchmark scripts (``tokenpacker_jax/bench``) at toy sizes: each table's code runs and
makes a well-formed Markdown table, and the PyTorch projector it times computes what ours
does. No timing is checked here: benchmarks are scripts (BENCHMARKS.md)."""

import dataclasses

import jax
import pytest
import torch

from tokenpacker_jax import recipe
from tokenpacker_jax.bench import __main__ as cli
from tokenpacker_jax.bench import (
    hardware,
    llava_torch,
    measurement,
    op_profile,
    packing,
    paper_table,
    projector,
    report,
    token_budget,
    training,
)


def quiet(_):
    """A log function that prints nothing."""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Two torch threads on a busy 2-core runner wait on each other for whole time slices.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def table_rows(markdown: str, which: int = 0) -> list[list[str]]:
    """The cells of the ``which``-th Markdown table in ``markdown`` (header row first),
    checking that every row has the header's number of cells."""
    tables = [[line for line in block.splitlines() if line.startswith("|")]
              for block in markdown.split("\n\n")]
    lines = [table for table in tables if table][which]
    assert len(lines) >= 3, markdown
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert set(rows[1]) == {"---"}
    assert all(len(row) == len(rows[0]) for row in rows), markdown
    return [rows[0]] + rows[2:]


def column(rows: list[list[str]], name: str) -> list[str]:
    index = rows[0].index(name)
    return [row[index] for row in rows[1:]]


def test_comparisons_are_timed_in_turns():
    order = []
    timings = measurement.time_interleaved({name: lambda name=name: order.append(name)
                                            for name in "abc"}, runs=4, warmup=1)
    assert {name: len(t.seconds) for name, t in timings.items()} == {"a": 4, "b": 4, "c": 4}
    # One warm-up round, then every round times each call once, starting one further on.
    assert "".join(order) == "abc" + "abc" + "bca" + "cab" + "abc"
    with pytest.raises(ValueError, match="runs"):
        measurement.time_interleaved({"a": lambda: None}, runs=0)


def test_projector_flops_match_the_paper():
    full = projector.SIZES["full"]
    assert projector.analytic_gflop(full, 2, as_reference=True) == pytest.approx(21.44,
                                                                                  abs=0.01)
    # Ours: the k / v in-projections on 144 query rows (x 8 heads of 128) instead of 576.
    saved = 2 * 2 * (576 - 144) * 1024 * 1024 / 1e9
    assert projector.analytic_gflop(full, 2) == pytest.approx(21.44 - saved, abs=0.03)


def test_projector_table_against_torch():
    sizes = dataclasses.replace(projector.SIZES["tiny"], scales=(3,), batches=(2,))
    section = projector.run(sizes=sizes, log=quiet)
    rows = table_rows(section.body)
    assert len(rows) == 2 and column(rows, "tokens") == ["16"]
    # The PyTorch side computes docs/reference.md §3 with our weights: like for like.
    assert float(column(rows, "max rel diff")[0]) < 1e-5
    assert "Machine: " in section.body and "met**" in section.body
    # The large matmuls alone, in each library: [B * N, W * L] @ [W * L, D] first.
    gemms = table_rows(section.body, which=1)
    assert column(gemms, "[m, k] @ [k, n]")[0] == "[288, 64] @ [64, 32]"
    assert {"JAX GFLOP/s", "PyTorch GFLOP/s", "NumPy GFLOP/s"} <= set(gemms[0])
    assert "in place of JAX's" in section.body
    # Our forward's operations by thread time, slowest first.
    ops = table_rows(section.body, which=2)
    assert len(ops) > 3 and "yes" in column(ops, "holds a matmul")
    thread_ms = [float(ms) for ms in column(ops, "thread ms")]
    assert thread_ms == sorted(thread_ms, reverse=True)


def test_op_profile_names_each_operation_and_its_matmul():
    a = jax.numpy.ones((64, 64))
    compiled, _ = measurement.compile_jit(lambda a, b: jax.nn.gelu(a @ b) + 1, a, a)
    ops = op_profile.hlo_ops(compiled.as_text())
    assert sum(holds for _, holds, _ in ops.values()) == 1, ops  # the dot, fused or not
    assert any(not holds for _, holds, _ in ops.values()), ops  # GELU's fusion
    assert {"dot_general", "tanh"} & {source.split("/")[-1] for *_, source in ops.values()}
    profiled = op_profile.profile(compiled, lambda: compiled(a, a), runs=2)
    assert {op.name for op in profiled} <= set(ops) and profiled
    assert all(op.ms > 0 for op in profiled)


def test_token_budget_and_torch_llava_tables():
    sizes = token_budget.SIZES["tiny"]
    rows = table_rows(token_budget.run(sizes=sizes, log=quiet).body)
    assert column(rows, "projector") == ["mlp2x_gelu", "tokenpacker"]
    assert column(rows, "visual tokens") == ["144", "36"]
    assert column(rows, "prompt length") == ["152", "44"]
    section = llava_torch.run(sizes=sizes, log=quiet)  # reuses the 144-token model
    rows = table_rows(section.body)
    assert [row[1] for row in rows[1:]] == ["144", "144"]
    assert all(float(v) > 0 for v in column(rows, "decode tokens/s"))
    assert "Target: our decode" in section.body


def test_training_table():
    # One device: partitioning the step for the 8 simulated ones only costs compile time.
    section = training.run("tiny", log=quiet, projectors=("tokenpacker",),
                           devices=jax.devices()[:1])
    rows = table_rows(section.body)
    assert column(rows, "visual tokens") == ["9"]
    assert float(column(rows, "tokens/s")[0]) > 0


def test_packing_table():
    section = packing.run("tiny", runs=2, log=quiet, devices=jax.devices()[:1])
    stats = [line for line in section.body.splitlines() if line.startswith("real tokens:")]
    assert len(stats) == 2 and all("(max_length" in line for line in stats)
    rows = table_rows(section.body)
    assert column(rows, "rows") == ["padded", "packed", "packed, rows x2"]
    real = [float(value.rstrip("%")) for value in column(rows, "real positions")]
    assert real[2] > real[0] and all(float(v) > 0 for v in column(rows, "supervised tokens/s"))


def test_paper_table_trains_and_scores(tmp_path):
    section = paper_table.run(workdir=str(tmp_path), seeds=1, projectors=("tokenpacker",),
                              budgets=(2,), stage0_steps=0, stage1_steps=0, stage2_steps=2,
                              num=8,
                              num_eval=2, adjust=training.shrink, log=quiet)
    rows = table_rows(section.body)
    assert column(rows, "projector") == ["tokenpacker", "(chance)"]
    assert rows[1][1] == "9"
    assert 0 <= float(rows[1][3].split(" ± ")[0]) <= 1
    # A finished run is read back, not trained again.
    (result,) = tmp_path.glob("tokenpacker_s2_seed0_*/result.json")
    result.write_text(result.read_text().replace('"accuracy": ', '"accuracy": 0.5, "x": '))
    again = paper_table.run(workdir=str(tmp_path), seeds=1, projectors=("tokenpacker",),
                            budgets=(2,), stage0_steps=0, stage1_steps=0, stage2_steps=2,
                            num=8,
                            num_eval=2, adjust=training.shrink, log=quiet)
    assert "0.500 ± 0.000" in again.body


def test_paper_summary_and_comparison():
    def result(projector, tokens, accuracy, seed):
        return {"projector": projector, "tokens": tokens, "seed": seed, "n": 10,
                "accuracy": accuracy, "categories": {"colour": accuracy, "digit": 0.1}}

    results = [result("mlp2x_gelu", 144, 0.5, 0), result("mlp2x_gelu", 144, 0.7, 1),
               result("tokenpacker", 36, 0.6, 0), result("tokenpacker", 36, 0.62, 1),
               result("avgpool", 36, 0.4, 0), result("avgpool", 36, 0.45, 1),
               result("resampler", 36, 0.61, 0), result("resampler", 36, 0.7, 1)]
    summaries = paper_table.summarise(results)
    assert [(s.projector, s.tokens) for s in summaries] == [
        ("mlp2x_gelu", 144), ("tokenpacker", 36), ("avgpool", 36), ("resampler", 36)]
    assert summaries[0].mean == pytest.approx(0.6) and summaries[0].std == pytest.approx(
        0.1414, abs=1e-4)
    rows = table_rows(paper_table.markdown(summaries))
    assert rows[0][-2:] == ["colour", "digit"]
    assert rows[1][3] == "0.600 ± 0.141" and rows[1][4] == "0.500-0.700"
    assert rows[-1][0] == "(chance)" and rows[-1][-1] == "0.100"
    lines = paper_table.comparisons(summaries)
    assert lines == [
        "- 36 tokens: TokenPacker 0.610 vs avgpool 0.425: higher by 0.185; the seeds' "
        "ranges do not overlap",
        "- 36 tokens: TokenPacker 0.610 vs resampler 0.655: lower by 0.045; the seeds' "
        "ranges overlap"]


def test_paper_max_length_fits_each_projector_tokens():
    def max_length(projector, scale):
        edit = paper_table.entry_adjust(paper_table.Entry(projector, scale))
        return recipe.stage_config(2, "/data", recipe.Recipe(), 0, edit).data.max_length

    own = max_length("tokenpacker", 2)  # the tiny recipe's own projector: 9 tokens
    assert max_length("mlp2x_gelu", 1) == own + 36 - 9
    assert max_length("avgpool", 3) == own  # 4 tokens: the recipe's length is enough


def test_paper_entries():
    names = [e.name for e in paper_table.entries()]
    assert names[0] == "mlp2x_gelu_s1" and len(names) == 1 + 2 * len(paper_table.PACKING)
    assert paper_table.entries(("tokenpacker",), (2, 3))[1].name == "tokenpacker_s3"


def test_sections_replace_their_markers_and_keep_the_prose(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nProse.\n")
    report.update_section(str(path), report.Section("projector", "Projector", "| a |\n|---|"))
    report.update_section(str(path), report.Section("training", "Training", "first"))
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nProse.\n\n## Projector\n\n<!-- bench:projector -->")
    path.write_text(text.replace("<!-- /bench:training -->",
                                 "<!-- /bench:training -->\n\nWhat it means."))
    report.update_section(str(path), report.Section("training", "Training", "second"))
    text = path.read_text()
    assert "first" not in text and "second\n<!-- /bench:training -->\n\nWhat it means." in text
    assert text.count("## Training") == 1


def test_tables_measured_on_a_gpu_get_sections_of_their_own(tmp_path, monkeypatch):
    path = tmp_path / "BENCHMARKS.md"
    cpu = report.section("projector", "Projector forward", "on the CPU")
    assert (cpu.name, cpu.title) == ("projector", "Projector forward")
    report.update_section(str(path), cpu)

    @dataclasses.dataclass
    class FakeDevice:
        device_kind: str = "NVIDIA H100 80GB HBM3"

    monkeypatch.setattr(hardware.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(hardware.jax, "devices", lambda *_: [FakeDevice()])
    gpu = report.section("projector", "Projector forward", "on the GPU")
    assert gpu.name == "projector_gpu"
    assert gpu.title == "Projector forward on NVIDIA H100 80GB HBM3"
    report.update_section(str(path), gpu)
    text = path.read_text()  # the CPU's figures stay beside the GPU's
    assert "on the CPU" in text and "## Projector forward on NVIDIA H100 80GB HBM3" in text
    # The PyTorch side runs on JAX's kind of device or not at all: this torch is a CPU build.
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no device of that kind"):
            hardware.torch_device()
    monkeypatch.setattr(hardware.jax, "default_backend", lambda: "tpu")
    with pytest.raises(RuntimeError, match="JAX runs on tpu"):
        hardware.torch_device()


def test_command_line():
    args = cli.parse(["1", "training", "paper", "--sizes=tiny", "--runs=2"])
    assert args.which == ["projector", "training", "paper"]
    assert cli.parse([]).which == list(cli.DEFAULT) == [*cli.TABLES[:5], "packing"]
    # tpu_fit: no toy size
    assert cli.parse(["--sizes=tiny"]).which == [*cli.TABLES[:4], "packing"]
    for bad in (["8"], ["nonsense"], ["--runs=3"], ["--sizes=tiny", "--write"],
                ["tpu_fit", "--sizes=tiny"]):
        with pytest.raises(SystemExit):
            cli.parse(bad)
