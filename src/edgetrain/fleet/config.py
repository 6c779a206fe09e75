"""The fleet's configuration: devices, rounds, strategies, streams, drift and injected faults.

docs/fleet.md. A config is a TOML file (``edgetrain fleet CONFIG``) or the quick flags; both make a
:class:`FleetConfig`, which also travels inside every Flower message as JSON, so a device needs
nothing but the message to build itself.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

STRATEGIES = ("local", "federated-lowrank", "fedavg", "fedavg-sgd")
ABLATIONS = ("local-round",)  # federated low-rank's device, gate and refresh without the fleet (not run by default)
FAULT_KINDS = ("dropout", "corrupt", "silent")
SPLITS = ("classes", "all")
TEST_CLASSES = ("device", "all")
ENGINES = ("simulation", "deployment")


@dataclass(frozen=True)
class Fault:
    """An injected fault: device ``device`` in round ``round`` (0-based).

    ``dropout``: the device fails half-way through the round (no reply) and rejoins the next round
    from its non-volatile state saved after its last completed round. ``corrupt``: the device sends
    NaN factors or deltas (the server rejects them and names the device). ``silent``: the device
    never reports in that round (the server times out on it; deployment engine, or ``round_timeout``).
    """

    kind: str
    device: int
    round: int

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; choose one of: {', '.join(FAULT_KINDS)}")
        if self.device < 0 or self.round < 0:
            raise ValueError(f"fault device and round must be >= 0, got device={self.device}, round={self.round}")


@dataclass(frozen=True)
class FleetConfig:
    """Everything a fleet run needs (docs/fleet.md lists every field).

    Streams: device k sees a ``new-user`` scenario of ``dataset`` seeded ``seed * 1000 + k``:
    ``split="classes"`` gives it ``classes_per_device`` consecutive classes starting at
    ``k * class_stride`` (mod 10), ``split="all"`` every class; its inputs are rotated by
    ``angle + k * angle_step`` degrees (``angle = 0``: not rotated); every device's NVM also drifts
    (``drift``: "digital", "analog" or "none", the paper's schedule with ``p0``/``sigma0`` scaled by
    ``drift_scale``) with its own realisation.

    Fleet step: the federated low-rank broadcast is written with the server step size ``fleet_lr``
    (eta); with ``gate_samples`` = N > 0 every device writes a broadcast (any strategy) only if the
    weights it would give predict the device's last N stream samples (a RAM ring buffer: samples it
    has already learnt from, never later ones) at least as well as its current weights
    (:meth:`edgetrain.fleet.device.FleetDevice.apply`); ``bn_refresh`` (default: on with the gate)
    replays that buffer for the batch-norm statistics of each option before scoring it and of the
    written weights after a write. ``write_fraction`` f < 1 makes every fleet update event (the
    broadcast, the device's own round update, any strategy) sparse as LowRank's ``write_fraction``
    does: per layer only the ceil(f n m) changed cells with the largest unrounded step are written.
    ``gate_head`` adds a personal-head candidate for federated low-rank: the broadcast on every weight
    layer but the classifier (the last), the device's own update there.
    ``gate_fresh`` (federated low-rank and local-round) makes the gate's samples fresh: a device
    closes its round's report ``gate_samples`` samples before the round ends, so the samples the gate
    scores on are in neither its own update nor the broadcast (they go into the next round's report).
    ``merge_rank`` is the rank of the federated low-rank broadcast: the server re-compresses the mean
    of the K devices' rank-r products to that rank (default: r); at K r or more the broadcast is the
    exact mean (more downlink bytes, the uplink unchanged).
    ``test_classes = "all"`` scores each device on all ten classes (rotated like its stream) while
    its stream shows it only its class subset.
    """

    devices: int = 3
    rounds: int = 2
    samples_per_round: int = 100
    strategies: tuple[str, ...] = STRATEGIES
    model: str | None = None  # model file (.safetensors) or exported integer program folder
    arch: dict[str, Any] = field(default_factory=lambda: {"arch": "lrt-cnn", "width": 8, "hidden": 32})
    pretrain_samples: int = 4000
    pretrain_epochs: int = 2
    dataset: str = "mnist"
    split: str = "classes"
    classes_per_device: int = 5
    class_stride: int = 3
    test_classes: str = "device"  # held-out digits of the device's stream classes, or of all ten (its user)
    angle: float = 30.0
    angle_step: float = 0.0
    drift: str = "digital"
    drift_scale: float = 1.0
    rank: int = 4
    merge_rank: int | None = None  # rank of the federated low-rank broadcast (None: rank; >= K rank: the exact mean)
    factor_bits: int = 16  # factors on the link: 16 (float16 + one float32 scale per matrix) or 32 (float32)
    lr: float = 0.01
    max_norm: bool = True
    fleet_lr: float = 1.0  # eta: the federated low-rank broadcast is written as round(eta lr sqrt(R) L R^T / lsb)
    gate_samples: int = 32  # a broadcast is written only if it predicts the last N samples at least as well (0: off)
    gate_sum: bool = False  # federated low-rank: the gate also tries own update + broadcast (one event)
    gate_agree: bool = False  # ... and own + broadcast on the cells where their steps agree in sign
    gate_head: bool = False  # ... and the broadcast with the device's own update on its classifier (last layer)
    gate_fresh: bool = False  # round updates: the report closes gate_samples samples early; the gate scores on those
    write_fraction: float = 1.0  # sparse fleet update events: at most ceil(f n m) cells per layer (1: off)
    bn_refresh: bool | None = None  # replay the gate's buffer for BN statistics (None: on with the gate)
    batch_fc: int = 100
    batch_conv: int = 10
    sgd_lr: float = 0.01
    test_samples: int = 300
    seed: int = 0
    round_timeout: float = 600.0
    faults: tuple[Fault, ...] = ()
    engine: str = "simulation"

    def __post_init__(self) -> None:
        for name in ("devices", "rounds", "samples_per_round", "rank", "batch_fc", "batch_conv", "test_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"fleet {name} must be >= 1, got {getattr(self, name)}")
        unknown = sorted(set(self.strategies) - set(STRATEGIES) - set(ABLATIONS))
        if unknown or not self.strategies:
            raise ValueError(f"unknown fleet strategies {unknown}; choose from: {', '.join(STRATEGIES + ABLATIONS)}")
        if self.merge_rank is not None and int(self.merge_rank) < 1:
            raise ValueError(f"merge_rank must be >= 1 (or unset: the device rank), got {self.merge_rank}")
        if not 0.0 < self.write_fraction <= 1.0:
            raise ValueError(f"write_fraction must be in (0, 1] (1: every changed cell), got {self.write_fraction}")
        if not self.fleet_lr > 0:
            raise ValueError(f"fleet_lr must be > 0, got {self.fleet_lr}")
        if int(self.gate_samples) < 0:
            raise ValueError(f"gate_samples must be >= 0 (0 turns the gate off), got {self.gate_samples}")
        if self.gate_fresh and not 0 < int(self.gate_samples) < int(self.samples_per_round):
            raise ValueError(
                "gate_fresh holds the last gate_samples samples of a round out of its report: it needs "
                f"0 < gate_samples < samples_per_round, got {self.gate_samples} and {self.samples_per_round}"
            )
        if self.bn_refresh is True and not int(self.gate_samples):
            raise ValueError("bn_refresh replays the gate's sample buffer: set gate_samples > 0 or bn_refresh = false")
        if self.factor_bits not in (16, 32):
            raise ValueError(f"factor_bits must be 16 or 32, got {self.factor_bits}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of: {', '.join(SPLITS)}")
        if self.test_classes not in TEST_CLASSES:
            raise ValueError(f"unknown test_classes {self.test_classes!r}; choose one of: {', '.join(TEST_CLASSES)}")
        if self.drift not in ("digital", "analog", "none"):
            raise ValueError(f"drift must be 'digital', 'analog' or 'none', got {self.drift!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of: {', '.join(ENGINES)}")
        if not 1 <= self.classes_per_device <= 10:
            raise ValueError(f"classes_per_device must be in 1..10, got {self.classes_per_device}")
        for fault in self.faults:
            if fault.device >= self.devices or fault.round >= self.rounds:
                raise ValueError(
                    f"fault {fault.kind} names device {fault.device} in round {fault.round}, but the fleet has "
                    f"{self.devices} devices and {self.rounds} rounds"
                )

    @property
    def refreshes_statistics(self) -> bool:
        """Whether devices replay the gate's buffer for batch-norm statistics (``bn_refresh``; None:
        whenever there is a buffer, i.e. the gate is on)."""
        return bool(int(self.gate_samples)) if self.bn_refresh is None else self.bn_refresh

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FleetConfig:
        """A config from a (TOML or JSON) mapping; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fleet config key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        values = dict(data)
        if "strategies" in values:
            values["strategies"] = tuple(values["strategies"])
        if "faults" in values:
            values["faults"] = tuple(Fault(**f) if isinstance(f, dict) else f for f in values["faults"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> FleetConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> FleetConfig:
        """Read a TOML config (top-level keys are the fields, faults a ``[[faults]]`` array of tables)
        or a ``.json`` file of :meth:`to_json`."""
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"fleet config {source} does not exist")
        if source.suffix == ".json":
            return cls.from_json(source.read_text())
        with source.open("rb") as handle:
            try:
                data = tomllib.load(handle)
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"{source} is not valid TOML: {err}") from err
        return cls.from_dict(data)

    def device_classes(self, index: int) -> tuple[int, ...]:
        """The classes device ``index`` sees (all ten for ``split="all"``)."""
        if self.split == "all":
            return tuple(range(10))
        start = index * self.class_stride
        return tuple(sorted({(start + j) % 10 for j in range(self.classes_per_device)}))

    def device_test_classes(self, index: int) -> tuple[int, ...]:
        """The classes of device ``index``'s held-out set: its stream's (``test_classes = "device"``) or
        all ten (``"all"``: the stream shows the device a class subset of a user who writes every digit)."""
        return tuple(range(10)) if self.test_classes == "all" else self.device_classes(index)

    def device_angle(self, index: int) -> float | None:
        """The rotation of device ``index``'s inputs in degrees (None: not rotated)."""
        angle = self.angle + index * self.angle_step
        return angle if angle else None

    def faults_of(self, device: int, round_index: int) -> set[str]:
        return {f.kind for f in self.faults if f.device == device and f.round == round_index}
