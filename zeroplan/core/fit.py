"""One rule for "fits": a predicted peak fits when it leaves `headroom` of the GPU free.

`recommend`, `estimate` and `validate` all judge with it (default DEFAULT_HEADROOM, `--headroom`
on each), so the same plan gets the same verdict from every command. The headroom is kept for what
the model does not see: fragmentation beyond the replayed allocator, other processes' contexts, a
longer sample than planned."""

from __future__ import annotations

from zeroplan.core.errors import InvalidInput

DEFAULT_HEADROOM = 0.05


def usable_bytes(capacity_bytes: int, headroom: float) -> int:
    """The GPU memory a plan may use: the capacity less the headroom fraction."""
    if not 0 <= headroom < 0.9:
        raise InvalidInput(f"--headroom must be a fraction from 0 to 0.9, got {headroom}")
    return int(capacity_bytes * (1 - headroom))


def fit_verdict(peak_bytes: int, capacity_bytes: int, headroom: float) -> dict:
    """Fits or not against the usable memory, with the margin in bytes and as a share of the GPU
    (negative: short by that much)."""
    usable = usable_bytes(capacity_bytes, headroom)
    margin = usable - peak_bytes
    return {"fits": margin >= 0, "verdict": "fits" if margin >= 0 else "does not fit", "headroom": headroom,
            "usable_bytes": usable, "margin_bytes": margin,
            "margin_percent": round(100 * margin / capacity_bytes, 1) if capacity_bytes else 0.0}
