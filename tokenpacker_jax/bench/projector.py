"""Table 1: the TokenPacker forward pass, ours (jitted) against PyTorch eager, and against
the machine's matmul peak measured in the same run.

Inputs at the paper's sizes: x_last [B, 576, 1024], x_multi [B, 576, 4096] -> tokens
[B, M, 4096], M = 144 / 64 / 36 for scale 2 / 3 / 4, batch 1 and 8, float32. The PyTorch
side is docs/reference.md §3 in torch (``bench/torch_tokenpacker.py``: ``nn.MultiheadAttention``,
``F.interpolate``) holding the same weights, fed the same inputs; the largest difference of
the two outputs is reported (relative to the largest output), so the two compute the same
thing.

GFLOP are counted analytically (``flops.projector_forward_flops``: matmuls, 2 per
multiply-add), for each side what it computes: the reference's about 21.4 per image at scale
2 for PyTorch, 19.6 for ours (its region attention projects no key or value, see
``tokenpacker.MultiheadAttention``). The peak is the faster of a large square
float32 matmul in JAX and in PyTorch, timed in the same rounds as each row (the machine's
speed drifts: a peak taken once at the start can sit below a later row's figures).

Below it, the projector's large matmuls alone at scale 2 and the largest batch (over 90% of
its FLOPs at the paper's sizes), timed in turns in JAX, in PyTorch and, on the CPU, in NumPy
(its BLAS): how fast each library multiplies the same matrices bounds how far the forward
can get ahead of PyTorch's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokenpacker_jax import flops
from tokenpacker_jax.bench import hardware, measurement, op_profile, report
from tokenpacker_jax.models.decoder_config import DecoderConfig
from tokenpacker_jax.models.mllm import MLLMConfig
from tokenpacker_jax.models.projectors import ProjectorConfig
from tokenpacker_jax.models.tokenpacker import TokenPacker
from tokenpacker_jax.models.vision import VisionConfig

TARGET_SPEEDUP = 1.0  # at the largest batch: at least as fast as PyTorch
TARGET_PEAK = 0.70  # at the largest batch: at least 70% of the measured matmul peak


@dataclasses.dataclass(frozen=True)
class Sizes:
    width: int  # W, one feature level
    levels: int  # L, x_multi has W * L channels
    dim: int  # D, TokenPacker's internal width
    heads: int
    out_dim: int  # H, the LLM width
    grid: int  # patches per side
    scales: tuple[int, ...]
    batches: tuple[int, ...]
    peak_n: int  # the peak matmul is [n, n] @ [n, n]


SIZES = {
    "full": Sizes(width=1024, levels=4, dim=1024, heads=8, out_dim=4096, grid=24,
                  scales=(2, 3, 4), batches=(1, 8), peak_n=2048),
    "tiny": Sizes(width=16, levels=4, dim=32, heads=4, out_dim=48, grid=12,
                  scales=(2, 3, 4), batches=(1, 2), peak_n=128),
}


@dataclasses.dataclass(frozen=True)
class Row:
    scale: int
    tokens: int
    batch: int
    gflop: float  # analytic, the whole batch, as ours computes it
    reference_gflop: float  # the same as the reference (PyTorch) computes it
    jax_ms: float
    torch_ms: float
    jax_peak: float  # GFLOP/s of the peak matmul, timed in the same rounds
    torch_peak: float
    compile_s: float
    max_rel_diff: float  # max |ours - torch| / max |torch|
    ops: tuple[op_profile.Op, ...] = ()  # our forward's operations (``profile=True``)

    @property
    def peak(self) -> float:
        """The faster of the two peak matmuls, GFLOP/s."""
        return max(self.jax_peak, self.torch_peak)

    @property
    def speedup(self) -> float:
        """PyTorch time / our time (> 1: ours is faster)."""
        return self.torch_ms / self.jax_ms

    @property
    def jax_gflops(self) -> float:
        return self.gflop / (self.jax_ms / 1e3)

    @property
    def torch_gflops(self) -> float:
        return self.reference_gflop / (self.torch_ms / 1e3)


def analytic_gflop(sizes: Sizes, scale: int, as_reference: bool = False) -> float:
    """GFLOP of one image through our projector (``as_reference``: as docs/reference.md §3
    computes it), ``flops.py``'s count."""
    patch = 14
    config = MLLMConfig(
        vision=VisionConfig(image_size=sizes.grid * patch, patch_size=patch,
                            width=sizes.width, num_heads=1),
        projector=ProjectorConfig(scale_factor=scale, out_dim=sizes.out_dim,
                                  embed_dim=sizes.dim, num_heads=sizes.heads),
        decoder=DecoderConfig(width=sizes.out_dim),
        multi_layers=tuple(range(1, sizes.levels + 1)))
    return flops.projector_forward_flops(config, as_reference=as_reference) / 1e9


def matmul_calls(a: np.ndarray, b: np.ndarray) -> dict[str, Callable[[], Any]]:
    """Calls computing ``a @ b`` (float32) in JAX (compiled) and PyTorch (on
    ``torch_device``), keyed by library name."""
    import torch  # noqa: PLC0415 (torch: optional, the PyTorch side of a comparison)

    ja, jb = jnp.asarray(a), jnp.asarray(b)
    matmul, _ = measurement.compile_jit(jnp.matmul, ja, jb)
    device = hardware.torch_device()
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    return {"JAX": lambda: matmul(ja, jb), "PyTorch": lambda: torch.matmul(ta, tb)}


def peak_matmuls(n: int) -> dict[str, Callable[[], Any]]:
    """Calls of a float32 [n, n] @ [n, n] in JAX (``"jax peak"``) and in PyTorch
    (``"torch peak"``), 2 n^3 FLOP each."""
    rng = np.random.default_rng(0)
    calls = matmul_calls(*(rng.standard_normal((n, n), np.float32) for _ in range(2)))
    return {"jax peak": calls["JAX"], "torch peak": calls["PyTorch"]}


def measure(sizes: Sizes, scale: int, batch: int, runs: int, seed: int = 0,
            profile: bool = False) -> Row:
    """Ours and PyTorch's forward at one (scale, batch), same weights and inputs, timed in
    turns with the two peak matmuls; with ``profile``, then our forward's operations
    (``op_profile``)."""
    import torch  # noqa: PLC0415 (torch: optional, the PyTorch side of a comparison)

    from tokenpacker_jax.bench import torch_tokenpacker  # noqa: PLC0415 (torch, as above)

    rng = np.random.default_rng(seed)
    patches = sizes.grid * sizes.grid
    x = rng.standard_normal((batch, patches, sizes.width), np.float32)
    x_multi = rng.standard_normal((batch, patches, sizes.width * sizes.levels), np.float32)
    module = TokenPacker(scale_factor=scale, out_dim=sizes.out_dim, embed_dim=sizes.dim,
                         num_heads=sizes.heads)
    jx, jx_multi = jnp.asarray(x), jnp.asarray(x_multi)
    params = measurement.random_params(module, jx[:1], jx_multi[:1], seed=seed)
    forward, compile_s = measurement.compile_jit(
        lambda p, a, b: module.apply({"params": p}, a, b), params, jx, jx_multi)
    ours = np.asarray(forward(params, jx, jx_multi))

    device = hardware.torch_device()
    reference = torch_tokenpacker.from_params(jax.device_get(params), num_heads=sizes.heads,
                                              scale=scale, levels=sizes.levels).to(device)
    tx, tx_multi = torch.from_numpy(x).to(device), torch.from_numpy(x_multi).to(device)
    with torch.inference_mode():
        theirs = reference(tx, tx_multi)[0].cpu().numpy()
        # (two warm-up rounds: torch's allocator and thread pool settle in the first calls)
        timings = measurement.time_interleaved(
            {"jax": lambda: forward(params, jx, jx_multi),
             "torch": lambda: reference(tx, tx_multi), **peak_matmuls(sizes.peak_n)},
            runs=runs, warmup=2)
    peak_gflop = 2 * sizes.peak_n**3 / 1e9
    return Row(scale=scale, tokens=(sizes.grid // scale) ** 2, batch=batch,
               gflop=batch * analytic_gflop(sizes, scale),
               reference_gflop=batch * analytic_gflop(sizes, scale, as_reference=True),
               jax_ms=timings["jax"].ms,
               torch_ms=timings["torch"].ms,
               jax_peak=peak_gflop / timings["jax peak"].median,
               torch_peak=peak_gflop / timings["torch peak"].median, compile_s=compile_s,
               max_rel_diff=float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))),
               ops=tuple(op_profile.profile(forward, lambda: forward(params, jx, jx_multi), runs)
                         if profile else ()))


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One of the projector's large matmuls: [m, k] @ [k, n], ``count`` times per forward."""

    name: str
    m: int
    k: int
    n: int
    count: int
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # library -> median

    @property
    def gflop(self) -> float:
        """All ``count`` of them, GFLOP."""
        return 2 * self.m * self.k * self.n * self.count / 1e9

    def gflops(self, library: str) -> float:
        return self.gflop / self.count / self.seconds[library]


def large_gemms(sizes: Sizes, scale: int, batch: int) -> list[Gemm]:
    """The matmuls of one forward that are not per head or per region: the keys' and values'
    two layers on every patch, the output MLP on every token (``TokenPacker``)."""
    patches = batch * sizes.grid**2
    tokens = batch * (sizes.grid // scale) ** 2
    d, h = sizes.dim, sizes.out_dim
    return [Gemm("keys, values: first layer", patches, sizes.width * sizes.levels, d, 2),
            Gemm("keys, values: second layer", patches, d, d, 2),
            Gemm("output MLP: first layer", tokens, d, h, 1),
            Gemm("output MLP: second layer", tokens, h, h, 1)]


def measure_gemms(sizes: Sizes, scale: int, batch: int, runs: int) -> list[Gemm]:
    """``large_gemms`` timed in JAX (compiled) and PyTorch in turns, then, on the CPU, in
    NumPy on its own: its BLAS threads keep spinning for a while after a call and slow
    whatever runs next (JAX and PyTorch by up to a quarter when it takes turns with them)."""
    import torch  # noqa: PLC0415 (torch: optional, the PyTorch side of a comparison)

    rng = np.random.default_rng(0)
    measured = []
    for gemm in large_gemms(sizes, scale, batch):
        a = rng.standard_normal((gemm.m, gemm.k), np.float32)
        b = rng.standard_normal((gemm.k, gemm.n), np.float32)
        with torch.inference_mode():
            timings = measurement.time_interleaved(matmul_calls(a, b), runs=runs, warmup=2)
        if hardware.accelerator() is None:
            timings["NumPy"] = measurement.time_calls(lambda a=a, b=b: np.matmul(a, b),
                                                      runs=runs, warmup=2)
        measured.append(dataclasses.replace(
            gemm, seconds={name: t.median for name, t in timings.items()}))
    return measured


def gemm_table(gemms: list[Gemm], forward: Row | None) -> str:
    """The GEMM table and what it says about the forward row at the same scale and batch."""
    libraries = list(gemms[0].seconds)
    table = report.markdown_table(
        ["matmul", "[m, k] @ [k, n]", "per forward", "GFLOP",
         *(f"{name} GFLOP/s" for name in libraries), "JAX / PyTorch speed"],
        [[g.name, f"[{g.m}, {g.k}] @ [{g.k}, {g.n}]", g.count, f"{g.gflop:.3g}",
          *(f"{g.gflops(name):.0f}" for name in libraries),
          f"{g.seconds['PyTorch'] / g.seconds['JAX']:.2f}x"] for g in gemms])
    ms = {name: 1e3 * sum(g.seconds[name] * g.count for g in gemms) for name in libraries}
    lines = [table, "",
             "Together, per forward: " + ", ".join(f"{name} {value:.1f} ms"
                                                   for name, value in ms.items()) + "."]
    if forward is not None:
        share = sum(g.gflop for g in gemms) / forward.gflop
        swaps = []
        for name in libraries[1:]:
            swapped = forward.jax_ms - ms["JAX"] + ms[name]
            swaps.append(f"with {name}'s times for them in place of JAX's, about "
                         f"{swapped:.1f} ms, {forward.torch_ms / swapped:.2f}x PyTorch's")
        lines[-1] += (f" They are {share:.0%} of our forward's FLOPs. The forward above takes "
                      f"{forward.jax_ms:.1f} ms; " + "; ".join(swaps) + ".")
    return "\n".join(lines)


def ops_table(row: Row, top: int = 8) -> str:
    """Our forward's ``top`` operations by thread time, and the share of all operations that
    hold a matmul."""
    total = sum(op.ms for op in row.ops)
    table = report.markdown_table(
        ["XLA operation", "from", "result", "holds a matmul", "thread ms", "share"],
        [[f"`{op.name}`", f"`{op.source}`", f"`{op.shape.split('{')[0]}`",
          "yes" if op.matmul else "no",
          f"{op.ms:.1f}", f"{op.ms / total:.0%}"] for op in row.ops[:top]])
    matmul = sum(op.ms for op in row.ops if op.matmul) / total
    return "\n".join([
        table, "",
        f"All {len(row.ops)} operations: {total:.0f} ms of thread time per forward "
        f"({row.jax_ms:.0f} ms of wall time on {hardware.usable_cores()} cores); those "
        f"holding a matmul {matmul:.0%}, the rest (elementwise, softmax, transposes) "
        f"{1 - matmul:.0%}."])


def run(size: str = "full", runs: int = measurement.MIN_RUNS, log=print, *,
        sizes: Sizes | None = None) -> report.Section:
    """Measures every (scale, batch) of ``SIZES[size]`` (or ``sizes``); returns the
    BENCHMARKS.md section."""
    sizes = sizes or SIZES[size]
    header = hardware.machine(torch_threads=True)
    scale, largest = min(sizes.scales), max(sizes.batches)
    rows = []
    for row_scale in sizes.scales:
        for batch in sizes.batches:
            row = measure(sizes, row_scale, batch, runs, profile=(
                (row_scale, batch) == (scale, largest) and hardware.accelerator() is None))
            log(f"scale {row_scale} batch {batch}: JAX {row.jax_ms:.1f} ms, "
                f"PyTorch {row.torch_ms:.1f} ms; peak JAX {row.jax_peak:.0f}, PyTorch "
                f"{row.torch_peak:.0f} GFLOP/s")
            rows.append(row)
    gemms = measure_gemms(sizes, scale, largest, runs)
    log("GEMMs: " + "; ".join(f"{g.name} " + ", ".join(
        f"{name} {g.gflops(name):.0f}" for name in g.seconds) for g in gemms))
    forward = next((r for r in rows if (r.scale, r.batch) == (scale, largest)), None)

    table = report.markdown_table(
        ["scale", "tokens", "batch", "GFLOP (JAX, PyTorch)", "JAX ms", "PyTorch ms",
         "PyTorch / JAX",
         "peak GFLOP/s (JAX, PyTorch)", "JAX GFLOP/s", "JAX % of peak", "PyTorch GFLOP/s",
         "PyTorch % of peak", "JAX compile s", "max rel diff"],
        [[r.scale, r.tokens, r.batch, f"{r.gflop:.3g}, {r.reference_gflop:.3g}",
          f"{r.jax_ms:.1f}",
          f"{r.torch_ms:.1f}", f"{r.speedup:.2f}x", f"{r.jax_peak:.0f}, {r.torch_peak:.0f}",
          f"{r.jax_gflops:.0f}", f"{100 * r.jax_gflops / r.peak:.0f}%",
          f"{r.torch_gflops:.0f}", f"{100 * r.torch_gflops / r.peak:.0f}%",
          f"{r.compile_s:.1f}", f"{r.max_rel_diff:.1e}"] for r in rows])
    targets = []
    for r in (r for r in rows if r.batch == largest):
        fraction = r.jax_gflops / r.peak
        targets.append(
            f"- scale {r.scale}, batch {largest}: at least as fast as PyTorch "
            f"({r.speedup:.2f}x): {report.verdict(r.speedup >= TARGET_SPEEDUP)}; at least "
            f"{TARGET_PEAK:.0%} of the peak ({fraction:.0%}): "
            f"{report.verdict(fraction >= TARGET_PEAK)}")
    body = "\n".join([
        f"`python -m tokenpacker_jax.bench projector` (`--sizes={size}`). Machine: {header}.",
        "",
        f"x_last [B, {sizes.grid ** 2}, {sizes.width}], x_multi [B, {sizes.grid ** 2}, "
        f"{sizes.width * sizes.levels}] -> [B, M, {sizes.out_dim}], float32. Median of "
        f"{runs} runs after warm-up; in each round JAX, PyTorch and the two peak matmuls run "
        "once, in turns; JAX compiled beforehand (compile time apart). PyTorch: "
        "docs/reference.md §3 in eager torch (`bench/torch_tokenpacker.py`) with the same "
        "weights and inputs (max rel diff: the largest difference of the two outputs over "
        "the largest output). GFLOP: analytic (`flops.py`, matmuls), what each side computes: ours "
        "projects the region attention's keys and values on the query side (R rows, not "
        "R*s*s), the reference projects every patch. Peak: a float32 "
        f"[{sizes.peak_n}, {sizes.peak_n}] matmul in JAX and in PyTorch, timed in the same "
        "rounds as the row; % of peak is against the faster of the two.",
        "",
        table,
        "",
        "Targets:",
        *targets,
        "",
        f"The large matmuls of scale {scale}, batch {largest}, alone: float32, median of "
        f"{runs} on random [m, k] and [k, n] matrices, JAX compiled "
        "(`jnp.matmul`) and PyTorch `torch.matmul` in turns"
        + (", then NumPy `np.matmul` on its own (its BLAS, " + hardware.numpy_blas()
           + ", keeps its threads spinning after a call, which slows the next library)"
           if "NumPy" in gemms[0].seconds else "") + ".",
        "",
        gemm_table(gemms, forward),
        *(["", f"Where our forward at scale {scale}, batch {largest} spends its time: thread "
                "time per operation of the compiled program (`bench/op_profile.py`, a "
                f"`jax.profiler` trace of {runs} calls). XLA:CPU runs independent operations "
                "at once, and an operation's time includes its waits for the other threads, "
                "so a small one beside a large one counts long.",
           "", ops_table(forward)] if forward is not None and forward.ops else []),
    ])
    return report.section("projector", "Projector forward: JAX against PyTorch", body)
