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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokenpacker_jax import flops
from tokenpacker_jax.bench import hardware, measurement, report
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


def peak_matmuls(n: int) -> dict[str, Callable[[], Any]]:
    """Calls of a float32 [n, n] @ [n, n] in JAX (``"jax peak"``) and in PyTorch
    (``"torch peak"``), 2 n^3 FLOP each."""
    import torch  # noqa: PLC0415 (torch: optional, the PyTorch side of a comparison)

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    matmul, _ = measurement.compile_jit(jnp.matmul, ja, jb)
    device = hardware.torch_device()
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    return {"jax peak": lambda: matmul(ja, jb), "torch peak": lambda: torch.matmul(ta, tb)}


def measure(sizes: Sizes, scale: int, batch: int, runs: int, seed: int = 0) -> Row:
    """Ours and PyTorch's forward at one (scale, batch), same weights and inputs, timed in
    turns with the two peak matmuls."""
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
               max_rel_diff=float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))))


def run(size: str = "full", runs: int = measurement.MIN_RUNS, log=print, *,
        sizes: Sizes | None = None) -> report.Section:
    """Measures every (scale, batch) of ``SIZES[size]`` (or ``sizes``); returns the
    BENCHMARKS.md section."""
    sizes = sizes or SIZES[size]
    header = hardware.machine(torch_threads=True)
    rows = []
    for scale in sizes.scales:
        for batch in sizes.batches:
            row = measure(sizes, scale, batch, runs)
            log(f"scale {scale} batch {batch}: JAX {row.jax_ms:.1f} ms, "
                f"PyTorch {row.torch_ms:.1f} ms; peak JAX {row.jax_peak:.0f}, PyTorch "
                f"{row.torch_peak:.0f} GFLOP/s")
            rows.append(row)

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
    largest = max(sizes.batches)
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
    ])
    return report.section("projector", "Projector forward: JAX against PyTorch", body)
