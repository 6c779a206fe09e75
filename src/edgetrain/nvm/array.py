"""A simulated non-volatile weight memory: integer codes, per-cell write counters, energy, faults.

docs/adaptation.md. Pure bookkeeping, no training logic. Every update event is counted under both
write models (``WRITE_MODELS``):

- ``code-change`` (the default everywhere): a digital NVM with program-and-verify (RRAM, PCM, MRAM,
  flash with a write driver that reads first): a *write* is a cell whose stored code changes at an
  update event; a cell whose code stays the same is not programmed and costs nothing;
- ``pulse``: an array that applies every non-zero applied update as a programming pulse whether or
  not the stored level crosses a code boundary (an analog crossbar programmed by outer-product
  pulses). The update rule says how many non-zero update terms each cell received (``pulses``);
  with per-pixel outer-product conv updates this is the LRT paper's *activity* count.

Also: energy = written bits x E_write + read bits x E_read (10.9 / 1.76 pJ per bit by default, the
18 KB RRAM macro the LRT paper cites; code-change writes); endurance (default 1e6 writes per cell)
gives a projected lifetime at the measured code-change rate; each cell holds an analog ``level`` in
code units (drift moves the level, the stored code is ``clip(round(level), qmin, qmax)``, a write
sets the level back onto the written code); stuck-at faults (``STUCK_MODELS``): a seeded fraction of
cells is stuck at a value drawn from the code range (``uniform``: any code, equally likely;
``bounds``: qmin or qmax, a cell stuck at its lowest or highest conductance), not at its trained
value; writes and drift leave it alone and it is never counted as written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import njit

from edgetrain.fixedpoint import FixedPointFormat

WRITE_MODELS = ("code-change", "pulse")
STUCK_MODELS = ("uniform", "bounds")

STATE_KEYS = (
    "bits",
    "signed",
    "write_pj_per_bit",
    "read_pj_per_bit",
    "endurance",
    "stuck_fraction",
    "stuck_model",
    "seed",
    "codes",
    "levels",
    "stuck",
    "write_counts",
    "pulse_counts",
    "update_events",
    "reads",
    "bits_written",
    "bits_read",
)


@dataclass(frozen=True)
class EnergyModel:
    """Energy per bit of one write and one read, in picojoules (LRT v1 section 3: 10.9 / 1.76 pJ/b)."""

    write_pj_per_bit: float = 10.9
    read_pj_per_bit: float = 1.76

    def __post_init__(self) -> None:
        for name in ("write_pj_per_bit", "read_pj_per_bit"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"EnergyModel.{name} must be a finite number >= 0, got {value!r}")


def _as_int_codes(values: Any, name: str) -> np.ndarray:
    """Integer codes as int64; integral floats are accepted, anything else is a clear error."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise TypeError(f"{name} must be an integer array of weight codes, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or inf; weight codes must be integers")
        if not np.array_equal(array, np.rint(array)):
            raise ValueError(f"{name} has non-integer values; round them to weight codes first")
    return np.array(array, dtype=np.int64, order="C")  # a C-ordered copy: flat views are views


@njit(cache=True)
def _apply_step(codes, levels, stuck, write_counts, pulse_counts, step, qmin, qmax):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """codes <- clip(codes - step, qmin, qmax) on the non-stuck cells (flat arrays), one pass: a cell
    whose code changes is written (level = code, counter + 1); every cell with step != 0 gets a pulse.
    Returns (cells written, largest counter among them)."""
    written, peak = 0, 0
    for k in range(codes.shape[0]):
        delta = step[k]
        if delta == 0:
            continue
        pulse_counts[k] += 1
        new = min(max(codes[k] - delta, qmin), qmax)
        if new != codes[k] and not stuck[k]:
            codes[k] = new
            levels[k] = new
            write_counts[k] += 1
            written += 1
            peak = max(peak, write_counts[k])
    return written, peak


def _check_range(codes: np.ndarray, fmt: FixedPointFormat, name: str) -> None:
    if codes.size and (codes.min() < fmt.qmin or codes.max() > fmt.qmax):
        bad = int(np.count_nonzero((codes < fmt.qmin) | (codes > fmt.qmax)))
        raise ValueError(
            f"{name}: {bad} code(s) outside the {fmt} range [{fmt.qmin}, {fmt.qmax}] "
            f"(min {codes.min()}, max {codes.max()}); clip them to the format first"
        )


class NVMArray:
    """One NVM weight array (any shape) of ``fmt`` codes with write counters and an energy meter."""

    def __init__(
        self,
        codes: Any,
        fmt: FixedPointFormat,
        energy: EnergyModel | None = None,
        endurance: float = 1e6,
        stuck_fraction: float = 0.0,
        seed: int | None = None,
        stuck_model: str = "uniform",
    ) -> None:
        if not isinstance(fmt, FixedPointFormat):
            raise TypeError(f"fmt must be a FixedPointFormat, got {type(fmt).__name__}")
        if not endurance > 0:
            raise ValueError(f"endurance must be > 0 writes per cell, got {endurance!r}")
        if not 0.0 <= stuck_fraction <= 1.0:
            raise ValueError(f"stuck_fraction must be in [0, 1], got {stuck_fraction!r}")
        if stuck_model not in STUCK_MODELS:
            raise ValueError(f"unknown stuck_model {stuck_model!r}; choose one of: {', '.join(STUCK_MODELS)}")
        initial = _as_int_codes(codes, "codes")
        _check_range(initial, fmt, "codes")
        self.fmt = fmt
        self.energy = energy if energy is not None else EnergyModel()
        self.endurance = float(endurance)
        self.stuck_fraction = float(stuck_fraction)
        self.stuck_model = stuck_model
        self.seed = seed
        self._codes = initial
        self._write_counts = np.zeros(initial.shape, dtype=np.int64)
        self._pulse_counts = np.zeros(initial.shape, dtype=np.int64)
        self._stuck = np.zeros(initial.shape, dtype=bool)
        num_stuck = int(round(stuck_fraction * initial.size))
        if num_stuck:
            rng = np.random.default_rng(seed)
            chosen = rng.choice(initial.size, size=num_stuck, replace=False)
            self._stuck.reshape(-1)[chosen] = True
            if stuck_model == "uniform":
                stuck_codes = rng.integers(fmt.qmin, fmt.qmax, size=num_stuck, endpoint=True)
            else:
                stuck_codes = np.where(rng.random(num_stuck) < 0.5, fmt.qmin, fmt.qmax)
            self._codes.reshape(-1)[chosen] = stuck_codes
        self._levels = self._codes.astype(np.float64)
        self.drifted_cells = np.zeros(0, dtype=np.int64)  # flat cells the last drift event changed
        self._max_writes = 0
        self._total_writes = 0
        self.update_events = 0
        self.reads = 0
        self._bits_written = 0
        self._bits_read = 0

    # -- state --------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._codes.shape

    @property
    def num_cells(self) -> int:
        return int(self._codes.size)

    @property
    def codes(self) -> np.ndarray:
        """Current stored codes ``clip(round(level), qmin, qmax)`` (int64, read-only view that follows
        later writes and drift; ``.copy()`` it to keep a snapshot)."""
        view = self._codes.view()
        view.flags.writeable = False
        return view

    @property
    def levels(self) -> np.ndarray:
        """Analog level of each cell in code units (float64, read-only view)."""
        view = self._levels.view()
        view.flags.writeable = False
        return view

    @property
    def stuck_mask(self) -> np.ndarray:
        """True where a cell is stuck (read-only view)."""
        view = self._stuck.view()
        view.flags.writeable = False
        return view

    @property
    def write_counts(self) -> np.ndarray:
        """Writes per cell so far (int64, read-only view)."""
        view = self._write_counts.view()
        view.flags.writeable = False
        return view

    @property
    def pulse_counts(self) -> np.ndarray:
        """Programming pulses per cell so far under the ``pulse`` write model (int64, read-only view)."""
        view = self._pulse_counts.view()
        view.flags.writeable = False
        return view

    @property
    def max_writes(self) -> int:
        """Code-change writes to the most-written cell (the endurance-limiting figure)."""
        return self._max_writes

    @property
    def total_writes(self) -> int:
        """Code-change writes summed over all cells."""
        return self._total_writes

    def counts(self, model: str = "code-change") -> np.ndarray:
        """Per-cell writes under ``model`` (``WRITE_MODELS``), read-only."""
        if model not in WRITE_MODELS:
            raise ValueError(f"unknown write model {model!r}; choose one of: {', '.join(WRITE_MODELS)}")
        return self.write_counts if model == "code-change" else self.pulse_counts

    @property
    def pulse_max_writes(self) -> int:
        """Pulses to the most-pulsed cell (``pulse`` write model)."""
        return int(self._pulse_counts.max()) if self.num_cells else 0

    @property
    def pulse_total_writes(self) -> int:
        """Pulses summed over all cells (``pulse`` write model)."""
        return int(self._pulse_counts.sum())

    @property
    def energy_pj(self) -> dict[str, float]:
        """read = bits read x E_read, write = bits written x E_write, total = their sum (pJ)."""
        read = self._bits_read * self.energy.read_pj_per_bit
        write = self._bits_written * self.energy.write_pj_per_bit
        return {"read": read, "write": write, "total": read + write}

    # -- operations ---------------------------------------------------------------------------------
    def write(self, new_codes: Any, pulses: Any = None) -> int:
        """One update event: write every non-stuck cell whose code changes; return how many.

        Code-change model: each written cell's counter += 1 and its level becomes the new code;
        write energy += written x bits x E_write; stuck cells keep their value and are not counted.
        Pulse model: each cell's pulse counter += ``pulses`` (non-negative ints, the number of
        non-zero update terms the cell received at this event); by default every cell that the
        event tries to change (stuck cells included: the pulse is still applied). The event is
        :meth:`apply_update` with ``step_codes = codes - new_codes``, the one entry every update event
        goes through (a subclass that observes writes overrides that method alone).
        """
        new = _as_int_codes(new_codes, "new_codes")
        if new.shape != self._codes.shape:
            raise ValueError(f"new_codes has shape {new.shape}, the array holds {self._codes.shape}")
        _check_range(new, self.fmt, "new_codes")
        return self.apply_update(self._codes - new, pulses)

    def apply_update(self, step_codes: Any, pulses: Any = None) -> int:
        """One update event ``codes <- clip(codes - step_codes, qmin, qmax)``; return cells written.

        ``pulses`` defaults to ``step_codes != 0``: one pulse per cell with a non-zero applied update,
        saturated and stuck cells included (see :meth:`write`); the default runs in one compiled pass.
        """
        step = step_codes if isinstance(step_codes, np.ndarray) and step_codes.dtype == np.int64 else None
        step = _as_int_codes(step_codes, "step_codes") if step is None else step
        if step.shape != self._codes.shape:
            raise ValueError(f"step_codes has shape {step.shape}, the array holds {self._codes.shape}")
        if pulses is None:
            state = (self._codes, self._levels, self._stuck, self._write_counts, self._pulse_counts)
            flat = [a.reshape(-1) for a in state]  # views: every state array is C-ordered (_as_int_codes, load)
            written, peak = _apply_step(*flat, np.ascontiguousarray(step).reshape(-1), self.fmt.qmin, self.fmt.qmax)
        else:
            written, peak = self._write_with_pulses(np.clip(self._codes - step, self.fmt.qmin, self.fmt.qmax), pulses)
        self._record_event(written, peak)
        return written

    def _write_with_pulses(self, new: np.ndarray, pulses: Any) -> tuple[int, int]:
        """The event with explicit pulse counts: (cells written, largest counter among them)."""
        counts = np.asarray(pulses)
        counts = counts.astype(np.int64) if counts.dtype == np.bool_ else _as_int_codes(counts, "pulses")
        if counts.shape != self._codes.shape or (counts.size and counts.min() < 0):
            raise ValueError(f"pulses must be non-negative counts of shape {self._codes.shape}, got {counts.shape}")
        self._pulse_counts += counts
        changed = (new != self._codes) & ~self._stuck
        written = int(np.count_nonzero(changed))
        if not written:
            return 0, 0
        self._codes[changed] = new[changed]
        self._levels[changed] = new[changed]
        self._write_counts[changed] += 1
        return written, int(self._write_counts[changed].max())

    def _record_event(self, written: int, peak: int) -> None:
        """Count one update event that wrote ``written`` cells, the most-written of them now at ``peak``."""
        self.update_events += 1
        self._max_writes = max(self._max_writes, peak)
        self._total_writes += written
        self._bits_written += written * self.fmt.bits

    def read(self) -> np.ndarray:
        """One full read of the array (read energy += cells x bits x E_read); returns a copy of the codes."""
        self.reads += 1
        self._bits_read += self.num_cells * self.fmt.bits
        return self._codes.copy()

    def write_density(self, samples: int) -> float:
        """Writes per cell per sample: total_writes / num_cells / samples."""
        if samples <= 0:
            raise ValueError(f"samples must be > 0, got {samples}")
        return self._total_writes / self.num_cells / samples

    def projected_lifetime_samples(self, samples: int) -> float:
        """Samples (counted from the start) until the most-written cell reaches the endurance at the
        rate measured over ``samples``: endurance x samples / max_writes; inf when nothing was written."""
        if samples <= 0:
            raise ValueError(f"samples must be > 0, got {samples}")
        if self._max_writes == 0:
            return math.inf
        return self.endurance * samples / self._max_writes

    def apply_analog_drift(self, sigma_codes: float, rng: np.random.Generator) -> int:
        """level += N(0, sigma_codes^2), then clip to [qmin, qmax] (docs/adaptation.md). Not a write;
        stuck cells do not drift. Returns the number of cells whose stored code changed (their flat
        indices: :attr:`drifted_cells`).

        The normals come from a torch generator seeded by ``rng`` (float32, about 3x faster than
        NumPy's for the ~1.5M cells of the paper net), so the result is still fixed by ``rng``.
        """
        if not (math.isfinite(sigma_codes) and sigma_codes >= 0):
            raise ValueError(f"sigma_codes must be a finite number >= 0, got {sigma_codes!r}")
        _check_rng(rng)
        if sigma_codes == 0:
            self.drifted_cells = np.zeros(0, dtype=np.int64)
            return 0
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        noise = torch.randn(self._levels.shape, generator=generator).numpy()
        noise *= np.float32(sigma_codes)
        if self._stuck.any():
            noise[self._stuck] = 0.0
        self._levels += noise
        np.clip(self._levels, self.fmt.qmin, self.fmt.qmax, out=self._levels)
        new = np.rint(self._levels)
        self.drifted_cells = np.flatnonzero(new != self._codes)
        self._codes[...] = new
        return int(self.drifted_cells.size)

    def apply_digital_drift(self, p: float, rng: np.random.Generator) -> int:
        """Flip each stored bit of each code (two's complement when signed) with probability ``p``
        (docs/adaptation.md). Not a write; stuck cells do not flip. Returns the number of cells changed
        (their flat indices: :attr:`drifted_cells`).

        The flipped bit positions are drawn exactly as independent Bernoulli(p) trials by summing
        geometric gaps, so the cost is O(cells x bits x p) rather than O(cells x bits).
        """
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"bit-flip probability p must be in [0, 1], got {p!r}")
        _check_rng(rng)
        bits = self.fmt.bits
        positions = _bernoulli_positions(self.num_cells * bits, p, rng)
        cell, bit = np.divmod(positions, bits)
        keep = ~self._stuck.reshape(-1)[cell]
        cell, bit = cell[keep], bit[keep]
        if cell.size == 0:
            self.drifted_cells = np.zeros(0, dtype=np.int64)
            return 0
        cells, inverse = np.unique(cell, return_inverse=True)
        flips = np.zeros(cells.size, dtype=np.int64)
        np.add.at(flips, inverse, np.left_shift(np.int64(1), bit))  # distinct bits per cell: sum == xor
        flat_codes = self._codes.reshape(-1)
        word = np.bitwise_and(flat_codes[cells], (1 << bits) - 1) ^ flips  # two's complement bit pattern
        if self.fmt.signed:
            word = np.where(word >= 1 << (bits - 1), word - (1 << bits), word)
        flat_codes[cells] = word
        self._levels.reshape(-1)[cells] = word
        self.drifted_cells = cells  # a non-zero flip pattern: every drawn cell changes
        return int(cells.size)

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume, as NumPy arrays only (safe for ``torch.save``/``np.savez``)."""
        return {
            "bits": np.array(self.fmt.bits, dtype=np.int64),
            "signed": np.array(self.fmt.signed),
            "write_pj_per_bit": np.array(self.energy.write_pj_per_bit, dtype=np.float64),
            "read_pj_per_bit": np.array(self.energy.read_pj_per_bit, dtype=np.float64),
            "endurance": np.array(self.endurance, dtype=np.float64),
            "stuck_fraction": np.array(self.stuck_fraction, dtype=np.float64),
            "stuck_model": np.array(STUCK_MODELS.index(self.stuck_model), dtype=np.int64),
            "seed": np.array(-1 if self.seed is None else self.seed, dtype=np.int64),
            "codes": self._codes.copy(),
            "levels": self._levels.copy(),
            "stuck": self._stuck.copy(),
            "write_counts": self._write_counts.copy(),
            "pulse_counts": self._pulse_counts.copy(),
            "update_events": np.array(self.update_events, dtype=np.int64),
            "reads": np.array(self.reads, dtype=np.int64),
            "bits_written": np.array(self._bits_written, dtype=np.int64),
            "bits_read": np.array(self._bits_read, dtype=np.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> NVMArray:
        """Rebuild an array from :meth:`state_dict` (NumPy arrays or torch tensors)."""
        d = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in state.items()}
        missing = sorted(set(STATE_KEYS) - set(d))
        if missing:
            raise KeyError(f"NVMArray state dict is missing: {', '.join(missing)}")

        def scalar(key: str) -> Any:  # 0-d, or shape (1,) after a safetensors round trip
            if d[key].size != 1:
                raise ValueError(f"NVMArray state {key!r} must hold one value, got shape {d[key].shape}")
            return d[key].reshape(-1)[0].item()

        seed = int(scalar("seed"))
        array = cls(
            d["codes"],
            FixedPointFormat(int(scalar("bits")), bool(scalar("signed"))),
            EnergyModel(float(scalar("write_pj_per_bit")), float(scalar("read_pj_per_bit"))),
            endurance=float(scalar("endurance")),
            seed=None if seed < 0 else seed,
        )
        array.stuck_fraction = float(scalar("stuck_fraction"))
        model = int(scalar("stuck_model"))
        if not 0 <= model < len(STUCK_MODELS):
            raise ValueError(f"NVMArray state 'stuck_model' = {model} is not one of 0..{len(STUCK_MODELS) - 1}")
        array.stuck_model = STUCK_MODELS[model]
        array._stuck = np.array(d["stuck"], dtype=bool, order="C").reshape(array.shape)
        array._levels = np.array(d["levels"], dtype=np.float64, order="C").reshape(array.shape)
        array._write_counts = np.array(d["write_counts"], dtype=np.int64, order="C").reshape(array.shape)
        array._pulse_counts = np.array(d["pulse_counts"], dtype=np.int64, order="C").reshape(array.shape)
        array._max_writes = int(array._write_counts.max()) if array.num_cells else 0
        array._total_writes = int(array._write_counts.sum())
        array.update_events = int(scalar("update_events"))
        array.reads = int(scalar("reads"))
        array._bits_written = int(scalar("bits_written"))
        array._bits_read = int(scalar("bits_read"))
        return array

    def __repr__(self) -> str:
        return (
            f"NVMArray(shape={self.shape}, fmt={self.fmt}, max_writes={self._max_writes}, "
            f"total_writes={self._total_writes}, pulse_max_writes={self.pulse_max_writes}, "
            f"stuck={int(self._stuck.sum())} ({self.stuck_model}))"
        )


def _check_rng(rng: Any) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")


def _bernoulli_positions(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices in [0, n) of independent Bernoulli(p) successes, via geometric gaps."""
    if p == 0.0 or n == 0:
        return np.empty(0, dtype=np.int64)
    chunks: list[np.ndarray] = []
    last = -1
    mean = n * p
    while last < n - 1:
        size = int(mean + 6.0 * math.sqrt(mean) + 16)
        positions = last + np.cumsum(rng.geometric(p, size=size))
        chunks.append(positions)
        last = int(positions[-1])
    positions = np.concatenate(chunks)
    return positions[positions < n]
