"""The online (batch-1) trainer: predict, then learn, on weights held in simulated NVM.

docs/adaptation.md; LRT v1 section 6 and App. C. Per sample
``t`` (0-based): drift the NVM arrays when ``t % d == 0`` (the stream's ``DriftSpec``), predict (the
streaming BN statistics take the sample in), score the prediction, backpropagate the quantized loss
gradient ``q_g(softmax(z) - onehot(y))`` with STE through every quantizer, and let the update rule
change biases, BN parameters and (through ``NVMArray.write``) weights.

Metrics (docs/adaptation.md): online accuracy = bias-corrected EMA (beta = 0.999) of predict-before-learn
correctness, ``ema_t / (1 - beta^t)``; test accuracy at checkpoints; writes under both NVM write
models (``edgetrain.nvm.WRITE_MODELS``): ``max_writes`` / ``total_writes`` count code changes (the
default, the figure every summary shows), ``pulse_max_writes`` / ``pulse_total_writes`` count
programming pulses (with the rules' per-pixel conv updates, the LRT paper's activity count); write
density = code-change writes / cells / samples; energy, read and write apart = NVM write energy and one
full read of every array per sample; auxiliary memory per layer (each rule's own formula); samples/s
(wall clock, and per CPU second of the process: what an idle machine would give a single-threaded run).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from edgetrain.adapt.checkpoint import CheckpointError, load_state, save_state
from edgetrain.adapt.executor import batch1_executor
from edgetrain.adapt.qnet import QNet
from edgetrain.adapt.rules import UpdateRule
from edgetrain.nvm import DriftSpec, EnergyModel, NVMArray

HISTORY_KEYS = ("step", "online_accuracy", "max_writes", "total_writes", "pulse_max_writes")


class Stream(Protocol):
    """What the trainer needs from a scenario (``edgetrain.adapt.scenarios.Scenario``)."""

    drift: DriftSpec | None

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    @property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


class OnlineTrainer:
    """Batch-1 predict-then-learn loop of ``net`` under ``rule`` on ``stream``.

    The weight codes of every layer move into an ``NVMArray`` (``energy``, ``endurance``,
    ``stuck_fraction`` of cells stuck at codes drawn by ``stuck_model``); ``seed`` seeds the drift,
    the stuck cells and the rule's random draws. ``log_every``: history
    resolution in samples; ``test_samples``: test images scored at each test point. ``drift_layers``:
    the weight layers the stream's drift acts on (None: all; the others keep their codes, a diagnostic
    of where drift does its damage).
    """

    def __init__(
        self,
        net: QNet,
        rule: UpdateRule,
        stream: Stream,
        seed: int = 0,
        ema_beta: float = 0.999,
        log_every: int = 100,
        test_samples: int = 1000,
        energy: EnergyModel | None = None,
        endurance: float = 1e6,
        stuck_fraction: float = 0.0,
        stuck_model: str = "uniform",
        fetch: int = 500,
        executor: bool = True,
        drift_layers: Collection[str] | None = None,
    ) -> None:
        self.net, self.rule, self.stream = net, rule, stream
        self.drift_layers = None if drift_layers is None else frozenset(drift_layers)
        self.seed = seed
        self.ema_beta = ema_beta
        self.log_every = log_every
        self.test_samples = test_samples
        self.fetch = fetch
        self.arrays = {
            layer.name: NVMArray(
                layer.codes(),
                layer.formats.weight.fmt,
                energy=energy,
                endurance=endurance,
                stuck_fraction=stuck_fraction,
                seed=seed * 100 + i,
                stuck_model=stuck_model,
            )
            for i, layer in enumerate(net.weight_layers)
        }
        for layer in net.weight_layers:
            layer.weight.requires_grad_(False)
            layer.set_codes(self.arrays[layer.name].codes)
            layer.record = rule.learns
        net.set_online(True)
        net.train()
        rule.bind(net, self.arrays, seed)
        self.step_executor = batch1_executor(net) if executor and rule.learns else None
        self.drift_rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
        self.step_count = 0
        self.ema = 0.0
        self.history: dict[str, list[float]] = {key: [] for key in HISTORY_KEYS}
        self.tests: list[dict[str, float]] = []
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    # -- one sample -----------------------------------------------------------------------------
    def _drift(self, step: int) -> None:
        spec = self.stream.drift
        if spec is None or step % spec.period:
            return
        for layer in self.net.weight_layers:
            if self.drift_layers is not None and layer.name not in self.drift_layers:
                continue
            array = self.arrays[layer.name]
            if spec.apply(array, step, self.drift_rng, layer.formats.weight.lsb):
                layer.set_codes(array.codes, array.drifted_cells)

    def learn_sample(self, image: torch.Tensor, label: int) -> bool:
        """Drift, predict, score, learn on one sample; returns whether the prediction was right."""
        step = self.step_count
        self._drift(step)
        executor = self.step_executor
        if executor is None:
            for param in self.net.parameters():
                param.grad = None
        logits = self.net(image.unsqueeze(0)) if executor is None else executor.forward(image.unsqueeze(0))
        correct = int(logits.argmax(1)) == label
        if self.rule.learns:
            grad = torch.softmax(logits.detach().double(), 1).float()
            grad[0, label] -= 1.0
            grid = self.net.weight_layers[-1].formats.grad
            if executor is None:
                logits.backward(grid.quantize(grad))
            else:
                executor.backward(grid.quantize(grad))
            self.rule.update(step)
        self.ema = self.ema_beta * self.ema + (1.0 - self.ema_beta) * float(correct)
        self.step_count = step + 1
        if self.step_count % self.log_every == 0:
            self._record()
        return correct

    # -- metrics --------------------------------------------------------------------------------
    @property
    def online_accuracy(self) -> float:
        """ema_t / (1 - beta^t): the bias-corrected EMA of predict-before-learn correctness."""
        if self.step_count == 0:
            return 0.0
        return self.ema / (1.0 - self.ema_beta**self.step_count)

    @property
    def max_writes(self) -> int:
        """Code-change writes to the most-written weight cell of any layer."""
        return max(array.max_writes for array in self.arrays.values())

    @property
    def total_writes(self) -> int:
        """Code-change writes summed over every weight cell."""
        return sum(array.total_writes for array in self.arrays.values())

    @property
    def pulse_max_writes(self) -> int:
        """Pulses to the most-pulsed cell (``pulse`` write model; for SGD the LRT paper's count)."""
        return max(array.pulse_max_writes for array in self.arrays.values())

    def _record(self) -> None:
        values = (self.step_count, self.online_accuracy, self.max_writes, self.total_writes, self.pulse_max_writes)
        for key, value in zip(HISTORY_KEYS, values, strict=True):
            self.history[key].append(value)

    @torch.no_grad()
    def test_accuracy(self, batch_size: int = 250) -> float:
        """Top-1 accuracy on the first ``test_samples`` test images, BN statistics frozen."""
        images, labels = self.stream.test_set
        images, labels = images[: self.test_samples], labels[: self.test_samples]
        self.net.eval()
        try:
            batches = [images[i : i + batch_size] for i in range(0, len(labels), batch_size)]
            preds = torch.cat([self.net(batch).argmax(1) for batch in batches])
        finally:
            self.net.train()
        return float((preds == labels).float().mean())

    def metrics(self) -> dict[str, Any]:
        """Summary of the run so far (JSON-able); writes under both write models (module docstring)."""
        samples = max(self.step_count, 1)
        arrays = self.arrays.values()
        cells = sum(a.num_cells for a in arrays)
        total = self.total_writes
        write_pj = sum(a.energy_pj["write"] for a in arrays)
        read_pj = self.step_count * sum(a.num_cells * a.fmt.bits * a.energy.read_pj_per_bit for a in arrays)
        aux = self.rule.aux_memory_bits()
        layers = {}
        for layer in self.net.weight_layers:
            array = self.arrays[layer.name]
            layers[layer.name] = {
                "shape": list(layer.shape2d),
                "groups": int(getattr(layer, "groups", 1)),
                "max_writes": array.max_writes,
                "total_writes": array.total_writes,
                "pulse_max_writes": array.pulse_max_writes,
                "pulse_total_writes": array.pulse_total_writes,
                "update_events": array.update_events,
                "aux_memory_bits": aux[layer.name],
            }
        return {
            "samples": self.step_count,
            "online_accuracy": self.online_accuracy,
            "test_accuracy": self.tests[-1]["accuracy"] if self.tests else None,
            "write_model": "code-change",
            "max_writes": self.max_writes,
            "total_writes": total,
            "pulse_max_writes": self.pulse_max_writes,
            "pulse_total_writes": sum(a.pulse_total_writes for a in arrays),
            "write_density": total / cells / samples,
            "energy_pj": {"read": read_pj, "write": write_pj, "total": read_pj + write_pj},
            "projected_lifetime_samples": (
                min(a.projected_lifetime_samples(samples) for a in arrays) if total else math.inf
            ),
            "aux_memory_bits": aux,
            "layers": layers,
        }

    def log(self) -> dict[str, Any]:
        """The run log: config, history, tests, final metrics; wall-clock figures under "timing"."""
        return {
            "config": {
                "stream": self.stream.describe(),
                "rule": self.rule.config(),
                "seed": self.seed,
                "ema_beta": self.ema_beta,
                "test_samples": self.test_samples,
                "nvm": self.nvm_config(),
            },
            "history": {k: list(v) for k, v in self.history.items()},
            "tests": list(self.tests),
            "final": self.metrics(),
            "timing": {
                "seconds": self.seconds,
                "samples_per_second": self.step_count / max(self.seconds, 1e-9),
                "cpu_seconds": self.cpu_seconds,
                "samples_per_cpu_second": self.step_count / max(self.cpu_seconds, 1e-9),
                "executor": "DeviceStep" if self.step_executor is not None else "autograd",
                "int8_product_layers": [
                    layer.name for layer in self.net.weight_layers if getattr(layer, "int8_products", False)
                ],
            },
        }

    def nvm_config(self) -> dict[str, Any]:
        """The simulated memory: energy per bit, endurance, stuck-at fraction and model."""
        array = next(iter(self.arrays.values()))
        return {
            "write_pj_per_bit": array.energy.write_pj_per_bit,
            "read_pj_per_bit": array.energy.read_pj_per_bit,
            "endurance": array.endurance,
            "stuck_fraction": array.stuck_fraction,
            "stuck_model": array.stuck_model,
            "stuck_cells": sum(int(a.stuck_mask.sum()) for a in self.arrays.values()),
        }

    # -- the loop -------------------------------------------------------------------------------
    def run(
        self,
        samples: int,
        test_every: int | None = None,
        checkpoint_every: int | None = None,
        checkpoint: str | Path | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Continue up to ``samples`` samples in total; test every ``test_every`` and at the end,
        checkpoint every ``checkpoint_every`` to ``checkpoint``. Returns :meth:`log`."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=samples, initial=self.step_count, unit="sample", dynamic_ncols=True)
        while self.step_count < samples:
            start = self.step_count
            stop = min(samples, start + self.fetch)
            for every in (test_every, checkpoint_every):
                if every:
                    stop = min(stop, (start // every + 1) * every)
            images, labels = self.stream.batch(start, stop)
            t0, c0 = time.perf_counter(), time.process_time()
            with threadpool_limits(1, user_api="blas"):  # batch-1 NumPy products are too small to share
                for image, label in zip(images, labels.tolist(), strict=True):
                    self.learn_sample(image, label)
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.process_time() - c0
            if test_every and self.step_count % test_every == 0 and self.step_count < samples:
                self.tests.append({"step": self.step_count, "accuracy": self.test_accuracy()})
            if checkpoint_every and checkpoint is not None and self.step_count % checkpoint_every == 0:
                self.save(checkpoint)
            if bar is not None:
                bar.update(self.step_count - start)
                bar.set_postfix(acc=f"{self.online_accuracy:.3f}", max_writes=self.max_writes)
        if bar is not None:
            bar.close()
        if not self.tests or self.tests[-1]["step"] != self.step_count:
            self.tests.append({"step": self.step_count, "accuracy": self.test_accuracy()})
        return self.log()

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "arrays": {name: array.state_dict() for name, array in self.arrays.items()},
            "rule": self.rule.state_dict(),
            "rule_config": self.rule.config(),
            "drift_rng": self.drift_rng.bit_generator.state,
            "step": self.step_count,
            "ema": self.ema,
            "history": {k: list(v) for k, v in self.history.items()},
            "tests": list(self.tests),
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rule_config"] != self.rule.config():
            raise CheckpointError(
                f"the checkpoint was written by rule {state['rule_config']}, this run uses {self.rule.config()}"
            )
        self.net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state["net"].items()})
        for layer in self.net.weight_layers:
            array = NVMArray.from_state_dict(state["arrays"][layer.name])
            self.arrays[layer.name] = array
            layer.set_codes(array.codes)
        self.rule.arrays = self.arrays
        self.rule.load_state_dict(state["rule"])
        self.drift_rng.bit_generator.state = state["drift_rng"]
        self.step_count = int(state["step"])
        self.ema = float(state["ema"])
        self.history = {k: list(state["history"][k]) for k in HISTORY_KEYS}
        self.tests = [dict(t) for t in state["tests"]]
        self.seconds = float(state["seconds"])
        self.cpu_seconds = float(state["cpu_seconds"])

    def save(self, path: str | Path) -> None:
        """Atomic checkpoint of every piece of state (NVM, rule, RNGs, EMA, step, logs)."""
        save_state(self.state_dict(), path)

    def resume(self, path: str | Path) -> None:
        """Load a :meth:`save` checkpoint; a missing or corrupt file raises ``CheckpointError``."""
        state = load_state(path)
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {path} does not match this run: {err}") from err
