"""The TPU fit table (BENCHMARKS.md table 5): entries compiled for TPU slices in worker
processes with libtpu's compile-only devices, and their Markdown rows."""

import pytest

from tokenpacker_jax import aot, configuration, sharding
from tokenpacker_jax.bench import tpu_fit
from tokenpacker_jax.configs import tiny, tokenpacker


def test_short_out_of_memory_message():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
               "HLO temporaries (18.89G) exceeds available HBM (15.75G).\nmore detail")
    assert tpu_fit._short_out_of_memory(aot._out_of_memory_message(RuntimeError(message))) == (
        "temporaries alone 18.89G > 15.75G available")


def test_fit_table_of_the_tiny_stage_1_step_in_two_worker_processes():
    """``fit_table`` (bench's entry point) with jobs=2: a v5e and a v5p slice compiled at once
    in worker processes; arguments = what the state holds (stage 1: Adam moments for the
    projector only), donated, and a Markdown row per report. Packed rows of 128 positions:
    the TPU step attends with the splash kernel."""
    entries = []
    for name in ("v5e:2x2", "v5p:2x2x1"):
        topology = aot.parse_topology(name)
        config = tiny.get_config("stage=1")
        config.data.update(packing="first_fit", max_length=128, max_images_per_row=4)
        tpu_fit.one_sequence_per_shard(config, topology)
        entries.append(tpu_fit.TableEntry("tiny stage 1", config, topology,
                                          samples_per_step=40.0, padded_flops_per_sample=1e9))
    assert entries[0].config.train.microbatches == 4
    logged = []
    reports = tpu_fit.fit_table(entries, log=logged.append, jobs=2)
    assert [r.device_kind for r in reports] == ["TPU v5 lite", "TPU v5"]
    for report in reports:
        assert report.fits and not report.out_of_memory
        # Donated: the new state reuses the old state's buffers.
        assert report.alias_bytes > 0.9 * report.output_bytes
        assert report.argument_bytes < 16 * 2**20
        assert report.xla_flops and report.analytic_flops
        assert report.attention == "splash" and report.rows.startswith("packed (first_fit")
    assert [line.split(":")[0] for line in logged] == ["tiny stage 1 on v5e-4",
                                                       "tiny stage 1 on v5p-8"]
    table = tpu_fit.fit_table_markdown(reports, entries).splitlines()
    assert table[0].startswith("| model | slice | mesh fsdp x tensor | rows (microbatches) "
                               "| samples per step |")
    assert table[2].startswith("| tiny stage 1 | v5e-4 (v5e:2x2) | 4 x 1 | 16 (4) | 40 |")
    assert table[3].startswith("| tiny stage 1 | v5p-8 (v5p:2x2x1) | 4 x 1 | 16 (4) | 40 |")
    assert "| 16 | yes |" in table[2] and "| 95 | yes |" in table[3]
    # Per 1,000 samples: the step's time over 40 samples; padded: 1,000 x 1e9 FLOPs.
    report = reports[0]
    seconds = report.step_seconds_at_mfu()
    padded = 1e12 / (0.4 * 4 * report.peak_flops_per_chip)
    assert f"| {1000 * seconds / 40:.1f} s ({padded:.1f} s) |" in table[2]


def test_table_entries_and_mistakes_on_the_command_line(capsys):
    (entry,) = tpu_fit.paper_table_entries(["v5e-16"], [("vicuna7b", 2)], recipes=())
    rows = entry.config.data.batch_size
    assert entry.samples_per_step == rows * tokenpacker.PACKED_ROWS[2, 2][0]
    assert entry.config.train.microbatches == rows // 16
    # Packed stage 1 has 16 rows: on 32 chips the tensor axis takes the rest (16 x 2).
    (stage_1,) = tpu_fit.paper_table_entries(["v5e-32"], [("vicuna7b", 1)], recipes=())
    assert stage_1.config.data.batch_size == 16 and stage_1.config.train.microbatches == 1
    assert sharding.mesh_shape(stage_1.config.mesh.to_dict(), 32) == {
        "data": 1, "fsdp": 16, "tensor": 2}
    configuration.validate(stage_1.config, num_devices=32)
    # The recipes keep their rows per microbatch where the slice's shards divide them.
    lean, lora4, lora8 = tpu_fit.paper_table_entries(
        [], [], recipes=(("vicuna7b", "lean=true", ("v5e-8",)),
                         ("vicuna7b", "lora=true", ("v5e-4", "v5e-8"))))
    assert lean.label == "vicuna7b stage 2 lean=true" and lean.config.train.microbatches == 1
    assert [e.config.train.microbatches for e in (lora4, lora8)] == [8, 4]
    for argv, said in ((["--models=vicuna7b:3"], "--models: 'vicuna7b:3'"),
                       (["--slices=v5e-7"], "--slices: topology 'v5e-7'")):
        with pytest.raises(SystemExit) as exit_info:
            tpu_fit.main(argv)
        assert exit_info.value.code == 2 and said in capsys.readouterr().err
