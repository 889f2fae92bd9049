"""QLoRA's quantised base, ours (``models/lora.py``) against qwix's ``LoraProvider``: the
measurement behind keeping our own (BENCHMARKS.md "LoRA and QLoRA").

    python -m tokenpacker_jax.bench.qlora [--sizes=full|tiny] [--runs=5]

One LLaMA-layout decoder (our ``Decoder``, scanned layers) with random float weights gets
rank-16 adapters on its MLP projections (gate, up, down: the targets both sides can adapt)
and their base stored as int8 or NF4, one absmax scale per 64 input entries, in two ways:
ours (the layers' ``lora`` config), and qwix's ``apply_lora_to_model`` over the same plain
decoder, its ``dot_general`` calls intercepted, the kernels quantised with qwix's own
quantiser. Both take the same adapters (B random, so the adapters act). Per row:

- logits [B, T, vocab] against the float base with the same adapters (relative RMS), and
  the largest difference between the two sides' logits;
- the frozen base's bytes as stored (codes and scales);
- one step (loss, gradients of the adapters) compiled and timed: median of ``--runs``,
  the two sides in turns (``measurement.time_interleaved``);
- how many of the seven LoRA targets (q, k, v, o, gate, up, down) each side adapts when
  asked for all seven.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import traverse_util
from qwix._src.core import qarray
from qwix._src.providers import ptq

from tokenpacker_jax import user_error
from tokenpacker_jax.bench import hardware, measurement, report
from tokenpacker_jax.models import lora
from tokenpacker_jax.models.decoder import Decoder
from tokenpacker_jax.models.decoder_config import DecoderConfig

MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
RANK, ALPHA, BLOCK = 16, 32.0, 64


@dataclasses.dataclass(frozen=True)
class Sizes:
    width: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    vocab: int
    batch: int
    length: int


SIZES = {"full": Sizes(1024, 2816, 4, 8, 4096, 2, 256),
         "tiny": Sizes(128, 256, 2, 2, 256, 1, 16)}


def decoder_config(sizes: Sizes) -> DecoderConfig:
    return DecoderConfig(vocab_size=sizes.vocab, width=sizes.width, mlp_dim=sizes.mlp_dim,
                         num_layers=sizes.num_layers, num_heads=sizes.num_heads,
                         num_kv_heads=sizes.num_heads, head_dim=sizes.width // sizes.num_heads)


def _regex(targets: Sequence[str]) -> str:
    return f".*({'|'.join(targets)})$"


def qwix_decoder(config: DecoderConfig, quantize: str | None,
                 targets: Sequence[str] = MLP_TARGETS) -> nn.Module:
    """The plain decoder under qwix's LoRA provider (``quantize``: its weight qtype, None
    for a float base)."""
    qtype = {"int8": jnp.int8, "nf4": "nf4", None: None}[quantize]
    provider = qwix.LoraProvider(module_path=_regex(targets), rank=RANK, alpha=ALPHA,
                                 weight_qtype=qtype, tile_size=BLOCK if qtype else None)
    return qwix.apply_lora_to_model(Decoder(config), provider)


def qwix_params(model: nn.Module, float_params: dict, adapters: dict, inputs) -> dict:
    """qwix's parameter tree: ``float_params`` with the intercepted kernels quantised (one
    layer at a time: qwix's ``quantize_params`` sees the scanned [layers, in, out] kernels
    with the 2-D tiling of one layer and refuses them) and ``adapters`` as its
    ``kernel_lora_a`` / ``kernel_lora_b``."""
    abstract = traverse_util.flatten_dict(
        jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"])
    flat = {}
    for path, value in traverse_util.flatten_dict(float_params).items():
        like = abstract[path]
        if isinstance(like, ptq.WithAux):
            value = like.replace(array=jax.vmap(lambda w, how=like.how:
                                                qarray.quantize(w, how))(value))
        flat[path] = value
    for path, value in traverse_util.flatten_dict(adapters).items():
        flat[path[:-1] + (f"kernel_{path[-1]}",)] = value
    return traverse_util.unflatten_dict(flat)


def our_decoder(config: DecoderConfig, quantize: str,
                targets: Sequence[str] = MLP_TARGETS) -> Decoder:
    return Decoder(dataclasses.replace(config, lora=lora.LoraConfig(
        rank=RANK, alpha=ALPHA, targets=tuple(targets), quantize=quantize, block_size=BLOCK)))


def our_params(model: Decoder, float_params: dict, adapters: dict, inputs) -> dict:
    target = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"])
    flat = traverse_util.flatten_dict(lora.adapt(float_params, target, model.config.lora))
    flat.update(traverse_util.flatten_dict(adapters))
    return traverse_util.unflatten_dict(flat)


def random_adapters(model: Decoder, inputs, seed: int = 1) -> dict:
    """lora_a / lora_b of ``model`` (our layout, which qwix's matches for 2-D kernels), B
    non-zero."""
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"])
    rng = np.random.default_rng(seed)
    flat = {path: jnp.asarray(rng.normal(0, 0.02 if path[-1] == "lora_a" else 0.05, leaf.shape),
                              jnp.float32)
            for path, leaf in traverse_util.flatten_dict(abstract).items()
            if lora.is_adapter(path)}
    return traverse_util.unflatten_dict(flat)


def adapted_targets(model: nn.Module, inputs) -> int:
    """How many distinct layers of ``model`` carry adapters (ours or qwix's)."""
    abstract = traverse_util.flatten_dict(
        jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"])
    return len({path[-2] for path in abstract if path[-1] in ("lora_a", "kernel_lora_a")})


def stored_bytes(params: dict) -> int:
    """Bytes of the quantised bases as stored: our codes + scales, qwix's qvalue + scale
    (4-bit values at half a byte)."""
    total = 0
    for path, leaf in traverse_util.flatten_dict(
            params, is_leaf=lambda _, x: isinstance(x, ptq.WithAux)).items():
        if isinstance(leaf, ptq.WithAux):
            q = leaf.array
            total += q.qvalue.size * jnp.iinfo(q.qvalue.dtype).bits // 8 + q.scale.nbytes
        elif path[-1] in (lora.CODES, lora.SCALES):
            total += leaf.nbytes
    return total


def split_adapters(params: dict) -> tuple[dict, dict]:
    flat = traverse_util.flatten_dict(params, is_leaf=lambda _, x: isinstance(x, ptq.WithAux))
    trained = {p: v for p, v in flat.items() if "lora_" in p[-1]}
    frozen = {p: v for p, v in flat.items() if "lora_" not in p[-1]}
    return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen)


def adapter_step(model: nn.Module):
    """(trained, frozen, ids, mask) -> (loss, gradients of the adapters)."""

    def loss(trained, frozen, ids, mask):
        params = traverse_util.unflatten_dict({**traverse_util.flatten_dict(
            frozen, is_leaf=lambda _, x: isinstance(x, ptq.WithAux)),
            **traverse_util.flatten_dict(trained)})
        logits = model.apply({"params": params}, ids, mask)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    return jax.value_and_grad(loss)


def relative_rms(a: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - reference) ** 2) / np.mean(reference ** 2)))


@dataclasses.dataclass
class Sides:
    """Both sides of one comparison, built on the same float weights and adapters."""

    inputs: tuple[jax.Array, jax.Array]  # ids, mask [B, T]
    reference: np.ndarray  # logits [B, T, vocab] of the float base with the adapters
    models: dict[str, tuple[nn.Module, dict]]  # {"ours" | "qwix": (model, params)}

    def logits(self, name: str) -> np.ndarray:
        model, params = self.models[name]
        return np.asarray(jax.jit(model.apply)({"params": params}, *self.inputs))


def build_sides(sizes: Sizes, quantize: str, targets: Sequence[str] = MLP_TARGETS) -> Sides:
    config = decoder_config(sizes)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, sizes.vocab, (sizes.batch, sizes.length)), jnp.int32)
    inputs = (ids, jnp.ones_like(ids))
    float_params = measurement.random_params(Decoder(config), *inputs)
    ours = our_decoder(config, quantize, targets)
    adapters = random_adapters(ours, inputs)
    float_model = our_decoder(config, "none", targets)
    reference = np.asarray(float_model.apply(
        {"params": our_params(float_model, float_params, adapters, inputs)}, *inputs))
    theirs = qwix_decoder(config, quantize, targets)
    return Sides(inputs, reference, {
        "ours": (ours, our_params(ours, float_params, adapters, inputs)),
        "qwix": (theirs, qwix_params(theirs, float_params, adapters, inputs))})


def compare(sizes: Sizes, quantize: str, runs: int) -> list[list[str]]:
    """Table rows (ours, qwix) for one storage of the base."""
    sides = build_sides(sizes, quantize)
    logits, calls, compiled = {}, {}, {}
    for name, (model, params) in sides.models.items():
        logits[name] = sides.logits(name)
        trained, frozen = split_adapters(params)
        program, seconds = measurement.compile_jit(adapter_step(model), trained, frozen,
                                              *sides.inputs)
        compiled[name] = (seconds, measurement.program_bytes(program))
        calls[name] = (lambda program=program, args=(trained, frozen, *sides.inputs):
                       program(*args))
    timings = measurement.time_interleaved(calls, runs=runs)
    gap = float(np.abs(logits["ours"] - logits["qwix"]).max())
    config = decoder_config(sizes)
    all_seven = {"ours": adapted_targets(our_decoder(config, quantize, lora.DECODER_TARGETS),
                                         sides.inputs),
                 "qwix": adapted_targets(qwix_decoder(config, quantize, lora.DECODER_TARGETS),
                                         sides.inputs)}
    rows = []
    for name, (_, params) in sides.models.items():
        seconds, program = compiled[name]
        rows.append([quantize, name, f"{relative_rms(logits[name], sides.reference):.4f}",
                     f"{gap:.1e}", f"{stored_bytes(params) / 2**20:.2f}",
                     f"{timings[name].ms:.1f}", f"{seconds:.1f}", f"{program / 2**20:.1f}",
                     f"{all_seven[name]} of 7"])
    return rows


HEADERS = ("base", "side", "logits vs float base (rel. RMS)", "largest ours - qwix difference",
           "base stored (MiB)", "adapter step (ms)", "compile (s)", "program (MiB)",
           "targets adapted when asked for all 7")


def run(sizes: str = "full", runs: int = measurement.MIN_RUNS) -> report.Section:
    chosen = SIZES[sizes]
    rows = [row for quantize in ("int8", "nf4") for row in compare(chosen, quantize, runs)]
    body = (f"{hardware.machine()}; decoder width {chosen.width}, MLP {chosen.mlp_dim}, "
            f"{chosen.num_layers} layers, vocabulary {chosen.vocab}, batch {chosen.batch} x "
            f"{chosen.length} tokens, rank {RANK}, block {BLOCK}; median of {runs}.\n\n"
            + report.markdown_table(HEADERS, rows))
    return report.section("qlora", "QLoRA: ours against qwix", body)


def main(argv: Sequence[str] | None = None) -> None:
    parser = user_error.ArgumentParser(prog="python -m tokenpacker_jax.bench.qlora",
                                       description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=tuple(SIZES), default="full")
    parser.add_argument("--runs", type=int, default=measurement.MIN_RUNS)
    args = parser.parse_args(argv)
    print(run(args.sizes, args.runs).markdown())


if __name__ == "__main__":
    user_error.run_argparse(main, "tokenpacker_jax.bench.qlora")
