"""Per-head decay rates of lightning attention (DESIGN.md section 3.1).

Rates follow the ALiBi construction and are scaled down linearly with depth, so
early layers forget fast and late layers keep long context. They are always
computed from the config, in fp32, and never stored in checkpoints.
"""

import math

import torch


def _power_of_two_slopes(n: int) -> list[float]:
    # base_h = 2^(-8(h+1)/n)
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]


def alibi_base_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes, including the fallback for head counts that are not powers of two."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if num_heads & (num_heads - 1) == 0:
        return _power_of_two_slopes(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = _power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return _power_of_two_slopes(closest) + extra


def build_slopes(num_heads: int, layer_idx: int = 0, num_layers: int = 1, device=None) -> torch.Tensor:
    """fp32 decay rates ``s_h`` for one layer: ``base_h * (1 - l/(L-1) + 1e-5)``.

    ``layer_idx`` is the global 0-based index over all layers (softmax layers count).
    """
    if not 0 <= layer_idx < max(num_layers, 1):
        raise ValueError(f"layer_idx {layer_idx} out of range for {num_layers} layers")
    depth_factor = 1.0 + 1e-5 if num_layers <= 1 else 1.0 - layer_idx / (num_layers - 1) + 1e-5
    # Products in Python (float64), rounded once to fp32. Made on the CPU unless a device is given,
    # whatever the default device: a model instantiated under torch.device("meta") gets real rates.
    rates = [base * depth_factor for base in alibi_base_slopes(num_heads)]
    return torch.tensor(rates, dtype=torch.float32, device="cpu" if device is None else device)
