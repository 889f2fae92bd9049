"""The projector in the reference PyTorch layout (TokenPacker / LLaVA-1.5), both directions.

The reference stores the projector under ``model.mm_projector.`` (docs/reference.md §3.3):
the stage-1 file ``mm_projector.bin`` holds just those keys, full checkpoints hold them
beside the LLM's.
One ``Rule`` table per projector serves import and export. PyTorch's packed attention
``in_proj_weight`` [3D, D] / ``in_proj_bias`` [3D] is one tensor for our three q/k/v
kernels: each of their rules takes its third on import, and export concatenates the thirds
back in table order (q, k, v).

Supported: ``tokenpacker`` (the TokenPacker reference) and ``mlp2x_gelu`` (LLaVA-1.5's
``mm_projector.0`` / ``.2``), told apart by their keys.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from tokenpacker_jax.convert import checkpoint_io
from tokenpacker_jax.convert.mapping import (
    FLAT,
    IDENTITY,
    LINEAR,
    LINEAR_IN2,
    Rule,
    Transform,
    export_params,
    import_params,
)
from tokenpacker_jax.models.tokenpacker import TokenPacker
from tokenpacker_jax.user_error import CheckpointError

PREFIX = "model.mm_projector."


def _packed_part(index: int, count: int, inner: Transform) -> Transform:
    """Part ``index`` of ``count`` equal row blocks of a packed PyTorch tensor, converted by
    ``inner``; ``to_torch`` gives the block alone (``_merge_packed`` joins the blocks)."""

    def to_ours(value, shape):
        if value.shape[0] % count:
            raise ValueError(f"packed tensor {value.shape} does not split into {count} parts")
        return inner.to_ours(np.split(value, count, axis=0)[index], shape)

    return Transform(f"packed{index}of{count}.{inner.name}", to_ours, inner.to_torch)


def _linear_rules(ours: str, torch: str, bias: bool = True) -> list[Rule]:
    rules = [Rule((ours, "kernel"), f"{torch}.weight", LINEAR)]
    if bias:
        rules.append(Rule((ours, "bias"), f"{torch}.bias", IDENTITY))
    return rules


def _norm_rules(ours: str, torch: str) -> list[Rule]:
    return [Rule((ours, "scale"), f"{torch}.weight"), Rule((ours, "bias"), f"{torch}.bias")]


def _tokenpacker_table() -> list[Rule]:
    table = _linear_rules("q_proj_1", "q_proj_1", bias=False)
    for part in ("k", "v"):
        table += _linear_rules(f"{part}_proj_1_0", f"{part}_proj_1.0")
        table += _linear_rules(f"{part}_proj_1_2", f"{part}_proj_1.2")
    for part in ("q", "k", "v"):
        table += _norm_rules(f"ln_{part}_1", f"ln_{part}_1")
    for index, part in enumerate(("q", "k", "v")):
        table.append(Rule(("clip_attn", f"{part}_proj", "kernel"), "clip_attn.in_proj_weight",
                          _packed_part(index, 3, LINEAR)))
        table.append(Rule(("clip_attn", f"{part}_proj", "bias"), "clip_attn.in_proj_bias",
                          _packed_part(index, 3, FLAT)))
    table.append(Rule(("clip_attn", "out_proj", "kernel"), "clip_attn.out_proj.weight",
                      LINEAR_IN2))
    table.append(Rule(("clip_attn", "out_proj", "bias"), "clip_attn.out_proj.bias"))
    table += _linear_rules("mlp_0", "mlp.0") + _linear_rules("mlp_2", "mlp.2")
    return table


# projector name -> its table; torch keys without the "model.mm_projector." prefix.
REFERENCE_TABLES: dict[str, list[Rule]] = {
    "tokenpacker": _tokenpacker_table(),
    "mlp2x_gelu": _linear_rules("mlp_0", "0") + _linear_rules("mlp_2", "2"),
}


def strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """The projector's entries of a state dict, keys without ``model.mm_projector.``.

    If any key carries the prefix, only those keys are kept (a full checkpoint holds the
    LLM's keys beside them); otherwise every key is taken as a projector key.
    """
    if any(key.startswith(PREFIX) for key in state):
        return {key[len(PREFIX):]: value for key, value in state.items()
                if key.startswith(PREFIX)}
    return dict(state)


def detect_projector(keys: Iterable[str]) -> str:
    """Which reference projector a set of (unprefixed) keys belongs to."""
    keys = set(keys)
    for name, table in REFERENCE_TABLES.items():
        if {rule.torch_key for rule in table} == keys:
            return name
    closest = min(REFERENCE_TABLES, key=lambda n: len(
        keys ^ {rule.torch_key for rule in REFERENCE_TABLES[n]}))
    expected = {rule.torch_key for rule in REFERENCE_TABLES[closest]}
    raise CheckpointError(f"not a reference projector state dict; closest is {closest!r}: missing "
                          f"{sorted(expected - keys)}, unexpected {sorted(keys - expected)}")


def _abstract_params(name: str, state: Mapping[str, np.ndarray], num_heads: int) -> dict:
    """Target shapes of our parameters, from the checkpoint's own shapes."""
    shape = {key: tuple(np.shape(value)) for key, value in state.items()}
    struct = jax.ShapeDtypeStruct
    if name == "mlp2x_gelu":
        (hidden, width), (out, _) = shape["0.weight"], shape["2.weight"]
        return {"mlp_0": {"kernel": struct((width, hidden), jnp.float32),
                          "bias": struct((hidden,), jnp.float32)},
                "mlp_2": {"kernel": struct((hidden, out), jnp.float32),
                          "bias": struct((out,), jnp.float32)}}
    dim, width = shape["q_proj_1.weight"]
    multi_width = shape["k_proj_1.0.weight"][1]
    out_dim = shape["mlp.0.weight"][0]
    if dim % num_heads:
        raise ValueError(f"reference projector: width {dim} is not divisible by "
                         f"num_heads {num_heads}")
    # Parameter shapes do not depend on the grid or the scale: one 2x2 grid will do.
    module = TokenPacker(scale_factor=1, out_dim=out_dim, embed_dim=dim, num_heads=num_heads)
    abstract = jax.eval_shape(module.init, jax.random.key(0),
                              struct((1, 4, width), jnp.float32),
                              struct((1, 4, multi_width), jnp.float32))
    return abstract["params"]


def projector_params_from_reference(state_dict: Mapping[str, Any], *, num_heads: int = 8,
                                    dtype: Any = None, shardings: Any = None) -> dict:
    """Our projector params from a reference state dict.

    Args:
      state_dict: {key: numpy array or torch tensor}, keys with or without the
        ``model.mm_projector.`` prefix (other keys of a full checkpoint are ignored).
      num_heads: attention heads (the weights do not say; the reference uses 8).
      dtype: cast every parameter to this dtype (default float32).
      shardings: optional tree of shardings like the params (see ``mapping.import_params``).
    Returns:
      The params tree (without the ``{"params": ...}`` wrapper) of TokenPacker or MLP2xGelu.
    """
    state = {key: checkpoint_io.torch_to_numpy(value)
             for key, value in strip_prefix(state_dict).items()}
    name = detect_projector(state)
    abstract = _abstract_params(name, state, num_heads)
    return import_params(REFERENCE_TABLES[name], state, abstract, num_layers=0,
                         where=f"reference {name} projector", dtype=dtype,
                         shardings=shardings)


def _merge_packed(pairs: Iterator[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Joins the per-rule blocks that share one PyTorch key (in table order) on axis 0."""
    blocks: dict[str, list[np.ndarray]] = {}
    for key, value in pairs:
        blocks.setdefault(key, []).append(value)
    return {key: parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            for key, parts in blocks.items()}


def projector_params_to_reference(params: Any, *, name: str | None = None,
                                  dtype: Any = None, prefix: str = PREFIX
                                  ) -> dict[str, np.ndarray]:
    """{``model.mm_projector.`` + key: numpy array} in the reference layout.

    ``params`` may be boxed or plain, with or without the ``{"params": ...}`` wrapper.
    ``name`` defaults to what the tree's parameters say (TokenPacker or mlp2x_gelu).
    """
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    if name is None:
        name = "tokenpacker" if "clip_attn" in params else "mlp2x_gelu"
    if name not in REFERENCE_TABLES:
        raise ValueError(f"no reference layout for projector {name!r}; "
                         f"known: {sorted(REFERENCE_TABLES)}")
    exported = _merge_packed(export_params(REFERENCE_TABLES[name], params, num_layers=0,
                                           dtype=dtype))
    return {prefix + key: np.ascontiguousarray(value) for key, value in exported.items()}


def load_reference_projector(path: str | os.PathLike, **kwargs) -> dict:
    """Our params from ``mm_projector.bin`` (or any ``.bin`` / ``.pt`` holding the projector,
    read with ``torch.load(weights_only=True)``) or a ``.safetensors`` file.
    Keyword arguments go to ``projector_params_from_reference``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = checkpoint_io.load_torch_file(path)
    return projector_params_from_reference(state, **kwargs)


def save_reference_projector(params: Any, path: str | os.PathLike, **kwargs) -> None:
    """Writes the projector in the reference layout: ``.safetensors`` by suffix, otherwise
    a ``torch.save`` state dict (what the reference's ``mm_projector.bin`` is).
    Keyword arguments go to ``projector_params_to_reference``."""
    path = Path(path)
    state = projector_params_to_reference(params, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, path, metadata={"format": "pt"})
        return
    import torch  # noqa: PLC0415 (torch: only .bin files need it, and it is optional)

    def to_torch(value: np.ndarray) -> torch.Tensor:
        if value.dtype.name == "bfloat16":  # NumPy cannot hand bfloat16 to torch directly
            return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(value))

    torch.save({key: to_torch(value) for key, value in state.items()}, path)
