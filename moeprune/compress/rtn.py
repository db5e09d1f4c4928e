"""Round-to-nearest arithmetic shared by every quantization method: symmetric scales (amax / qmax per group along
the input dim), quantize-dequantize, and the routed experts' weights as (E, out, in) views. GPTQ (gptq.py) stores
its codes with exactly these scales, so the one pack-quantized writer (quantize.py) serves both."""

from __future__ import annotations

import torch

from moeprune.compress.quantize_plan import CHANNEL

__all__ = ["qmax", "scale_floor", "group_scale", "fake_quantize", "expert_views"]


def scale_floor(dtype: torch.dtype) -> float:
    """The smallest scale, nonzero in `dtype` (float16 flushes 1e-12 to 0, and 0/0 would be NaN): an all-zero
    group (e.g. a padded neuron) quantizes to exact zeros."""
    return max(1e-12, torch.finfo(dtype).tiny) if dtype.is_floating_point else 1e-12


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def group_scale(w: torch.Tensor, *, bits: int, group_size: int) -> torch.Tensor:
    """Symmetric scale per group of `group_size` along the last dim: amax / qmax (..., in/g), float32.

    `group_size` CHANNEL means one group per row (..., 1). An all-zero group (e.g. a padded neuron) gets the
    smallest scale that stays nonzero in `w`'s dtype (float16 flushes 1e-12 to 0, and 0/0 would be NaN), so it
    quantizes to exact zeros."""
    group_size = w.shape[-1] if group_size == CHANNEL else group_size
    groups = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    return (groups.abs().amax(-1) / qmax(bits)).clamp(min=scale_floor(w.dtype))


def fake_quantize(w: torch.Tensor, *, bits: int, group_size: int) -> torch.Tensor:
    """Quantize-dequantize along the last dim; with scale = amax/qmax the result re-quantizes to itself."""
    scale = group_scale(w, bits=bits, group_size=group_size).to(w.dtype).float()  # (..., in/g)
    group_size = w.shape[-1] if group_size == CHANNEL else group_size
    groups = w.detach().float().reshape(*w.shape[:-1], -1, group_size)
    q = torch.clamp(torch.round(groups / scale.unsqueeze(-1)), -qmax(bits) - 1, qmax(bits))
    return (q * scale.unsqueeze(-1)).reshape(w.shape).to(w.dtype)


def expert_views(adapter, layer) -> list[torch.Tensor]:
    """The fused expert weights of one layer as (E, out, in) views (transposed layouts are viewed back)."""
    layout = adapter.spec.layout
    views = []
    for name in (layout.gate_up, layout.down):
        t = getattr(layer.experts, name)
        views.append(t.data.transpose(-1, -2) if layout.transposed else t.data)
    return views
