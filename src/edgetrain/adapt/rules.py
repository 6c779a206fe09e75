"""Update rules of the online trainer, as small interchangeable objects (docs/adaptation.md).

A rule is bound to a network (``QNet`` or the device network: any object with the layer protocol
``weight_layers`` / ``bn_layers``) and its NVM arrays, then called once per sample after the
backward pass. Weights change only through ``NVMArray.apply_update`` (one update event: every
changed cell is one code-change write, every non-zero update term one pulse); biases and batch-norm
gamma/beta (16-bit, high-endurance memory) follow per-sample SGD ``p <- q_b(p - q_b(lr * g))``, with
g max-normed in the max-norm variants (LRT v1 section 4.5, App. D). All weight arithmetic is on the
stored grid: an update is ``clip(codes - round(lr_eff * dW / lsb))``.

Each rule takes one typed, validated options object (``RULE_OPTIONS``), built from keywords, a
config mapping (:func:`parse_rule_options`) or the command line; ``make_rule(name, options)``.
Grouped / depthwise conv layers (``layer.groups > 1``) use the dense ``layer.weight_grad()``: a
Kronecker sum of per-pixel terms does not fit their block-diagonal weight matrix, so ``LowRank``
keeps a dense 16-bit gradient sum for them (counted in its auxiliary memory).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numba import njit

from edgetrain.lowrank import MaxNorm, StreamingKroneckerSum
from edgetrain.nvm import NVMArray

FACTOR_BITS = 16  # LRT factors and accumulators: 16-bit (LRT v1 appendix C)
ROUNDINGS = ("nearest", "stochastic")


# -- options ----------------------------------------------------------------------------------------
def option(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A rule option: its default, a help line, and its valid range (``low <= x <= high``, ``x > above``)."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "above": above, "choices": choices})


def _type_ok(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return " or ".join(a.__name__ for a in typing.get_args(hint)) if typing.get_args(hint) else hint.__name__


@dataclass(frozen=True)
class RuleOptions:
    """Base of the per-rule options: validates every field's type and range on construction."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        rule = RULE_NAMES.get(type(self), type(self).__name__)
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if not _type_ok(value, hints[f.name]):
                raise ValueError(f"{rule} option {f.name}={value!r} must be {_type_name(hints[f.name])}")
            if value is None or isinstance(value, bool):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{rule} option {f.name}={value!r} must be a finite number")
            if meta.get("choices") and value not in meta["choices"]:
                raise ValueError(f"{rule} option {f.name}={value!r}; choose one of: {', '.join(meta['choices'])}")
            if meta.get("low") is not None and value < meta["low"]:
                raise ValueError(f"{rule} option {f.name}={value!r} must be >= {meta['low']}")
            if meta.get("high") is not None and value > meta["high"]:
                raise ValueError(f"{rule} option {f.name}={value!r} must be <= {meta['high']}")
            if meta.get("above") is not None and not value > meta["above"]:
                raise ValueError(f"{rule} option {f.name}={value!r} must be > {meta['above']}")


@dataclass(frozen=True)
class InferenceOptions(RuleOptions):
    """Inference only has no options."""


@dataclass(frozen=True)
class BiasOnlyOptions(RuleOptions):
    """Per-sample SGD on biases and BN gamma/beta."""

    lr: float = option(0.01, "learning rate", above=0.0)
    max_norm: bool = option(False, "max-norm the bias and BN gradients (LRT App. D)")


@dataclass(frozen=True)
class SGDOptions(RuleOptions):
    """Batch-1 SGD on every weight (``sgd`` rounds to nearest, ``sgd-sr`` stochastically)."""

    lr: float = option(0.01, "learning rate", above=0.0)
    train_biases: bool = option(True, "per-sample SGD on biases and BN gamma/beta too")


@dataclass(frozen=True)
class MinibatchOptions(RuleOptions):
    """SGD with a dense n x m gradient accumulator written every ``batch`` samples."""

    batch: int = option(10, "minibatch-sgd batch B (samples between writes)", low=1)
    lr: float = option(0.01, "learning rate", above=0.0)
    train_biases: bool = option(True, "per-sample SGD on biases and BN gamma/beta too")


@dataclass(frozen=True)
class LowRankOptions(RuleOptions):
    """Low-rank training (LRT v1 section 4, App. C) and the knobs that cut code changes."""

    rank: int = option(4, "rank r of each layer's gradient accumulator", low=1)
    batch_fc: int = option(100, "low-rank FC update period B (samples)", low=1)
    batch_conv: int = option(10, "low-rank conv update period B (samples)", low=1)
    unbiased: bool = option(True, "unbiased (OK) accumulator; False: biased top-r")
    unbiased_fc: bool | None = option(None, "estimator of the FC layers (default: as unbiased)")
    max_norm: bool = option(True, "max-norm the factors and the bias/BN gradients (LRT App. D)")
    kappa_th: float = option(100.0, "conditioning gate kappa_th of the accumulator (LRT App. H)", above=0.0)
    rho_min: float = option(0.01, "write only when more than this fraction of cells would change", low=0.0, high=1.0)
    min_update_rms: float = option(
        0.0, "adaptive period: write only when the update's RMS reaches this many LSBs (0: off)", low=0.0
    )
    lr: float = option(0.01, "learning rate", above=0.0)
    bias_lr: float | None = option(None, "learning rate of the bias and BN steps (default: lr)", above=0.0)
    train_biases: bool = option(True, "per-sample SGD on biases and BN gamma/beta too")
    chunk: int = option(1, "accumulator terms folded per step", low=1)
    rounding: str = option("nearest", "rounding of the rank-r update onto the LSB grid", choices=ROUNDINGS)
    write_threshold: float = option(0.0, "write only cells whose update is >= this many LSBs (0: off)", low=0.0)
    error_feedback: bool = option(False, "feed the unwritten remainder back into the accumulator (rank r)")
    write_fraction: float = option(
        1.0, "sparse events: write at most ceil(f n m) cells per event, largest |x| first (1: off)", above=0.0, high=1.0
    )
    write_fraction_fc: float | None = option(
        None, "write_fraction of the FC layers (default: as write_fraction)", above=0.0, high=1.0
    )
    endurance: float | None = option(None, "governor: cell endurance in writes (with lifetime_samples)", above=0.0)
    lifetime_samples: float | None = option(None, "governor: target lifetime in samples (with endurance)", above=0.0)
    governor_burst: int | None = option(
        None,
        "governor: most unused writes a cell may save up, a saturating per-cell token counter of "
        "ceil(log2(burst + 1)) bits (default: a lifetime write counter of ceil(log2(endurance + 1)) bits)",
        low=1,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.endurance is None) != (self.lifetime_samples is None):
            raise ValueError("lowrank options endurance and lifetime_samples go together: set both or neither")
        if self.governor_burst is not None and self.endurance is None:
            raise ValueError("lowrank option governor_burst needs the governor: set endurance and lifetime_samples")
        for name in ("write_fraction", "write_fraction_fc"):
            fraction = getattr(self, name)
            if fraction is not None and fraction < 1.0 and fraction <= self.rho_min:
                raise ValueError(
                    f"lowrank option {name}={fraction} must exceed rho_min={self.rho_min} "
                    f"(else no event ever writes): raise {name} or lower rho_min"
                )


# -- shared arithmetic ------------------------------------------------------------------------------
def dense_accumulator_bits(n: int, m: int, bits: int = FACTOR_BITS) -> int:
    """A dense n x m gradient accumulator: n m b bits (LRT v1 section 4.1)."""
    return n * m * bits


@njit(cache=True)
def _grid_codes(values, scale, lsb, uniforms, out):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """out = codes of x = scale * values / lsb in one pass: round-half-even when ``uniforms`` is empty,
    else floor(x) + (u < x - floor(x)); returns whether any code is non-zero."""
    x_flat, u_flat, o_flat = values.reshape(-1), uniforms.reshape(-1), out.reshape(-1)
    stochastic = u_flat.size > 0
    nonzero = False
    for i in range(x_flat.size):
        x = scale * np.float64(x_flat[i]) / lsb
        if stochastic:
            low = np.floor(x)
            code = np.int64(low) + (1 if u_flat[i] < x - low else 0)
        else:
            code = np.int64(np.rint(x))
        o_flat[i] = code
        nonzero = nonzero or code != 0
    return nonzero


def grid_codes(
    values: np.ndarray, scale: float = 1.0, lsb: float = 1.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """int64 codes of x = ``scale * values / lsb`` (in LSBs), in one compiled pass: round-half-even
    when ``rng`` is None, else stochastic rounding ``floor(x) + Bernoulli(x - floor(x))`` (unbiased:
    E = x; one uniform draw per element from ``rng``, in C order)."""
    values = np.ascontiguousarray(values)
    uniforms = rng.random(values.shape) if rng is not None else np.empty(0)
    out = np.empty(values.shape, np.int64)
    _grid_codes(values, float(scale), float(lsb), uniforms, out)
    return out


def round_to_grid(x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """int64 codes of ``x`` (in LSBs): round-half-even when ``rng`` is None, else stochastic rounding
    ``floor(x) + Bernoulli(x - floor(x))`` (unbiased: E = x)."""
    return grid_codes(np.asarray(x, dtype=np.float64), rng=rng)


def pixel_activity(a: torch.Tensor, dz: torch.Tensor) -> np.ndarray:
    """Per-pixel outer-product terms per cell: #pixels with dz_i != 0 and a_j != 0 (the LRT paper's
    SGD conv count: each pixel's update applied as its own pulse)."""
    active = dz != 0
    rows = active.any(1)
    if not bool(rows.all()):  # pixels without a gradient add nothing: skip them (exact)
        active, a = active[rows], a[rows]
    return (active.T.float() @ (a != 0).float()).long().numpy()


def groups_of(layer: Any) -> int:
    return int(getattr(layer, "groups", 1))


def norm_state(norm: MaxNorm) -> dict[str, float]:
    """The two numbers of a :class:`MaxNorm`'s state (its step and EMA)."""
    return {"step": norm.step, "x_mv": norm.x_mv}


def load_norm_state(norm: MaxNorm, state: dict[str, float]) -> None:
    norm.step, norm.x_mv = int(state["step"]), float(state["x_mv"])


def normed(norm: MaxNorm | None, x: np.ndarray) -> tuple[np.ndarray, float]:
    """(x / s, s): the max-normed ``x`` and its divisor s (1 without a norm)."""
    if norm is None:
        return x, 1.0
    y = norm(x)
    peak = float(np.abs(y).max()) if y.size else 0.0
    return y, (float(np.abs(x).max()) / peak if peak > 0 else 1.0)


def keep_largest(step_codes: np.ndarray, x: np.ndarray, keep: int) -> None:
    """Sparse event, in place: of the cells with step_codes != 0, keep the ``keep`` with the largest
    |x| (ties broken by position) and zero the rest."""
    candidates = np.flatnonzero(step_codes)
    if candidates.size <= keep:
        return
    magnitude = np.abs(x.reshape(-1)[candidates])
    step_codes.flat[candidates[np.argsort(-magnitude, kind="stable")[keep:]]] = 0


# -- rules ------------------------------------------------------------------------------------------
class UpdateRule:
    """Base rule: per-sample SGD on biases and BN parameters (``train_biases``), nothing else.

    ``learns = False`` (inference only) skips the backward pass altogether. Subclasses name their
    options class in ``Options``; ``Rule(options)`` or ``Rule(**keywords)``.
    """

    name = "rule"
    learns = True
    Options: type[RuleOptions] = RuleOptions

    def __init__(self, options: RuleOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = parse_rule_options(self.name, kwargs)
        elif not isinstance(options, self.Options):
            raise TypeError(f"rule {self.name} takes {self.Options.__name__}, got {type(options).__name__}")
        elif kwargs:
            options = dataclasses.replace(options, **kwargs)
        self.options = options
        self.net: Any = None
        self.arrays: dict[str, NVMArray] = {}
        self.param_norms: dict[str, MaxNorm] = {}
        self.rng = np.random.default_rng(0)

    @property
    def lr(self) -> float:
        return float(getattr(self.options, "lr", 0.0))

    @property
    def param_lr(self) -> float:
        """Learning rate of the bias and BN steps: ``bias_lr`` where a rule has it and it is set, else lr."""
        bias_lr = getattr(self.options, "bias_lr", None)
        return self.lr if bias_lr is None else float(bias_lr)

    @property
    def trains_params(self) -> bool:
        return bool(getattr(self.options, "train_biases", True))

    @property
    def max_norm(self) -> bool:
        return bool(getattr(self.options, "max_norm", False))

    def bind(self, net: Any, arrays: dict[str, NVMArray], seed: int = 0) -> None:
        """Attach to a network and its NVM arrays (one per weight layer, by layer name); ``seed``
        seeds the rule's own random draws (stochastic rounding, random signs)."""
        self.net = net
        self.arrays = arrays
        self.param_norms = {key: MaxNorm() for key, _, _ in self._params()} if self.max_norm else {}
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))

    def _params(self) -> list[tuple[str, torch.nn.Parameter, Any]]:
        """(key, parameter, its 16-bit grid) of every bias and BN gamma/beta."""
        assert self.net is not None, "bind() the rule first"
        out: list[tuple[str, torch.nn.Parameter, Any]] = []
        for layer in self.net.weight_layers:
            out.append((f"{layer.name}.bias", layer.bias, layer.formats.bias))
        for bn in self.net.bn_layers:
            if bn.enabled:
                out.append((f"{bn.name}.gamma", bn.gamma, bn.formats.bias))
                out.append((f"{bn.name}.beta", bn.beta, bn.formats.bias))
        return out

    @torch.no_grad()
    def update_params(self) -> None:
        """p <- q(p - q(lr_p * g)), lr_p = :attr:`param_lr`, g max-normed when ``max_norm`` (LRT v1
        section 4.5, App. D)."""
        for key, param, grid in self._params():
            if param.grad is None:
                continue
            grad = param.grad
            if self.max_norm:
                grad = torch.as_tensor(self.param_norms[key](grad.numpy()), dtype=grad.dtype)
            grid.descend_(param, grad, self.param_lr)  # p <- q(p - q(lr_p g)) in place

    def update(self, step: int) -> None:
        """Apply the rule after the backward pass of sample ``step`` (0-based)."""
        if self.trains_params:
            self.update_params()

    def write(self, layer: Any, step_codes: np.ndarray, pulses: np.ndarray | None = None) -> int:
        """W <- clip(W - step_codes) as one update event; reload the layer's codes; return cells written."""
        array = self.arrays[layer.name]
        written = array.apply_update(step_codes, pulses)
        if written:
            layer.set_codes(array.codes)
        return written

    def aux_memory_bits(self) -> dict[str, int]:
        """Auxiliary (non-NVM) memory of the weight updates, per layer, in bits."""
        assert self.net is not None, "bind() the rule first"
        return {layer.name: 0 for layer in self.net.weight_layers}

    def config(self) -> dict[str, Any]:
        return {"rule": self.name, **dataclasses.asdict(self.options)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "param_norms": {k: norm_state(v) for k, v in self.param_norms.items()},
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, saved in state.get("param_norms", {}).items():
            load_norm_state(self.param_norms[key], saved)
        self.rng.bit_generator.state = state["rng"]


class InferenceOnly(UpdateRule):
    """No learning at all (streaming BN statistics still follow the input, as in the paper's runs)."""

    name = "inference"
    learns = False
    Options = InferenceOptions

    def update(self, step: int) -> None:
        return None


class BiasOnly(UpdateRule):
    """Per-sample SGD on biases and BN gamma/beta only; weights are never written."""

    name = "bias-only"
    Options = BiasOnlyOptions


class SGD(UpdateRule):
    """Batch-1 SGD on every weight: dW_q = round(lr sum_pixels dz a^T / lsb), one update event per sample.

    Pulse model: a conv layer's update counts as its per-pixel outer products (one pulse per pixel
    where a and dz are both non-zero: the LRT paper's activity count); an FC or grouped conv layer
    counts its non-zero rounded update. Grouped / depthwise conv layers use ``layer.weight_grad()``.
    """

    name = "sgd"
    Options = SGDOptions
    stochastic = False

    @torch.no_grad()
    def update(self, step: int) -> None:
        assert self.net is not None
        rng = self.rng if self.stochastic else None
        for layer in self.net.weight_layers:
            pulses = None
            if groups_of(layer) == 1:
                a, dz = layer.columns()
                grad = dz.T @ a
                if layer.is_conv:
                    pulses = pixel_activity(a, dz)
            else:
                grad = layer.weight_grad()
            step_codes = grid_codes(grad.numpy(), self.lr, layer.formats.weight.lsb, rng)
            if step_codes.any() or (pulses is not None and pulses.any()):
                self.write(layer, step_codes, pulses)
        super().update(step)


class SGDStochastic(SGD):
    """Batch-1 SGD with seeded stochastic rounding of the quantized update (the fair batch-1
    baseline): dW_q = floor(x) + Bernoulli(x - floor(x)), x = lr dW / lsb, so E[dW_q] = x and
    updates far below one LSB still move the weights on average."""

    name = "sgd-sr"
    stochastic = True


class MinibatchSGD(UpdateRule):
    """SGD with a full-precision n x m accumulator G = sum dz a^T, written every ``batch`` samples
    with dW_q = round(lr sqrt(B) G / lsb) (the LRT paper's sqrt scaling, docs/adaptation.md). The
    memory-hungry baseline: n m 16 bits per layer."""

    name = "minibatch-sgd"
    Options = MinibatchOptions

    def bind(self, net: Any, arrays: dict[str, NVMArray], seed: int = 0) -> None:
        super().bind(net, arrays, seed)
        self.sums = {layer.name: np.zeros(layer.shape2d) for layer in net.weight_layers}

    @torch.no_grad()
    def update(self, step: int) -> None:
        assert self.net is not None
        batch = self.options.batch
        for layer in self.net.weight_layers:
            self.sums[layer.name] += layer.weight_grad().double().numpy()
            if (step + 1) % batch == 0:
                lr_eff = self.lr * math.sqrt(batch)
                step_codes = grid_codes(self.sums[layer.name], lr_eff, layer.formats.weight.lsb)
                if step_codes.any():
                    self.write(layer, step_codes)
                self.sums[layer.name][:] = 0.0
        super().update(step)

    def aux_memory_bits(self) -> dict[str, int]:
        assert self.net is not None
        return {layer.name: dense_accumulator_bits(*layer.shape2d) for layer in self.net.weight_layers}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sums": dict(self.sums)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sums = {k: np.asarray(v, dtype=np.float64).copy() for k, v in state["sums"].items()}


@dataclass
class _LowRankLayer:
    """Per-layer LRT state: the rank-r accumulator (``acc``) or, for grouped conv, a dense gradient
    sum (``dense``); the update period, the lr multiplier and the max-norms."""

    acc: StreamingKroneckerSum | None
    dense: np.ndarray | None
    batch: int
    mult: float = 0.0
    norm_l: MaxNorm | None = None
    norm_r: MaxNorm | None = None
    tokens: TokenGovernor | None = None


@dataclass
class TokenGovernor:
    """The endurance governor's per-cell write tokens with a burst cap C (``governor_burst``): at each
    update event at sample t, every cell first pays one token per code-change write since the last
    event t' (floor 0: those writes came before this accrual), then gains the budget's growth
    floor(E t / T) - floor(E t' / T) (capped at C); only cells holding a token may be written.
    Tokens only ever come from the budget, so a cell's writes never exceed floor(E t / T); with
    C >= E it is the lifetime-counter governor exactly.
    ``seen`` (the array's write counters at the last event) is the simulator's way to find the writes
    since then; a device decrements the token when it writes the cell."""

    burst: int
    tokens: np.ndarray
    seen: np.ndarray
    budget: int = 0

    def refresh(self, budget: int, write_counts: np.ndarray) -> np.ndarray:
        """Pay for the writes since the last event, accrue to ``budget``; returns who may write."""
        np.maximum(self.tokens - (write_counts - self.seen), 0, out=self.tokens)
        np.minimum(self.tokens + (budget - self.budget), self.burst, out=self.tokens)
        self.seen[:] = write_counts
        self.budget = budget
        return self.tokens >= 1

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens.copy(), "seen": self.seen.copy(), "budget": self.budget}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens[:] = state["tokens"]
        self.seen[:] = state["seen"]
        self.budget = int(state["budget"])


class LowRank(UpdateRule):
    """Low-rank training (LRT v1 section 4, App. C; docs/adaptation.md).

    Every sample (every pixel of a conv layer, im2col) feeds dz = wmult dL/dz and a to the layer's
    streaming Kronecker-sum accumulator. Every B samples (``batch_conv`` / ``batch_fc``): mult += B;
    (L, R) = factors, max-normed if ``max_norm`` (divisors s_L, s_R); lr_eff = lr sqrt(mult);
    x = lr_eff L R^T / lsb (the update in LSBs); adaptive period (``min_update_rms``): if
    rms(x) = ||x||_F / sqrt(n m) (from the factors) is below it, nothing happens and the accumulator
    keeps accumulating (mult grows); else dW_q = round(x) (``rounding="stochastic"``:
    floor(x) + Bernoulli(frac x)); cells with |x| < ``write_threshold`` and cells that used up their
    endurance budget get dW_q = 0; sparse events (``write_fraction`` f < 1): of the remaining non-zero
    cells only the ceil(f n m) with the largest |x| keep their dW_q (FC layers: ``write_fraction_fc``
    if set); if the fraction of non-zero dW_q exceeds ``rho_min`` the weights are written
    (W <- clip(W - dW_q)) and mult resets, and the accumulator restarts empty or, with
    ``error_feedback``, from the unwritten remainder (:meth:`feedback`); else it keeps accumulating.

    Endurance governor (``endurance`` E, ``lifetime_samples`` T): after t samples a cell may hold at
    most floor(E t / T) code-change writes, so no cell reaches E before T samples; kept with a
    lifetime write counter per cell, or (``governor_burst`` C) with a C-capped token counter
    (:class:`TokenGovernor`), which holds the same bound in ceil(log2(C + 1)) bits per cell.
    """

    name = "lowrank"
    Options = LowRankOptions

    def bind(self, net: Any, arrays: dict[str, NVMArray], seed: int = 0) -> None:
        super().bind(net, arrays, seed)
        o = self.options
        self.layers: dict[str, _LowRankLayer] = {}
        for i, layer in enumerate(net.weight_layers):
            n, m = layer.shape2d
            acc, dense = None, None
            if groups_of(layer) == 1:
                unbiased = o.unbiased if layer.is_conv or o.unbiased_fc is None else o.unbiased_fc
                acc = StreamingKroneckerSum(
                    n,
                    m,
                    rank=o.rank,
                    unbiased=unbiased,
                    kappa_th=o.kappa_th,
                    factor_bits=FACTOR_BITS,
                    chunk=o.chunk,
                    seed=seed * 1000 + i,
                )
            else:
                dense = np.zeros((n, m))
            norms = (MaxNorm(), MaxNorm()) if o.max_norm else (None, None)
            batch = o.batch_conv if layer.is_conv else o.batch_fc
            tokens = None
            if o.governor_burst is not None:
                counts = arrays[layer.name].write_counts
                tokens = TokenGovernor(o.governor_burst, np.zeros(counts.shape, dtype=np.int64), counts.copy())
            self.layers[layer.name] = _LowRankLayer(acc, dense, batch, 0.0, *norms, tokens)
        self.update_events = {name: 0 for name in self.layers}

    @torch.no_grad()
    def update(self, step: int) -> None:
        assert self.net is not None
        for layer in self.net.weight_layers:
            state = self.layers[layer.name]
            if state.acc is not None:
                a, dz = layer.nonzero_columns()  # zero terms add nothing (the kappa gate drops them)
                if len(dz):
                    state.acc.add(dz.numpy(), a.numpy())
            else:
                state.dense += layer.weight_grad().double().numpy()
            if (step + 1) % state.batch == 0:
                self._apply(layer, state, step)
        super().update(step)

    def estimate(self, state: _LowRankLayer) -> tuple[np.ndarray, np.ndarray | None, float, np.ndarray | None]:
        """(A, B, s, L): the max-normed gradient-sum estimate G = A B^T = L R^T / s (B None: A is the
        dense sum / s), its divisor s = s_L s_R, and the left factor L (n x r; None for a dense sum)."""
        if state.acc is None:
            assert state.dense is not None
            grad, scale = normed(state.norm_l, state.dense)
            return grad, None, scale, None
        left, right = state.acc.factors()
        left_n, s_l = normed(state.norm_l, left)
        right_n, s_r = normed(state.norm_r, right)
        return left_n, right_n, s_l * s_r, left

    @staticmethod
    def rms(left: np.ndarray, right: np.ndarray | None) -> float:
        """RMS of the entries of A B^T from the factors alone: ||A B^T||_F^2 = sum((A^T A) * (B^T B)),
        O((n + m) r^2) work, so a gated-off event never forms the dense n x m product."""
        if right is None:
            return float(np.sqrt(np.mean(left**2))) if left.size else 0.0
        squared = float(np.sum((left.T @ left) * (right.T @ right)))
        return math.sqrt(max(squared, 0.0) / (left.shape[0] * right.shape[0]))

    def allowed_writes(self, samples: int) -> int | None:
        """Governor budget after ``samples`` samples: floor(E samples / T) writes per cell (None: off)."""
        o = self.options
        if o.endurance is None or o.lifetime_samples is None:
            return None
        return math.floor(o.endurance * samples / o.lifetime_samples)

    def step_codes(self, layer: Any, x: np.ndarray, samples: int) -> np.ndarray:
        """dW_q of the update ``x`` (in LSBs): rounded, thresholded, inside the endurance budget."""
        o = self.options
        step_codes = round_to_grid(x, self.rng if o.rounding == "stochastic" else None)
        if o.write_threshold > 0:
            step_codes[np.abs(x) < o.write_threshold] = 0
        budget = self.allowed_writes(samples)
        tokens = self.layers[layer.name].tokens
        if tokens is not None:
            assert budget is not None
            step_codes[~tokens.refresh(budget, self.arrays[layer.name].write_counts)] = 0
        elif budget is not None:
            step_codes[self.arrays[layer.name].write_counts >= budget] = 0
        fraction = o.write_fraction if layer.is_conv or o.write_fraction_fc is None else o.write_fraction_fc
        if fraction < 1.0:
            keep_largest(step_codes, x, math.ceil(fraction * x.size))
        return step_codes

    def _apply(self, layer: Any, state: _LowRankLayer, step: int) -> None:
        """One update event attempt (docs/adaptation.md): gated by min_update_rms and rho_min, reset
        after a write."""
        state.mult += state.batch
        factor_a, factor_b, scale, left = self.estimate(state)
        lr_eff = self.lr * math.sqrt(state.mult)
        lsb = layer.formats.weight.lsb
        if lr_eff * self.rms(factor_a, factor_b) / lsb < self.options.min_update_rms:
            return  # adaptive period: keep accumulating, mult (and so lr_eff) keeps growing
        x = lr_eff * (factor_a if factor_b is None else factor_a @ factor_b.T) / lsb
        step_codes = self.step_codes(layer, x, step + 1)
        if np.count_nonzero(step_codes) > self.options.rho_min * step_codes.size:
            self.write(layer, step_codes)
            self.update_events[layer.name] += 1
            remainder = (x - step_codes) * (lsb * scale / lr_eff) if self.options.error_feedback else None
            self.feedback(state, remainder, left)
            state.mult = 0.0

    @staticmethod
    def feedback(state: _LowRankLayer, remainder: np.ndarray | None, left: np.ndarray | None) -> None:
        """Restart the accumulator after a write: empty, or (error feedback) from the unwritten
        remainder E, in gradient-sum units, kept within rank r: Q Q^T E with Q an orthonormal basis
        of the written update's column space (span of the left factor L; the rounding noise outside
        it is dropped), fed as the r terms q_k (E^T q_k)^T. A dense (grouped conv) sum restarts from E."""
        if state.acc is None:
            assert state.dense is not None
            state.dense[:] = 0.0 if remainder is None else remainder
            return
        state.acc.reset()
        if remainder is not None and left is not None and left.any():
            u, sv, _ = np.linalg.svd(left, full_matrices=False)
            basis = u[:, sv > 1e-6 * sv[0]]  # the directions L actually spans
            state.acc.add(basis.T, basis.T @ remainder)

    def aux_memory_bits(self) -> dict[str, int]:
        """Accumulator bits (``kronecker_sum_aux_bits``, or n m 16 for a dense grouped-conv sum), plus
        per cell, when the endurance governor is on, a write counter of ceil(log2(E + 1)) bits or a
        token counter of ceil(log2(C + 1)) bits (``governor_burst`` C)."""
        assert self.net is not None
        out = {}
        o = self.options
        counter_max = o.governor_burst if o.governor_burst is not None else o.endurance
        for layer in self.net.weight_layers:
            state = self.layers[layer.name]
            n, m = layer.shape2d
            bits = state.acc.aux_memory_bits() if state.acc is not None else dense_accumulator_bits(n, m)
            if counter_max is not None:
                bits += n * m * math.ceil(math.log2(counter_max + 1))
            out[layer.name] = bits
        return out

    def state_dict(self) -> dict[str, Any]:
        layers = {}
        for name, s in self.layers.items():
            entry: dict[str, Any] = {"mult": s.mult}
            if s.acc is not None:
                entry["acc"] = s.acc.state_dict()
            else:
                entry["dense"] = s.dense.copy()
            if s.norm_l is not None and s.norm_r is not None:
                entry["norm_l"], entry["norm_r"] = norm_state(s.norm_l), norm_state(s.norm_r)
            if s.tokens is not None:
                entry["tokens"] = s.tokens.state_dict()
            layers[name] = entry
        return {**super().state_dict(), "layers": layers, "update_events": dict(self.update_events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name, entry in state["layers"].items():
            s = self.layers[name]
            if s.acc is not None:
                s.acc.load_state_dict(entry["acc"])
            else:
                s.dense = np.asarray(entry["dense"], dtype=np.float64).copy()
            s.mult = float(entry["mult"])
            if s.norm_l is not None and s.norm_r is not None:
                load_norm_state(s.norm_l, entry["norm_l"])
                load_norm_state(s.norm_r, entry["norm_r"])
            if s.tokens is not None:
                s.tokens.load_state_dict(entry["tokens"])
        self.update_events = {k: int(v) for k, v in state["update_events"].items()}


RULES: dict[str, type[UpdateRule]] = {
    "inference": InferenceOnly,
    "bias-only": BiasOnly,
    "sgd": SGD,
    "sgd-sr": SGDStochastic,
    "minibatch-sgd": MinibatchSGD,
    "lowrank": LowRank,
}
RULE_OPTIONS: dict[str, type[RuleOptions]] = {name: rule.Options for name, rule in RULES.items()}
RULE_NAMES: dict[type[RuleOptions], str] = {
    InferenceOptions: "inference",
    BiasOnlyOptions: "bias-only",
    SGDOptions: "sgd",
    MinibatchOptions: "minibatch-sgd",
    LowRankOptions: "lowrank",
}


def _check_rule(name: str) -> None:
    if name not in RULES:
        raise ValueError(f"unknown update rule {name!r}; choose one of: {', '.join(RULES)}")


def parse_rule_options(name: str, mapping: Mapping[str, Any]) -> RuleOptions:
    """The options object of rule ``name`` from a mapping (a config section, keywords); a one-line
    ValueError names an unknown rule, an unknown key or a value of the wrong type or range."""
    _check_rule(name)
    cls = RULE_OPTIONS[name]
    known = [f.name for f in dataclasses.fields(cls)]
    for key in mapping:
        if key not in known:
            valid = ", ".join(known) if known else "none"
            raise ValueError(f"rule {name!r} has no option {key!r}; its options: {valid}")
    try:
        return cls(**mapping)
    except ValueError as err:
        raise ValueError(str(err).replace(f"{RULE_NAMES.get(cls, name)} option", f"{name} option", 1)) from None


def make_rule(name: str, options: RuleOptions | Mapping[str, Any] | None = None, /, **kwargs: Any) -> UpdateRule:
    """A rule by name (``RULES``) with its options: an options object, a mapping, or keywords
    (``make_rule("lowrank", rank=4)``, ``make_rule("lowrank", LowRankOptions(rank=4))``)."""
    _check_rule(name)
    if options is None or isinstance(options, Mapping):
        options = parse_rule_options(name, {**(options or {}), **kwargs})
        kwargs = {}
    return RULES[name](options, **kwargs)
