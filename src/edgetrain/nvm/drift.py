"""Weight drift schedules of the LRT paper (v1 section 6, appendix F; docs/adaptation.md).

Every ``period`` = d steps, with N = horizon / d drift events in the paper's 1M-step horizon:

- analog: every stored weight gets N(0, sigma^2), sigma = sigma0 / sqrt(N) (sigma0 = 10), in units of
  the weight range, then is clipped to the format (a weight that drifts for the whole horizon has
  moved by sigma0 weight ranges, r.m.s.);
- digital: every stored bit flips with p = p0 / N (p0 = 10: each bit flips about p0 times in 1M steps).
  ``flip_draw`` (``FLIP_DRAWS``) says how a flip is drawn: ``bernoulli`` (the paper's text: a bit flips
  with probability p) or ``binomial2`` (the authors' code draws ``Binomial(2, p)`` per bit and event
  and flips a bit whose draw is non-zero: probability 1 - (1 - p)^2 ~ 2p, twice the drift the text
  states; use it to compare with their Fig. 1(d) figures).

"Weight range" is the clipping threshold t of the weights (they span [-t, t)): the paper's weights are
in [-1, 1), so its sigma is in weight units. ``weight_range=None`` (the default) takes t from the
array's own format, t = 2^(b-1) LSBs, so every layer drifts by the same fraction of its range as in
the paper; a number gives t in real units, converted to codes with the layer's LSB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from edgetrain.nvm.array import NVMArray

DRIFT_KINDS = ("analog", "digital")
FLIP_DRAWS = ("bernoulli", "binomial2")


@dataclass(frozen=True)
class DriftSpec:
    """A drift schedule: ``kind`` ("analog" | "digital") applied every ``period`` steps; digital bit
    flips drawn as ``flip_draw`` ("bernoulli" | "binomial2", module docstring)."""

    kind: str
    period: int = 10
    sigma0: float = 10.0
    p0: float = 10.0
    weight_range: float | None = None
    horizon: float = 1e6
    flip_draw: str = "bernoulli"

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise ValueError(f"unknown drift kind {self.kind!r}; choose one of: {', '.join(DRIFT_KINDS)}")
        if self.flip_draw not in FLIP_DRAWS:
            raise ValueError(f"unknown flip_draw {self.flip_draw!r}; choose one of: {', '.join(FLIP_DRAWS)}")
        if not isinstance(self.period, int) or isinstance(self.period, bool) or self.period < 1:
            raise ValueError(f"drift period must be an int >= 1 step, got {self.period!r}")
        if not self.horizon >= self.period:
            raise ValueError(f"horizon ({self.horizon}) must be >= period ({self.period})")
        if not (math.isfinite(self.sigma0) and self.sigma0 >= 0):
            raise ValueError(f"sigma0 must be a finite number >= 0, got {self.sigma0!r}")
        if not 0 <= self.p <= 1:
            raise ValueError(f"p0 / (horizon / period) = {self.p} is not a probability; check p0={self.p0!r}")
        if self.weight_range is not None and not self.weight_range > 0:
            raise ValueError(f"weight_range must be > 0 (or None for the array's own range), got {self.weight_range!r}")

    @property
    def events(self) -> float:
        """N = horizon / period: drift events in the paper's horizon."""
        return self.horizon / self.period

    @property
    def sigma(self) -> float:
        """sigma = sigma0 / sqrt(horizon / period), in units of the weight range (analog)."""
        return self.sigma0 / math.sqrt(self.events)

    @property
    def p(self) -> float:
        """p = p0 / (horizon / period): bit-flip probability per bit and event (digital)."""
        return self.p0 / self.events

    @property
    def flip_probability(self) -> float:
        """Probability that a bit flips at one event: p (bernoulli), 1 - (1 - p)^2 (binomial2)."""
        return self.p if self.flip_draw == "bernoulli" else 1.0 - (1.0 - self.p) ** 2

    def sigma_codes(self, array: NVMArray, lsb: float | None = None) -> float:
        """sigma in code units: sigma x t / LSB, with t = 2^(b-1) LSBs when ``weight_range`` is None."""
        if self.weight_range is None:
            return self.sigma * array.fmt.levels_per_sign
        if lsb is None or not lsb > 0:
            raise ValueError(f"weight_range={self.weight_range} needs the weight LSB (> 0) in real units, got {lsb!r}")
        return self.sigma * self.weight_range / lsb

    def apply(self, array: NVMArray, step: int, rng: np.random.Generator, lsb: float | None = None) -> int:
        """Drift ``array`` when ``step % period == 0``; returns the number of cells whose code changed."""
        if step % self.period != 0:
            return 0
        if self.kind == "analog":
            return array.apply_analog_drift(self.sigma_codes(array, lsb), rng)
        return array.apply_digital_drift(self.flip_probability, rng)

    def as_dict(self) -> dict[str, object]:
        """JSON-able description, with the derived sigma, p and per-event flip probability."""
        return {**asdict(self), "sigma": self.sigma, "p": self.p, "flip_probability": self.flip_probability}
