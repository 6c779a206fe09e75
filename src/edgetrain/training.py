"""The training loop shared by float pretraining and TQT retraining.

One :class:`Trainer` minimises an :class:`Objective` (the labels' cross-entropy by default, or
:class:`Distillation` from a teacher model, which needs no labels) over epochs of seeded mini-batches
with step-wise learning-rate schedules, hooks (batch-norm freezing, threshold freezing), evaluation
on a validation split, best-model selection, a tqdm progress bar and atomic, resumable checkpoints
(``torch.save`` to a temporary file + ``os.replace``; loaded with ``weights_only=True``). A resumed run reproduces the
uninterrupted one exactly: batch order depends only on (seed, epoch) and the RNG state is saved.
Under ``torchrun`` the same loop runs data-parallel (:mod:`edgetrain.distributed`): each rank takes
its share of every global batch, DDP averages the gradients, rank 0 writes the checkpoints.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edgetrain.atomic import torch_save_atomic
from edgetrain.data import Dataset, epoch_batches, num_batches
from edgetrain.distributed import data_parallel, global_sum, rank_share, resolve_device, world

LRSchedule = Callable[[int], float]  # global step -> multiplier of a param group's base lr


def adam(params: Any, lr: float = 1e-3, **options: Any) -> torch.optim.Adam:
    """``torch.optim.Adam`` on the multi-tensor (``foreach``) kernels, the optimizer of every edgetrain trainer:
    the same update as the per-tensor loop (the CPU default) bit for bit, about twice as fast over many
    small tensors, such as a quantized net's scalar thresholds (tests/test_retrain.py)."""
    return torch.optim.Adam(params, lr=lr, foreach=True, **options)


def staircase(decay: float, period: int) -> LRSchedule:
    """lr(step) = lr0 * decay ** floor(step / period) (TQT recipe, docs/fixed-point.md)."""
    if period < 1:
        raise ValueError(f"decay period must be >= 1 step, got {period}")
    return lambda step: decay ** (step // period)


class TrainHook:
    """Callbacks of :class:`Trainer`; override what you need. Hook state goes in ``state_dict``."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def on_after_backward(self, trainer: Trainer, step: int) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every submodule's previous mode is restored afterwards
    (so a batch-norm layer frozen in eval mode during training stays frozen)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


@torch.no_grad()
def outputs(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``model(images)`` in eval mode, batch by batch on the model's device, gathered on the CPU."""
    device = next(model.parameters(), images).device
    with eval_mode(model):
        return torch.cat(
            [model(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
        )


def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Arg-max class of every image (:func:`outputs`)."""
    return outputs(model, images, batch_size).argmax(1)


def evaluate(model: nn.Module, data: Dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    return float((predict(model, data.images, batch_size) == data.labels).float().mean())


class Objective:
    """What a :class:`Trainer` minimises and how it scores the validation split (higher is better).

    The default: the cross-entropy of the labels, scored by top-1 accuracy (``val_accuracy``)."""

    name = "labels"
    metric = "val_accuracy"

    def to(self, device: torch.device) -> None:
        """Move what the objective holds (a teacher model) to the training device."""

    def loss(
        self, out: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """The batch's loss (``reduction`` ``"mean"`` or ``"sum"`` over the samples) of the model's ``out``."""
        return F.cross_entropy(out, labels, reduction=reduction)

    def score(self, model: nn.Module, data: Dataset) -> float:
        return evaluate(model, data)


DISTILL_OUTPUTS = ("logits", "features")


class Distillation(Objective):
    """Train a model to reproduce a ``teacher``'s outputs on the same images.

    - ``outputs="logits"``: ``T^2 KL(softmax(t / T) || softmax(s / T))`` per sample (Hinton et al. 2015),
      scored by top-1 agreement with the teacher (``val_agreement``). With ``label_weight`` a > 0 the loss
      is ``a CE(s, y) + (1 - a) T^2 KL`` (knowledge distillation beside the labels, as in quantization-aware
      distillation) and the score is top-1 accuracy on the labels (``val_accuracy``);
    - ``outputs="features"``: ``1 - cos(s, t)`` per sample (the outputs flattened), scored by the mean
      cosine similarity (``val_cosine``): for embedders and feature extractors.

    The teacher runs in eval mode without gradients (its modes are restored); it is typically the float
    model that was quantized, so quantization-aware retraining needs only unlabelled images (a = 0: the
    labels are never read).
    """

    def __init__(
        self, teacher: nn.Module, outputs: str = "logits", temperature: float = 1.0, label_weight: float = 0.0
    ) -> None:
        if outputs not in DISTILL_OUTPUTS:
            raise ValueError(f"distillation outputs must be one of {DISTILL_OUTPUTS}, got {outputs!r}")
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        if not 0.0 <= label_weight <= 1.0 or (label_weight and outputs != "logits"):
            raise ValueError(f"label_weight must be in [0, 1], and 0 for features (got {label_weight} for {outputs})")
        self.teacher, self.outputs = teacher, outputs
        self._scored: tuple[torch.Tensor, torch.Tensor] | None = None  # (validation images, teacher outputs)
        self.temperature, self.label_weight = temperature, label_weight
        self.name = f"distill-{outputs}" + (f"-T{temperature:g}-a{label_weight:g}" if outputs == "logits" else "")
        self.metric = "val_accuracy" if label_weight else "val_agreement" if outputs == "logits" else "val_cosine"

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)

    def loss(
        self, out: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        with torch.no_grad(), eval_mode(self.teacher):
            target = self.teacher(images)
        if target.shape != out.shape:
            raise ValueError(
                f"the teacher's outputs are {tuple(target.shape)}, the model's {tuple(out.shape)}: "
                "distill from the float model that was quantized (same outputs)"
            )
        if self.outputs == "logits":
            t = self.temperature
            per_sample = (
                F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(target / t, 1), reduction="none", log_target=True)
                .sum(1)
                .mul(t * t)
            )
            if self.label_weight:
                a = self.label_weight
                per_sample = a * F.cross_entropy(out, labels, reduction="none") + (1 - a) * per_sample
        else:
            per_sample = 1 - F.cosine_similarity(out.flatten(1), target.flatten(1))
        return per_sample.sum() if reduction == "sum" else per_sample.mean()

    def score(self, model: nn.Module, data: Dataset) -> float:
        if self.label_weight:
            return evaluate(model, data)
        if self._scored is None or self._scored[0] is not data.images:  # the teacher's answers, once per split
            self._scored = (data.images, outputs(self.teacher, data.images))
        student, teacher = outputs(model, data.images), self._scored[1]
        if self.outputs == "logits":
            return float((student.argmax(1) == teacher.argmax(1)).float().mean())
        return float(F.cosine_similarity(student.flatten(1), teacher.flatten(1)).mean())


@dataclass
class TrainResult:
    best_val_accuracy: float  # the objective's best validation score (top-1 accuracy for labels)
    best_epoch: float  # epochs (fractional) at which the best checkpoint was taken
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(  # torch's own message suggests weights_only=False: not advice to pass on
            f"checkpoint {path} is corrupt or not an edgetrain checkpoint ({type(err).__name__}); "
            "delete it to start over"
        ) from err


class Trainer:
    """Seeded mini-batch training with schedules, hooks, best-on-validation and resumable checkpoints."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train: Dataset,
        val: Dataset | None,
        *,
        epochs: int,
        batch_size: int,
        seed: int = 0,
        schedules: Sequence[LRSchedule] | None = None,
        hooks: Sequence[TrainHook] = (),
        regularizer: Callable[[], torch.Tensor] | None = None,
        eval_every: int | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        progress: bool = True,
        description: str = "train",
        device: str | torch.device = "cpu",
        find_unused_parameters: bool = False,
        objective: Objective | None = None,
    ) -> None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if schedules is not None and len(schedules) != len(optimizer.param_groups):
            raise ValueError("give one schedule per optimizer parameter group")
        self.model, self.optimizer, self.train, self.val = model, optimizer, train, val
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.schedules = list(schedules) if schedules else [lambda step: 1.0] * len(optimizer.param_groups)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.hooks = list(hooks)
        self.regularizer = regularizer
        self.steps_per_epoch = num_batches(len(train), batch_size)
        self.eval_every = eval_every or self.steps_per_epoch
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress
        self.description = description
        self.step = 0
        self.best_val = -math.inf
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self.running_loss = math.nan  # EMA (0.98) of the task loss, for display and the history
        self.objective = objective or Objective()
        self.rank, self.world_size = world()
        last_batch = len(train) % batch_size or batch_size
        if self.world_size > min(batch_size, last_batch):
            raise ValueError(
                f"{self.world_size} ranks need every batch to hold at least {self.world_size} samples "
                f"(batch_size {batch_size}, last batch {last_batch}); change batch_size or the training-set size"
            )
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.objective.to(self.device)
        self.forward_model = data_parallel(self.model, self.device, find_unused_parameters)
        # what a checkpoint must match to be resumed by this run: everything that determines the result
        self.signature = {
            "dataset": train.name,
            "train_samples": len(train),
            "batch_size": batch_size,
            "epochs": epochs,
            "seed": seed,
            "lr": self.base_lrs,
            "objective": self.objective.name,
        }

    # -- checkpointing -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "best_state": self.best_state or {},
            "history": self.history,
            "running_loss": self.running_loss,
            "hooks": [hook.state_dict() for hook in self.hooks],
            "rng": torch.get_rng_state(),
            "signature": self.signature,
            "requires_grad": {n: p.requires_grad for n, p in self.model.named_parameters()},
        }

    def _resume(self, state: dict[str, Any]) -> None:
        saved = state.get("signature")
        if saved != self.signature:
            saved = saved if isinstance(saved, dict) else {}
            differences = ", ".join(
                f"{key} {saved.get(key, '(unset)')} there, {value} here"
                for key, value in self.signature.items()
                if saved.get(key) != value
            )
            raise ValueError(
                f"checkpoint {self.checkpoint} belongs to another run ({differences}); "
                "use another output path or delete it to start over"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(state["requires_grad"].get(name, parameter.requires_grad))
            for hook, hook_state in zip(self.hooks, state["hooks"], strict=True):
                hook.load_state_dict(hook_state)
            self.step, self.best_val, self.best_step = state["step"], state["best_val"], state["best_step"]
            self.best_state = state["best_state"] or None
            self.history = list(state["history"])
            self.running_loss = state["running_loss"]
            torch.set_rng_state(state["rng"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise ValueError(
                f"checkpoint {self.checkpoint} does not match this model/run ({err}); "
                "use another checkpoint path or delete it to start over"
            ) from err

    # -- training --------------------------------------------------------------------------------
    def _set_lr(self) -> None:
        for group, base, schedule in zip(self.optimizer.param_groups, self.base_lrs, self.schedules, strict=True):
            group["lr"] = base * schedule(self.step)

    def _validate(self, loss: float) -> None:
        record = {"step": float(self.step), "epoch": self.step / self.steps_per_epoch, "loss": loss}
        if self.val is not None:
            score = self.objective.score(self.model, self.val)
            record[self.objective.metric] = score
            if score > self.best_val:
                self.best_val, self.best_step = score, self.step
                self.best_state = copy.deepcopy(self.model.state_dict())
        self.history.append(record)
        if self.checkpoint and self.rank == 0:
            torch_save_atomic(self._state(), self.checkpoint)

    def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The objective's mean loss over the batch; with N ranks, (N / B) x the sum over this rank's share,
        so that DDP's gradient average is the gradient of the global batch's mean (module docstring)."""
        if self.world_size == 1:
            images, labels = images.to(self.device), labels.to(self.device)
            return self.objective.loss(self.forward_model(images), images, labels)
        share, share_labels = rank_share(images, labels, self.rank, self.world_size)
        share, share_labels = share.to(self.device), share_labels.to(self.device)
        summed = self.objective.loss(self.forward_model(share), share, share_labels, reduction="sum")
        return summed * (self.world_size / len(labels))

    def run(self) -> TrainResult:
        """Train (resuming from ``checkpoint`` if it exists); load the best weights at the end."""
        if self.checkpoint and self.checkpoint.exists():
            self._resume(load_checkpoint(self.checkpoint))
        start = time.perf_counter()
        total = self.epochs * self.steps_per_epoch
        show = self.progress and self.rank == 0
        bar = tqdm(total=total, initial=self.step, desc=self.description, disable=not show, leave=False)
        while self.step < total:
            epoch, first_batch = divmod(self.step, self.steps_per_epoch)
            self.model.train()
            for hook in self.hooks:
                hook.on_epoch_start(self, epoch)
            for images, labels in epoch_batches(
                self.train.images, self.train.labels, self.batch_size, self.seed, epoch, first_batch
            ):
                self._set_lr()
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._loss(images, labels)
                total_loss = loss + self.regularizer() if self.regularizer else loss
                total_loss.backward()
                for hook in self.hooks:
                    hook.on_after_backward(self, self.step)
                self.optimizer.step()
                self.step += 1
                for hook in self.hooks:
                    hook.on_step_end(self, self.step)
                value = float(global_sum(loss.detach()) / self.world_size)  # the global batch's mean loss
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"loss became {value} at step {self.step}: lower the learning rate or check the data"
                    )
                previous = self.running_loss
                self.running_loss = value if math.isnan(previous) else 0.98 * previous + 0.02 * value
                bar.update(1)
                shown = {"loss": f"{self.running_loss:.3f}"}
                if self.val is not None and self.history:  # no validation split: no best_val to show
                    shown["best_val"] = f"{max(self.best_val, 0):.4f}"
                bar.set_postfix(shown)
                if self.step % self.eval_every == 0 or self.step == total:
                    self._validate(self.running_loss)
        bar.close()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        return TrainResult(
            best_val_accuracy=self.best_val if self.val is not None else math.nan,
            best_epoch=self.best_step / self.steps_per_epoch,
            steps=self.step,
            seconds=time.perf_counter() - start,
            history=self.history,
        )


def train_float(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Float pretraining: Adam, cosine learning-rate decay to 0, best epoch on ``val`` kept."""
    torch.manual_seed(seed)
    optimizer = adam(model.parameters(), lr=lr)
    total = epochs * num_batches(len(train), batch_size)
    cosine = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    trainer = Trainer(
        model,
        optimizer,
        train,
        val,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        schedules=[cosine],
        checkpoint=checkpoint,
        progress=progress,
        description="float training",
    )
    return trainer.run()
