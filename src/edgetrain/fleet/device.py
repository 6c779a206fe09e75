"""One simulated device of the fleet: its network on its own NVM, its stream, drift and update rule.

docs/fleet.md. Device k runs the online trainer (predict, then learn, batch 1) on its own non-IID
stream with its own drift realisation (seed ``seed * 1000 + k``). Per strategy:

- ``local``: LowRank (LRT v1 section 4) alone, writing every B samples; nothing is sent.
- ``federated-lowrank``: LowRank accumulates the whole round (no local weight write); at the end of
  the round the device sends its accumulator's factors (L, R) per layer and resets it; the server's
  merged factors come back as one NVM update event dW_q = round(eta lr sqrt(R) L R^T / lsb),
  W <- clip(W - dW_q): the LowRank write with mult = R samples, scaled by the server step size
  eta = ``fleet_lr``.
- ``local-round`` (an ablation: federated low-rank without the fleet): the same device, gate and
  refresh, sending nothing; its only candidate is its own update of the round.
- ``fedavg`` / ``fedavg-sgd``: LowRank / per-sample SGD writing locally; the device sends the weight
  delta D it wrote during the round (int16 codes) and applies the fleet mean M as one update event
  W <- clip(W - D + round(M)).

Acceptance gate (``gate_samples`` = N > 0, every strategy with a broadcast), causal: the device
keeps its last N labelled stream samples in a RAM ring buffer (counted in its auxiliary memory).
When a broadcast arrives, it predicts those N samples (already seen and learnt from; nothing later)
with its current weights and with the weights each candidate update would give (computed in RAM,
nothing written). The candidates are the broadcast and, for federated low-rank, the device's own
update: the factors it reported, kept in RAM until the broadcast arrives and max-normed like the
server's merge, written with the same step (what the device would write alone, once per round);
with ``gate_sum`` also their sum (the own update and the broadcast in one event), with
``gate_agree`` the own update reinforced where the fleet agrees: own + fleet on the cells where the
two steps have the same sign, own alone elsewhere (a personalised candidate that writes no cell the
own update does not: the fleet only confirms the device's own direction), with ``gate_head`` a
personal head: the broadcast on every weight layer but the classifier (the last), the device's own
update on the classifier (the fleet averages classifiers of devices with other classes). The device
writes the candidate that gets the most of the N samples right (ties: the broadcast first) if it
does at least as well as the current weights, else it writes nothing (the broadcast is declined).
A device can do this because its stream is labelled (it learns from those labels). A device that
has just rejoined after losing power has an empty buffer and writes the broadcast ungated.

Fresh gate samples (``gate_fresh``, federated low-rank and local-round): without it the gate's buffer
holds the last N samples of the round, which are in the device's own update (and, at 1/K, in the
broadcast), so the gate scores its own update in-sample and prefers it. With it the device closes
its report N samples before the round ends (the accumulator's factors taken and reset); the last N
samples of the round are learnt into the next round's report, and the gate scores every candidate
on those N samples, which no candidate has learnt from (still only samples the device has seen).
Every report but the first (N fewer samples) covers ``samples_per_round`` samples; the last N
samples of the run are never written.

BN refresh (``bn_refresh``, on by default with the gate): the streaming batch-norm statistics describe the
activations of the weights they were gathered under, so before scoring each option (the current
weights too) the device replays the buffer through it once, statistics only (train mode, no
learning, labels unused), and after writing a candidate it replays the buffer for the written weights.

Sparse events (``write_fraction`` f < 1): every fleet update event (broadcast, own update, sum; every
strategy that has one) writes per layer only the ceil(f n m) changed cells with the largest
unrounded step (:func:`sparse_step`), the rule of LowRank's sparse events; the gate scores what
would be written. The link is unchanged (a sparse list of f n m cells would be larger than r(n + m)
factors at the fractions used).

Biases and batch-norm parameters (16-bit, high-endurance memory) keep adapting on each device in
every strategy. The device's state (NVM, rule, RNGs, fleet bookkeeping) is saved after each
completed round, so a device that drops out rejoins from its non-volatile state.
"""

from __future__ import annotations

import copy
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import rotate
from threadpoolctl import threadpool_limits

from edgetrain.adapt import OnlineTrainer, make_rule
from edgetrain.adapt.checkpoint import load_state, save_state
from edgetrain.adapt.rules import keep_largest
from edgetrain.adapt.scenarios import Scenario, make_scenario
from edgetrain.data import load_dataset
from edgetrain.data.elastic import ELASTIC_PAIRS, elastic_deform
from edgetrain.fleet.config import FleetConfig
from edgetrain.fleet.merge import FactorNorms, decode_factors, encode_factors
from edgetrain.nvm import DriftSpec, NVMArray

NEVER = 2**62  # a LowRank batch that never ends: the fleet decides when the weights are written
TRACKED = ("fedavg", "fedavg-sgd")
ROUND_UPDATES = ("federated-lowrank", "local-round")  # LowRank summed over the round, one update event


class TrackedNVMArray(NVMArray):
    """An NVM array that also sums the changes its update events make: ``written += new - old`` on
    the written cells (every event, ``write`` included, goes through ``apply_update``). FedAvg devices
    send this delta; drift is not a write and is not in it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written = np.zeros(self.shape, dtype=np.int64)

    def apply_update(self, step_codes: Any, pulses: Any = None) -> int:
        before = self.codes.copy()
        count = super().apply_update(step_codes, pulses)
        self.written += self.codes - before
        return count


@lru_cache(maxsize=16)
def held_out_set(
    dataset: str, classes: tuple[int, ...], angle: float | None, samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` test-split digits of ``classes``, each elastic-deformed once (the stream's
    deformations) and rotated by ``angle`` degrees: a device's held-out set (shared by every device
    and strategy with the same classes and angle)."""
    test = load_dataset(dataset, "test")
    labels = test.labels.numpy()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4]))
    pick = rng.permutation(np.flatnonzero(np.isin(labels, classes)))[:samples]
    images = test.images[torch.from_numpy(pick), 0].numpy()
    pairs = rng.integers(0, len(ELASTIC_PAIRS), size=pick.size)
    out = np.stack([elastic_deform(image, *ELASTIC_PAIRS[p], rng) for image, p in zip(images, pairs, strict=True)])
    out = np.clip(out, 0.0, 1.0)
    if angle:
        out = np.clip(rotate(out, angle, axes=(2, 1), reshape=False, order=1), 0.0, 1.0)
    return torch.from_numpy(out.astype(np.float32)).unsqueeze(1), torch.from_numpy(labels[pick].astype(np.int64))


class DeviceStream:
    """A device's stream (the trainer's ``Stream``): a ``new-user`` scenario (class subset and/or
    rotation) with the device's own drift schedule, scored on :func:`held_out_set`."""

    def __init__(self, config: FleetConfig, index: int) -> None:
        classes, angle = config.device_classes(index), config.device_angle(index)
        options: dict[str, Any] = {"classes": classes}
        if angle is not None:
            options.update(transform="rotate", angle=angle)
        self.scenario: Scenario = make_scenario(
            "new-user",
            dataset=config.dataset,
            samples=config.rounds * config.samples_per_round,
            seed=config.seed * 1000 + index,
            **options,
        )
        self.drift = device_drift(config)
        self.classes, self.angle = classes, angle
        self.config, self.index = config, index

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scenario.batch(start, stop)

    @property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return held_out_set(c.dataset, c.device_test_classes(self.index), self.angle, c.test_samples, c.seed)

    def describe(self) -> dict[str, Any]:
        return {
            **self.scenario.describe(),
            "drift": None if self.drift is None else self.drift.as_dict(),
            "held_out_samples": self.config.test_samples,
            "held_out_classes": list(self.config.device_test_classes(self.index)),
        }


def device_drift(config: FleetConfig) -> DriftSpec | None:
    """The paper's drift schedule (d = 10) with p0 / sigma0 = 10 x ``drift_scale``."""
    if config.drift == "none":
        return None
    level = 10.0 * config.drift_scale
    return DriftSpec(config.drift, p0=level) if config.drift == "digital" else DriftSpec(config.drift, sigma0=level)


def device_rule(config: FleetConfig, strategy: str) -> Any:
    """The device's update rule under ``strategy`` (module docstring)."""
    if strategy == "fedavg-sgd":
        return make_rule("sgd", lr=config.sgd_lr)
    batches = (NEVER, NEVER) if strategy in ROUND_UPDATES else (config.batch_fc, config.batch_conv)
    return make_rule(
        "lowrank",
        rank=config.rank,
        lr=config.lr,
        max_norm=config.max_norm,
        batch_fc=batches[0],
        batch_conv=batches[1],
    )


def load_device_net(source: str | Path) -> torch.nn.Module:
    """The device network: an exported integer program folder (``DeviceNet.from_program``) or a
    model file of :func:`edgetrain.adapt.pretrain.save_model`."""
    path = Path(source)
    if path.is_dir():
        from edgetrain.adapt.device import DeviceNet
        from edgetrain.export.program import IntegerProgram

        return DeviceNet.from_program(IntegerProgram.load(path))
    from edgetrain.adapt.pretrain import load_model

    return load_model(path)[0]


GATE_CHOICES = ("keep", "fleet", "head", "own", "sum", "agree")  # the gate's tie order after "keep"


def sparse_step(step: np.ndarray, x: np.ndarray, fraction: float) -> np.ndarray:
    """A sparse fleet update event (``write_fraction`` f, LowRank's sparse events, docs/fleet.md): of
    the cells with a non-zero step dW_q, only the ceil(f n m) with the largest unrounded step |x|
    keep it (ties by position), the others get 0; f = 1 returns the step unchanged. In place."""
    if fraction < 1.0:
        keep_largest(step, np.broadcast_to(x, step.shape), math.ceil(fraction * step.size))
    return step


def gate_choice(current: float, scores: dict[str, float]) -> str:
    """The acceptance gate's decision: the candidate ("fleet", then "head", "own", "sum", "agree") with the
    highest accuracy on the buffer if it is at least the current weights' (ties go to the fleet),
    else "keep"."""
    best = max(scores.values())
    if best < current:
        return "keep"
    return next(name for name in GATE_CHOICES[1:] if scores.get(name) == best)


@torch.no_grad()
def prediction_accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``net`` on a batch, batch-norm statistics frozen (eval mode, restored after)."""
    net.eval()
    try:
        return float((net(images).argmax(1) == labels).float().mean())
    finally:
        net.train()


@torch.no_grad()
def refresh_statistics(net: torch.nn.Module, images: torch.Tensor) -> None:
    """Replay ``images`` through ``net`` one at a time in training mode without learning: each
    streaming batch-norm takes one EMA step per image (LRT v1 App. E), m <- eta m + (1 - eta) mean(x),
    and nothing else changes (no gradient, no rule update, labels unused)."""
    net.train()
    for image in images:
        net(image.unsqueeze(0))


def pending_factors(state: Any, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A LowRank layer's pending gradient sum as rank-r factors (L, R), and the layer's sum reset:
    the accumulator's factors, or the top-r SVD of a grouped conv's dense sum (zero-padded to r)."""
    if state.acc is not None:
        left, right = state.acc.factors()
        state.acc.reset()
        return left, right
    u, s, vt = np.linalg.svd(state.dense, full_matrices=False)
    k = min(rank, s.size)
    left, right = np.zeros((u.shape[0], rank)), np.zeros((vt.shape[1], rank))
    left[:, :k], right[:, :k] = u[:, :k] * np.sqrt(s[:k]), vt[:k].T * np.sqrt(s[:k])
    state.dense[...] = 0.0
    return left, right


class FleetDevice:
    """Device ``index`` of the fleet under ``strategy`` (module docstring)."""

    def __init__(self, config: FleetConfig, index: int, strategy: str) -> None:
        if config.model is None:
            raise ValueError("the fleet config names no device model; run_fleet prepares one (config.model)")
        self.config, self.index, self.strategy = config, index, strategy
        self.stream = DeviceStream(config, index)
        self.trainer = OnlineTrainer(
            load_device_net(config.model),
            device_rule(config, strategy),
            self.stream,
            seed=config.seed * 1000 + index,
            test_samples=config.test_samples,
            log_every=config.samples_per_round,
        )
        self.sent: dict[str, np.ndarray] = {}  # FedAvg: the delta of the last report
        self.rounds_done = 0
        self.fleet_writes = 0  # cells written by fleet update events
        self.declined = 0  # broadcasts the acceptance gate declined without writing anything
        self.own_writes = 0  # update events where the gate wrote the device's own update instead
        self.own: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # the factors of the last report (RAM)
        self.closed: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # gate_fresh: the report closed early (RAM)
        self.own_norms = FactorNorms()  # RAM too: a device that rejoins starts them afresh
        self.gate: dict[str, Any] | None = None  # the last gate's accuracies and choice
        self.gate_bits = 0  # the broadcast and own factors kept for the gate's window (bits, the most)
        self.step_size = (float("nan"), float("nan"))  # the last broadcast's step: (Frobenius, max) in LSBs
        self.powered_at = 0  # the step the device last powered up at: its RAM (the gate's buffer) starts there
        self.test_history: list[float] = []
        self._track()

    # -- the NVM -----------------------------------------------------------------------------------
    def _track(self) -> None:
        """FedAvg devices record what their writes change (arrays shared with the rule)."""
        if self.strategy not in TRACKED:
            return
        for name, array in list(self.trainer.arrays.items()):
            if not isinstance(array, TrackedNVMArray):
                self.trainer.arrays[name] = TrackedNVMArray.from_state_dict(array.state_dict())

    def _update(self, layer: Any, step_codes: np.ndarray) -> int:
        """One NVM update event W <- clip(W - step) on ``layer``; returns the cells written."""
        array = self.trainer.arrays[layer.name]
        written = array.apply_update(step_codes)
        layer.set_codes(array.codes)
        return written

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {layer.name: tuple(layer.shape2d) for layer in self.trainer.net.weight_layers}

    # -- a round -----------------------------------------------------------------------------------
    def fleet_steps(self, update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The broadcast as a weight-code step per layer (module docstring): federated low-rank
        dW_q = round(eta lr sqrt(R) L R^T / lsb); FedAvg D - round(M) (W - D + round(M) = W - step)."""
        steps = {}
        lr_eff = self.config.fleet_lr * self.config.lr * math.sqrt(self.config.samples_per_round)
        for layer in self.trainer.net.weight_layers:
            if self.strategy in ROUND_UPDATES:
                left, right = decode_factors(layer.name, update)
                x = lr_eff * (left @ right.T) / layer.formats.weight.lsb
                step = np.rint(x).astype(np.int64)
            else:
                mean = update[f"{layer.name}.delta"]
                x = self.sent.get(layer.name, 0) - mean
                step = self.sent.get(layer.name, 0) - np.rint(mean).astype(np.int64)
            steps[layer.name] = sparse_step(step, x, self.config.write_fraction)
        return steps

    def own_steps(self) -> dict[str, np.ndarray] | None:
        """The device's own update of the round it reported (federated low-rank with the gate on, or
        local-round): its factors max-normed like the server's merge, as a step of :meth:`fleet_steps`;
        None if it holds none (gate off, another strategy, or lost with RAM in a dropout)."""
        if not self.own:
            return None
        update: dict[str, np.ndarray] = {}
        for name, factors in self.own.items():
            update.update(encode_factors(name, self.own_norms(name, factors) if self.config.max_norm else factors, 32))
        return self.fleet_steps(update)

    def recent_samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's ring buffer: the last ``gate_samples`` stream samples the device has already
        predicted and learnt from since it last powered up (RAM), never a sample it has not seen."""
        stop = self.trainer.step_count
        start = max(self.powered_at, stop - self.config.gate_samples)
        if start >= stop:
            return torch.empty(0), torch.empty(0, dtype=torch.int64)
        return self.stream.batch(start, stop)

    @property
    def buffer_bits(self) -> int:
        """RAM of the gate's ring buffer: N samples of 8-bit pixels (the network's input grid) and an
        8-bit label each (none on a local device: it gets no broadcast to judge)."""
        if not self.config.gate_samples or self.strategy == "local":
            return 0
        pixels = int(self.stream.test_set[0][0].numel())
        return self.config.gate_samples * (8 * pixels + 8)

    def option_accuracy(self, steps: dict[str, np.ndarray] | None, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Accuracy on the buffer of the current weights (``steps`` None) or of W' = clip(W - step), in
        a copy of the network (no NVM write); with ``bn_refresh`` after replaying the buffer through
        that copy for its batch-norm statistics."""
        net = self.trainer.net
        if steps is None and not self.config.refreshes_statistics:
            return prediction_accuracy(net, images, labels)
        shadow = copy.deepcopy(net)
        if steps is not None:
            for layer in shadow.weight_layers:
                array = self.trainer.arrays[layer.name]
                layer.set_codes(np.clip(array.codes - steps[layer.name], array.fmt.qmin, array.fmt.qmax))
        if self.config.refreshes_statistics:
            refresh_statistics(shadow, images)
        return prediction_accuracy(shadow, images, labels)

    def shadow_accuracy(self, candidates: dict[str, dict[str, np.ndarray]]) -> tuple[float, dict[str, float]]:
        """Accuracy on the ring buffer (:meth:`recent_samples`) of the current weights and of each
        candidate (:meth:`option_accuracy`)."""
        images, labels = self.recent_samples()
        current = self.option_accuracy(None, images, labels)
        return current, {name: self.option_accuracy(steps, images, labels) for name, steps in candidates.items()}

    def write_steps(self, steps: dict[str, np.ndarray]) -> int:
        """One NVM update event per layer W <- clip(W - step), then (``bn_refresh``) the buffer replayed
        for the written weights' batch-norm statistics; returns the cells written."""
        written = sum(self._update(layer, steps[layer.name]) for layer in self.trainer.net.weight_layers)
        if self.config.refreshes_statistics and written:
            refresh_statistics(self.trainer.net, self.recent_samples()[0])
        return written

    def apply(self, update: dict[str, np.ndarray]) -> int:
        """Write the fleet's broadcast as one NVM update event per layer or, with the acceptance gate,
        the best of the broadcast, the device's own update and no write (module docstring); a
        local-round device judges its own update alone. Returns the cells written."""
        self.gate, self.step_size = None, (float("nan"), float("nan"))
        candidates: dict[str, dict[str, np.ndarray]] = {}
        if update:
            candidates["fleet"] = steps = self.fleet_steps(update)
            self.step_size = (
                math.sqrt(sum(float(np.square(step, dtype=np.float64).sum()) for step in steps.values())),
                float(max(np.abs(step).max() for step in steps.values())),
            )
        own = self.own_steps()
        if own is not None:
            candidates["own"] = own
            fleet = candidates.get("fleet")
            if self.config.gate_sum and fleet is not None:  # personalised: own update and broadcast, one event
                summed = {name: own[name] + fleet[name] for name in own}
                candidates["sum"] = {name: sparse_step(s, s, self.config.write_fraction) for name, s in summed.items()}
            if self.config.gate_head and fleet is not None:  # personal head: the fleet's body, own classifier
                last = self.trainer.net.weight_layers[-1].name
                candidates["head"] = {name: own[name] if name == last else fleet[name] for name in own}
            if self.config.gate_agree and fleet is not None:  # personalised: the fleet where it agrees with own
                candidates["agree"] = {
                    name: own[name] + np.where(np.sign(fleet[name]) == np.sign(own[name]), fleet[name], 0)
                    for name in own
                }
        kept = 8 * sum(int(value.nbytes) for value in update.values())
        kept += sum(16 * (left.size + right.size) for left, right in self.own.values())
        self.own = {}
        if not candidates:
            return 0
        choice = next(iter(candidates))  # ungated: the broadcast (a local-round device: its own update)
        if self.config.gate_samples and self.trainer.step_count > self.powered_at:
            current, scores = self.shadow_accuracy(candidates)
            choice = gate_choice(current, scores)
            self.gate = {"current": current, **scores, "choice": choice}
            self.gate_bits = max(self.gate_bits, kept)
        if choice in ("keep", "own"):
            self.sent = {}  # a FedAvg device keeps its own delta D, already written
            if choice == "keep":
                self.declined += 1
                return 0
            self.own_writes += 1
            return self.write_steps(candidates["own"])
        written = self.write_steps(candidates[choice])
        if self.strategy in TRACKED:
            for array in self.trainer.arrays.values():
                array.written[...] = 0  # the fleet update is not this device's own change
        self.sent = {}
        self.fleet_writes += written
        return written

    def learn(self, samples: int) -> None:
        """Predict-then-learn on the next ``samples`` samples of the stream, then score the held-out set.
        With ``gate_fresh`` (round updates) the round's report closes ``gate_samples`` samples before
        the end (:meth:`close_report`); the samples after it start the next report."""
        stop = self.trainer.step_count + samples
        fresh = self.config.gate_fresh and self.strategy in ROUND_UPDATES
        if fresh and samples > self.config.gate_samples:
            self.learn_samples(stop - self.config.gate_samples)
            self.closed = self.close_report()
        self.trainer.run(stop)
        self.test_history.append(self.trainer.tests[-1]["accuracy"])

    def learn_samples(self, stop: int) -> None:
        """Predict-then-learn up to sample ``stop`` of the stream, without scoring the held-out set."""
        images, labels = self.stream.batch(self.trainer.step_count, stop)
        t0, c0 = time.perf_counter(), time.process_time()
        with threadpool_limits(1, user_api="blas"):  # as the trainer's loop: batch-1 products stay on one core
            for image, label in zip(images, labels.tolist(), strict=True):
                self.trainer.learn_sample(image, label)
        self.trainer.seconds += time.perf_counter() - t0
        self.trainer.cpu_seconds += time.process_time() - c0

    def close_report(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """A round-update device's pending gradient sums as rank-r factors per layer, its accumulators
        reset (what :meth:`report` sends and keeps as its own update)."""
        return {name: pending_factors(state, self.config.rank) for name, state in self.trainer.rule.layers.items()}

    def score(self) -> None:
        """Score the held-out set as the device stands (after the last fleet update)."""
        self.test_history.append(self.trainer.test_accuracy())

    def report(self) -> dict[str, np.ndarray]:
        """What the device sends: factors (federated low-rank), its written delta (FedAvg), nothing
        (local, local-round: it keeps its factors for its own update event)."""
        payload: dict[str, np.ndarray] = {}
        if self.strategy in ROUND_UPDATES:
            closed = self.closed or self.close_report()  # gate_fresh: closed before the round's last samples
            self.closed = {}
            for name, factors in closed.items():
                if self.strategy == "federated-lowrank":
                    payload.update(encode_factors(name, factors, self.config.factor_bits))
                if self.config.gate_samples or self.strategy == "local-round":
                    self.own[name] = factors  # kept in RAM until the broadcast arrives (the gate's fallback)
        elif self.strategy in TRACKED:
            for name, array in self.trainer.arrays.items():
                payload[f"{name}.delta"] = array.written.astype(np.int16)
                self.sent[name] = array.written.copy()
                array.written[...] = 0
        self.rounds_done += 1
        return payload

    def metrics(self) -> dict[str, float]:
        """The device's figures so far (JSON numbers)."""
        final = self.trainer.metrics()
        aux = sum(final["aux_memory_bits"].values()) + self.gate_bits + self.buffer_bits
        if self.strategy in TRACKED:
            aux += sum(16 * array.num_cells for array in self.trainer.arrays.values())  # the int16 delta
        return {
            "device": self.index,
            "samples": self.trainer.step_count,
            "online_accuracy": float(self.trainer.online_accuracy),
            "test_accuracy": float(self.test_history[-1]) if self.test_history else float("nan"),
            "max_writes": int(final["max_writes"]),
            "total_writes": int(final["total_writes"]),
            "fleet_update_writes": int(self.fleet_writes),
            "fleet_updates_declined": int(self.declined),
            "fleet_updates_own": int(self.own_writes),
            **{
                f"gate_{key}_accuracy": float("nan") if self.gate is None else float(self.gate.get(key, "nan"))
                for key in ("current", *GATE_CHOICES[1:])
            },
            "gate_choice": -1 if self.gate is None else GATE_CHOICES.index(self.gate["choice"]),
            "update_step_fro_lsb": self.step_size[0],
            "update_step_max_lsb": self.step_size[1],
            "aux_memory_bits": int(aux),
        }

    # -- non-volatile state ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Everything the device keeps across a power cycle, atomically (safetensors)."""
        fleet = {
            "sent": dict(self.sent),
            "written": {n: a.written.copy() for n, a in self.trainer.arrays.items() if isinstance(a, TrackedNVMArray)},
            "rounds_done": self.rounds_done,
            "fleet_writes": self.fleet_writes,
            "declined": self.declined,
            "own_writes": self.own_writes,
            "gate_bits": self.gate_bits,
            "test_history": list(self.test_history),
        }
        save_state({"trainer": self.trainer.state_dict(), "fleet": fleet}, path)

    def restore(self, path: str | Path) -> None:
        """Load a :meth:`save` file (the device rejoining after a dropout)."""
        state = load_state(path)
        self.trainer.load_state_dict(state["trainer"])
        self._track()
        fleet = state["fleet"]
        self.sent = {k: np.asarray(v, dtype=np.int64) for k, v in (fleet.get("sent") or {}).items()}
        for name, written in (fleet.get("written") or {}).items():
            self.trainer.arrays[name].written = np.asarray(written, dtype=np.int64).copy()
        self.rounds_done = int(fleet["rounds_done"])
        self.fleet_writes = int(fleet["fleet_writes"])
        self.declined = int(fleet.get("declined", 0))
        self.own_writes = int(fleet.get("own_writes", 0))
        self.gate_bits = int(fleet.get("gate_bits", 0))
        self.test_history = [float(x) for x in fleet.get("test_history") or []]
        self.powered_at = self.trainer.step_count  # RAM is lost: the gate's buffer starts empty
