"""docs/reference.md §3 in PyTorch: the reference TokenPacker projector as a ``torch.nn.Module``.

Written from docs/reference.md with torch's own ``nn.MultiheadAttention`` and
``F.interpolate``, sizes as arguments (the reference hard-codes CLIP-L/14-336). Its
``state_dict`` has exactly the reference's keys (without the ``model.mm_projector.``
prefix), so it loads what ``reference.projector_params_to_reference`` exports. Used by the
parity tests and by the projector benchmark (``python -m tokenpacker_jax.bench projector``)
as the PyTorch side.
Needs torch (requirements-test.txt).

    x [B, N, W], x_multi [B, N, W * levels]  ->  tokens [B, M, out_dim],
                                                  attention [B, M, heads, s*s]

N = grid^2 patches, M = (grid / scale)^2; attention slot k = ki * s + kj as in docs/algorithm.md §4.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokenpacker_jax.convert import reference


class TorchTokenPacker(torch.nn.Module):
    """docs/reference.md §3 in PyTorch (eager, float32 or float64 after ``.double()``)."""

    def __init__(self, width: int, levels: int, dim: int, heads: int, out_dim: int,
                 scale: int):
        super().__init__()
        self.scale = scale
        self.q_proj_1 = torch.nn.Linear(width, dim, bias=False)
        self.k_proj_1 = torch.nn.Sequential(torch.nn.Linear(width * levels, dim),
                                            torch.nn.GELU(), torch.nn.Linear(dim, dim))
        self.v_proj_1 = torch.nn.Sequential(torch.nn.Linear(width * levels, dim),
                                            torch.nn.GELU(), torch.nn.Linear(dim, dim))
        self.ln_q_1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.ln_k_1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.ln_v_1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.clip_attn = torch.nn.MultiheadAttention(dim, heads)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, out_dim), torch.nn.GELU(),
                                       torch.nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor, x_multi: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_tokens, width = x.shape
        grid = math.isqrt(num_tokens)
        s, out = self.scale, grid // self.scale
        keys = self.ln_k_1(self.k_proj_1(x_multi))
        values = self.ln_v_1(self.v_proj_1(x_multi))
        image = x.reshape(batch, grid, grid, width).permute(0, 3, 1, 2)
        points = F.interpolate(image, size=(out, out), mode="bilinear", align_corners=False)
        points = points.permute(0, 2, 3, 1).reshape(batch, out * out, width)
        query = self.ln_q_1(self.q_proj_1(points))

        def regions(t):  # [B, N, D] -> [s*s, B*M, D], slot ki*s + kj, sequence first
            t = t.reshape(batch, out, s, out, s, -1).permute(2, 4, 0, 1, 3, 5)
            return t.reshape(s * s, batch * out * out, -1)

        attended, weights = self.clip_attn(query.reshape(1, batch * out * out, -1),
                                           regions(keys), regions(values),
                                           average_attn_weights=False)
        attended = attended.reshape(batch, out * out, -1)
        heads = weights.shape[1]
        return self.mlp(attended), weights.reshape(batch, out * out, heads, s * s)


def from_params(params: Mapping[str, Any], *, num_heads: int, scale: int, levels: int,
                dtype: torch.dtype = torch.float32) -> TorchTokenPacker:
    """A TorchTokenPacker (eval mode) holding our TokenPacker ``params`` (plain tree, without
    the ``{"params": ...}`` wrapper), via the reference export; sizes read from the weights."""
    state = {key.removeprefix(reference.PREFIX): torch.from_numpy(np.array(value))
             for key, value in reference.projector_params_to_reference(
                 params, name="tokenpacker").items()}
    dim, width = state["q_proj_1.weight"].shape
    out_dim = state["mlp.0.weight"].shape[0]
    module = TorchTokenPacker(width, levels, dim, num_heads, out_dim, scale)
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return module.to(dtype).eval()
