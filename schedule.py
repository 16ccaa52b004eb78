"""The learning-rate schedule of every training loop here: train.py's stages, the synthetic task's stage 0,
and analyze.py's alignment probes (the official recipe's: linear warm-up, then cosine decay to zero)."""
import math


def lr_at(step: int, total: int, peak: float, warmup: float, decay: str = "cosine") -> float:
    """The learning rate of optimiser step `step` (0-based) of `total`: a linear warm-up over the first
    `warmup` share of the steps, then cosine decay to zero, or (decay="constant") the peak."""
    w = max(1, math.ceil(total * warmup))
    if step < w:
        return peak * (step + 1) / w
    if decay == "constant":
        return peak
    if decay != "cosine":
        raise ValueError(f"unknown decay {decay!r}: cosine or constant")
    return 0.5 * peak * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))
