"""Update rules of the online trainer, as small interchangeable objects (docs/adaptation.md).

A rule is bound to a :class:`~edgetrain.adapt.qnet.QNet` and its NVM arrays, then called once per
sample after the backward pass. Weights change only through ``NVMArray.write`` (one update event,
every changed cell is one write); biases and batch-norm gamma/beta (16-bit, high-endurance memory)
follow per-sample SGD ``p <- q_b(p - q_b(lr * g))``, with g max-normed in the max-norm variants
(LRT v1 section 4.5, App. D). All weight arithmetic is on the stored grid: an update is
``clip(codes - round(lr_eff * dW / lsb))``. The stored codes are always inside the grid, so the
weights' STE mask is 1 and saturation is the clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgetrain.adapt.qnet import QNet, QWeight
from edgetrain.lowrank import MaxNorm, StreamingKroneckerSum
from edgetrain.nvm import NVMArray

FACTOR_BITS = 16  # LRT factors and accumulators: 16-bit (LRT v1 appendix C)
SAMPLE_BITS = 8  # activations and gradients: 8-bit


def lowrank_aux_bits(n: int, m: int, rank: int, bits: int = FACTOR_BITS) -> int:
    """LRT state of an n x m layer: factors r (n + m) b bits plus the r weights c_x (docs/adaptation.md)."""
    return rank * (n + m) * bits + rank * bits


def minibatch_sample_bits(n: int, m: int, batch: int, pixels: int = 1, bits: int = SAMPLE_BITS) -> int:
    """Minibatch SGD storing its B samples' (dz, a) pairs: B P (n + m) b bits (LRT v1 section 4.1)."""
    return batch * pixels * (n + m) * bits


def accumulator_bits(n: int, m: int, bits: int = FACTOR_BITS) -> int:
    """Minibatch SGD with a partial-sum accumulator: n m b bits (LRT v1 section 4.1)."""
    return n * m * bits


def norm_state(norm: MaxNorm) -> dict[str, float]:
    """The two numbers of a :class:`MaxNorm`'s state (its step and EMA)."""
    return {"step": norm.step, "x_mv": norm.x_mv}


def load_norm_state(norm: MaxNorm, state: dict[str, float]) -> None:
    norm.step, norm.x_mv = int(state["step"]), float(state["x_mv"])


def accumulator_state(acc: StreamingKroneckerSum) -> dict[str, Any]:
    """Every array, RNG and number attribute of an accumulator (a stopgap: ``StreamingKroneckerSum``
    has no ``state_dict`` yet, and this keeps resumes exact whatever its internals are)."""
    state: dict[str, Any] = {}
    for key, value in vars(acc).items():
        if isinstance(value, np.ndarray):
            state[key] = value.copy()
        elif isinstance(value, np.random.Generator):
            state[key] = value.bit_generator.state
        elif value is None or isinstance(value, int | float | str | bool):
            state[key] = value
    return state


def load_accumulator_state(acc: StreamingKroneckerSum, state: dict[str, Any]) -> None:
    for key, value in state.items():
        current = getattr(acc, key)
        if isinstance(current, np.random.Generator):
            current.bit_generator.state = value
        elif isinstance(current, np.ndarray):
            setattr(acc, key, np.array(value, dtype=current.dtype).reshape(np.shape(value)))
        else:
            setattr(acc, key, value)


def round_update(layer: QWeight, delta: np.ndarray) -> np.ndarray:
    """The update in weight LSBs: round(delta / lsb) as int64 (deterministic, App. C)."""
    return np.rint(delta / layer.formats.weight.lsb).astype(np.int64)


def write_update(layer: QWeight, array: NVMArray, step_codes: np.ndarray) -> int:
    """W <- clip(W - dW_q) as one update event; reload the layer's weights; return cells written."""
    fmt = array.fmt
    written = array.write(np.clip(array.codes - step_codes, fmt.qmin, fmt.qmax))
    layer.set_codes(array.codes)
    return written


class UpdateRule:
    """Base rule: per-sample SGD on biases and BN parameters (``train_biases``), nothing else.

    ``learns = False`` (inference only) skips the backward pass altogether.
    """

    name = "rule"
    learns = True

    def __init__(self, lr: float = 0.01, max_norm: bool = False, train_biases: bool = True) -> None:
        self.lr = lr
        self.max_norm = max_norm
        self.train_biases = train_biases
        self.net: QNet | None = None
        self.arrays: dict[str, NVMArray] = {}
        self.param_norms: dict[str, MaxNorm] = {}

    def bind(self, net: QNet, arrays: dict[str, NVMArray], seed: int = 0) -> None:
        """Attach to a network and its NVM arrays (one per weight layer, by layer name)."""
        self.net = net
        self.arrays = arrays
        self.param_norms = {key: MaxNorm() for key, _, _ in self._params()} if self.max_norm else {}

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
        """p <- q(p - q(lr * g)), g max-normed when ``max_norm`` (LRT v1 section 4.5, App. D)."""
        for key, param, grid in self._params():
            if param.grad is None:
                continue
            grad = param.grad
            if self.max_norm:
                grad = torch.as_tensor(self.param_norms[key](grad.numpy()), dtype=grad.dtype)
            param.copy_(grid.quantize(param - grid.quantize(self.lr * grad)))

    def update(self, step: int) -> None:
        """Apply the rule after the backward pass of sample ``step`` (0-based)."""
        if self.train_biases:
            self.update_params()

    def aux_memory_bits(self) -> dict[str, int]:
        """Auxiliary (non-NVM) memory of the weight updates, per layer, in bits."""
        assert self.net is not None, "bind() the rule first"
        return {layer.name: 0 for layer in self.net.weight_layers}

    def config(self) -> dict[str, Any]:
        return {"rule": self.name, "lr": self.lr, "max_norm": self.max_norm, "train_biases": self.train_biases}

    def state_dict(self) -> dict[str, Any]:
        return {"param_norms": {k: norm_state(v) for k, v in self.param_norms.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, saved in state.get("param_norms", {}).items():
            load_norm_state(self.param_norms[key], saved)


class InferenceOnly(UpdateRule):
    """No learning at all (streaming BN statistics still follow the input, as in the paper's runs)."""

    name = "inference"
    learns = False

    def update(self, step: int) -> None:
        return None


class BiasOnly(UpdateRule):
    """Per-sample SGD on biases and BN gamma/beta only; weights are never written."""

    name = "bias-only"


class SGD(UpdateRule):
    """Batch-1 SGD on every weight: dW_q = round(lr * sum_pixels dz a^T / lsb), written at once.

    ``writes_pixel`` also counts writes the way the paper counts conv SGD (the authors' code):
    every output pixel where a and dz are both non-zero is one write to that cell, as when a
    convolution's update is applied pixel by pixel; FC layers count the cells written.
    """

    name = "sgd"

    def __init__(self, lr: float = 0.01, train_biases: bool = True) -> None:
        super().__init__(lr=lr, max_norm=False, train_biases=train_biases)
        self.pixel_writes: dict[str, np.ndarray] = {}

    def bind(self, net: QNet, arrays: dict[str, NVMArray], seed: int = 0) -> None:
        super().bind(net, arrays, seed)
        self.pixel_writes = {layer.name: np.zeros(layer.shape2d, dtype=np.int64) for layer in net.weight_layers}

    @torch.no_grad()
    def update(self, step: int) -> None:
        assert self.net is not None
        for layer in self.net.weight_layers:
            a, dz = layer.columns()
            step_codes = round_update(layer, self.lr * (dz.T @ a).double().numpy())
            if step_codes.any():
                write_update(layer, self.arrays[layer.name], step_codes)
            if layer.is_conv:
                self.pixel_writes[layer.name] += ((dz != 0).T.float() @ (a != 0).float()).long().numpy()
            else:
                self.pixel_writes[layer.name] += step_codes != 0
        super().update(step)

    def max_pixel_writes(self) -> int:
        return max(int(c.max()) for c in self.pixel_writes.values())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pixel_writes": dict(self.pixel_writes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pixel_writes = {k: np.asarray(v, dtype=np.int64) for k, v in state["pixel_writes"].items()}


class MinibatchSGD(UpdateRule):
    """SGD with a full-precision n x m accumulator G = sum dz a^T, written every ``batch`` samples
    with dW_q = round(lr sqrt(B) G / lsb) (the LRT paper's sqrt scaling, docs/adaptation.md). The memory-hungry
    baseline: n m 16 bits per layer."""

    name = "minibatch-sgd"

    def __init__(self, batch: int = 10, lr: float = 0.01, train_biases: bool = True) -> None:
        super().__init__(lr=lr, max_norm=False, train_biases=train_biases)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.batch = batch
        self.sums: dict[str, np.ndarray] = {}

    def bind(self, net: QNet, arrays: dict[str, NVMArray], seed: int = 0) -> None:
        super().bind(net, arrays, seed)
        self.sums = {layer.name: np.zeros(layer.shape2d) for layer in net.weight_layers}

    @torch.no_grad()
    def update(self, step: int) -> None:
        assert self.net is not None
        for layer in self.net.weight_layers:
            self.sums[layer.name] += layer.weight_grad().double().numpy()
            if (step + 1) % self.batch == 0:
                lr_eff = self.lr * math.sqrt(self.batch)
                step_codes = round_update(layer, lr_eff * self.sums[layer.name])
                if step_codes.any():
                    write_update(layer, self.arrays[layer.name], step_codes)
                self.sums[layer.name][:] = 0.0
        super().update(step)

    def aux_memory_bits(self) -> dict[str, int]:
        assert self.net is not None
        return {layer.name: accumulator_bits(*layer.shape2d) for layer in self.net.weight_layers}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "batch": self.batch}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sums": dict(self.sums)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sums = {k: np.asarray(v, dtype=np.float64).copy() for k, v in state["sums"].items()}


@dataclass
class _LowRankLayer:
    """Per-layer LRT state: the accumulator, the lr multiplier and the factors' max-norms."""

    acc: StreamingKroneckerSum
    batch: int
    mult: float = 0.0
    norm_l: MaxNorm | None = None
    norm_r: MaxNorm | None = None


class LowRank(UpdateRule):
    """Low-rank training (LRT v1 section 4, App. C; docs/adaptation.md).

    Every sample (every pixel of a conv layer, im2col) feeds dz = wmult dL/dz and a to the layer's
    streaming Kronecker-sum accumulator. Every B samples (``batch_conv`` / ``batch_fc``):
    mult += B; (L, R) = factors, max-normed if ``max_norm``; lr_eff = lr sqrt(mult);
    dW_q = round(lr_eff L R^T / lsb); if the fraction of non-zero dW_q exceeds ``rho_min`` the
    weights are written (W <- clip(W - dW_q)) and the accumulator and mult reset, else it keeps
    accumulating. ``unbiased_fc=None`` uses ``unbiased`` for the FC layers too (Table 1 mixes them).
    """

    name = "lowrank"

    def __init__(
        self,
        rank: int = 4,
        batch_fc: int = 100,
        batch_conv: int = 10,
        unbiased: bool = True,
        max_norm: bool = True,
        kappa_th: float = 100.0,
        rho_min: float = 0.01,
        lr: float = 0.01,
        unbiased_fc: bool | None = None,
        train_biases: bool = True,
        chunk: int = 1,
    ) -> None:
        super().__init__(lr=lr, max_norm=max_norm, train_biases=train_biases)
        if rank < 1 or batch_fc < 1 or batch_conv < 1:
            raise ValueError(f"rank and batches must be >= 1, got rank={rank}, {batch_fc=}, {batch_conv=}")
        self.rank = rank
        self.batch_fc = batch_fc
        self.batch_conv = batch_conv
        self.unbiased = unbiased
        self.unbiased_fc = unbiased if unbiased_fc is None else unbiased_fc
        self.kappa_th = kappa_th
        self.rho_min = rho_min
        self.chunk = chunk
        self.layers: dict[str, _LowRankLayer] = {}
        self.update_events: dict[str, int] = {}

    def bind(self, net: QNet, arrays: dict[str, NVMArray], seed: int = 0) -> None:
        super().bind(net, arrays, seed)
        self.layers = {}
        for i, layer in enumerate(net.weight_layers):
            n, m = layer.shape2d
            acc = StreamingKroneckerSum(
                n,
                m,
                rank=self.rank,
                unbiased=self.unbiased if layer.is_conv else self.unbiased_fc,
                kappa_th=self.kappa_th,
                factor_bits=FACTOR_BITS,
                chunk=self.chunk,
                seed=seed * 1000 + i,
            )
            norms = (MaxNorm(), MaxNorm()) if self.max_norm else (None, None)
            batch = self.batch_conv if layer.is_conv else self.batch_fc
            self.layers[layer.name] = _LowRankLayer(acc, batch, 0.0, *norms)
        self.update_events = {name: 0 for name in self.layers}

    @torch.no_grad()
    def update(self, step: int) -> None:
        assert self.net is not None
        for layer in self.net.weight_layers:
            state = self.layers[layer.name]
            a, dz = layer.columns()
            keep = (dz != 0).any(1).nonzero()[:, 0]  # zero terms add nothing (the kappa gate drops them)
            if len(keep):
                state.acc.add(dz[keep].numpy(), a[keep].numpy())
            if (step + 1) % state.batch == 0:
                self._apply(layer, state)
        super().update(step)

    def _apply(self, layer: QWeight, state: _LowRankLayer) -> None:
        """One update event attempt (docs/adaptation.md): gated by rho_min, reset after a write."""
        state.mult += state.batch
        left, right = state.acc.factors()
        if state.norm_l is not None and state.norm_r is not None:
            left, right = state.norm_l(left), state.norm_r(right)
        step_codes = round_update(layer, self.lr * math.sqrt(state.mult) * (left @ right.T))
        if np.count_nonzero(step_codes) > self.rho_min * step_codes.size:
            write_update(layer, self.arrays[layer.name], step_codes)
            self.update_events[layer.name] += 1
            state.acc.reset()
            state.mult = 0.0

    def aux_memory_bits(self) -> dict[str, int]:
        assert self.net is not None
        return {layer.name: lowrank_aux_bits(*layer.shape2d, self.rank) for layer in self.net.weight_layers}

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "rank": self.rank,
            "batch_fc": self.batch_fc,
            "batch_conv": self.batch_conv,
            "unbiased": self.unbiased,
            "unbiased_fc": self.unbiased_fc,
            "kappa_th": self.kappa_th,
            "rho_min": self.rho_min,
            "chunk": self.chunk,
        }

    def state_dict(self) -> dict[str, Any]:
        layers = {}
        for name, s in self.layers.items():
            entry: dict[str, Any] = {"acc": accumulator_state(s.acc), "mult": s.mult}
            if s.norm_l is not None and s.norm_r is not None:
                entry["norm_l"], entry["norm_r"] = norm_state(s.norm_l), norm_state(s.norm_r)
            layers[name] = entry
        return {**super().state_dict(), "layers": layers, "update_events": dict(self.update_events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name, entry in state["layers"].items():
            s = self.layers[name]
            load_accumulator_state(s.acc, entry["acc"])
            s.mult = float(entry["mult"])
            if s.norm_l is not None and s.norm_r is not None:
                load_norm_state(s.norm_l, entry["norm_l"])
                load_norm_state(s.norm_r, entry["norm_r"])
        self.update_events = {k: int(v) for k, v in state["update_events"].items()}


RULES: dict[str, type[UpdateRule]] = {
    "inference": InferenceOnly,
    "bias-only": BiasOnly,
    "sgd": SGD,
    "minibatch-sgd": MinibatchSGD,
    "lowrank": LowRank,
}


def make_rule(name: str, **options: Any) -> UpdateRule:
    """A rule by name (``RULES``) with keyword options (e.g. ``make_rule("lowrank", rank=4)``)."""
    if name not in RULES:
        raise ValueError(f"unknown update rule {name!r}; choose one of: {', '.join(RULES)}")
    return RULES[name](**options)
