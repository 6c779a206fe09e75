"""The TQT retraining recipe (Jain et al. 2020; Graffitist ``train_imagenet_tf.py``; docs/fixed-point.md).

- Two Adam groups (beta 0.9/0.999, eps 1e-8): weights lr 1e-6 x0.94 every 3000*(24/B) steps;
  thresholds (parameters named ``*log2_t``) lr 1e-2 x0.5 every 1000*(24/B) steps.
- Weights see the task loss plus the L2 regulariser; thresholds the task loss only (the regulariser
  does not depend on them).
- Batch norm uses batch statistics for the first ``bn_stat_epochs`` epoch(s), then is frozen: every
  submodule with a ``freeze_bn()`` method is told so, plain ``BatchNorm`` modules go to eval mode.
  ``bn_statistics="quantized"`` (opt-in, other numerics) takes those statistics from each layer's own
  quantized-weight convolution instead of a second, float one (:func:`set_bn_statistics`).
- Optional incremental threshold freezing: after ``freeze_start*(24/B)`` steps, every 50 steps,
  freeze the not-yet-frozen threshold with the smallest mean |grad| over those steps whose
  ceil(log2_t) equals ceil of its EMA (decay 0.9999).
- Without labels: ``distill="logits"`` or ``"features"`` trains the quantized model to reproduce the float
  model's outputs (``retrain(..., teacher=float_model)``; :class:`~edgetrain.training.Distillation`),
  so a pretrained net can be retrained on unlabelled images; validation scores agreement with the teacher.
- The best checkpoint on the validation split is kept; progress bar; atomic, resumable checkpoints.
- Data-parallel under ``torchrun`` (``edgetrain.distributed``): DistributedDataParallel over the
  ranks (gloo on CPU, nccl with ``device="cuda"``); each global batch of ``batch_size`` is split over
  the ranks and the gradients averaged, so every rank holds the same weights and thresholds after
  every step; rank 0 writes the checkpoints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from edgetrain.data import Dataset
from edgetrain.distributed import close_distributed, init_distributed
from edgetrain.training import (
    DISTILL_OUTPUTS,
    Distillation,
    Objective,
    Trainer,
    TrainHook,
    TrainResult,
    adam,
    staircase,
)

REFERENCE_BATCH = 24  # Graffitist's decay periods are given for batch size 24
BN_STATISTICS = ("float", "quantized")  # RetrainConfig.bn_statistics
DISTILL = ("none", *DISTILL_OUTPUTS)  # RetrainConfig.distill


@dataclass
class RetrainConfig:
    """Hyper-parameters of the TQT retraining recipe (defaults: Graffitist's ImageNet script)."""

    epochs: int = 5
    batch_size: int = 24
    weight_lr: float = 1e-6
    weight_lr_decay: float = 0.94
    weight_lr_period: int = 3000
    threshold_lr: float = 1e-2
    threshold_lr_decay: float = 0.5
    threshold_lr_period: int = 1000
    weight_decay: float = 0.0
    train_thresholds: bool = True
    bn_stat_epochs: int = 1
    bn_statistics: str = "float"  # "float" (exact definition) | "quantized" (one conv; changed numerics)
    freeze_thresholds: bool = False
    freeze_start: int = 1000
    freeze_every: int = 50
    freeze_ema_decay: float = 0.9999
    eval_every: int | None = None
    seed: int = 0
    device: str = "cpu"  # "cpu" | "cuda" (cuda:LOCAL_RANK under torchrun)
    distill: str = "none"  # "none" (the labels) | "logits" | "features" (a teacher's outputs; no labels)
    distill_temperature: float = 1.0
    distill_label_weight: float = 0.0  # logits only: a CE(labels) + (1 - a) distillation; 0 never reads labels

    def __post_init__(self) -> None:
        if self.bn_statistics not in BN_STATISTICS:
            raise ValueError(f"bn_statistics must be one of {BN_STATISTICS}, got {self.bn_statistics!r}")
        if self.distill not in DISTILL:
            raise ValueError(f"distill must be one of {DISTILL}, got {self.distill!r}")
        if self.distill_label_weight and self.distill != "logits":
            raise ValueError(
                f"distill_label_weight {self.distill_label_weight} mixes the labels into distillation of logits: "
                f"set distill='logits' (it is {self.distill!r})"
            )

    def scaled(self, period: int) -> int:
        """A period given at batch 24, scaled by 24/B."""
        return max(1, round(period * REFERENCE_BATCH / self.batch_size))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, thresholds): thresholds are the parameters named ``*log2_t`` (shared ones once)."""
    weights, thresholds = [], []
    for name, parameter in model.named_parameters():  # named_parameters() yields shared objects once
        (thresholds if name.endswith("log2_t") else weights).append(parameter)
    return weights, thresholds


def set_bn_statistics(model: nn.Module, source: str) -> None:
    """Where every folded batch norm of ``model`` takes its batch statistics before ``freeze_bn()``:
    ``"float"`` (the default: a second, float convolution, as TQT / Graffitist / Jacob et al. define it) or
    ``"quantized"`` (the layer's own quantized-weight convolution divided by the fold factor: one convolution
    per layer instead of two, with other numerics; docs/quantization.md)."""
    if source not in BN_STATISTICS:
        raise ValueError(f"bn_statistics must be one of {BN_STATISTICS}, got {source!r}")
    for module in model.modules():
        if hasattr(module, "set_bn_statistics"):
            module.set_bn_statistics(source)


class FreezeBatchNorm(TrainHook):
    """Batch statistics for the first ``epochs`` epochs, frozen moving statistics afterwards."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if epoch < self.epochs:
            return
        for module in trainer.model.modules():
            if hasattr(module, "freeze_bn"):
                module.freeze_bn()
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


class IncrementalThresholdFreezing(TrainHook):
    """Graffitist's heuristic: freeze one settled threshold every ``every`` steps (at most one)."""

    def __init__(self, thresholds: list[nn.Parameter], start: int, every: int, ema_decay: float) -> None:
        self.thresholds, self.start, self.every, self.ema_decay = thresholds, start, every, ema_decay
        self.ema = torch.stack([t.detach().clone() for t in thresholds]) if thresholds else torch.zeros(0)
        self.grad_sum = torch.zeros(len(thresholds))

    def on_after_backward(self, trainer: Trainer, step: int) -> None:
        for i, t in enumerate(self.thresholds):
            if t.grad is not None:
                self.grad_sum[i] += t.grad.detach().abs()

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        current = torch.stack([t.detach() for t in self.thresholds])
        self.ema = self.ema_decay * self.ema + (1 - self.ema_decay) * current
        if step % self.every:
            return
        if step >= self.start:
            for i in torch.argsort(self.grad_sum / self.every).tolist():
                t = self.thresholds[i]
                if t.requires_grad and math.ceil(float(current[i])) == math.ceil(float(self.ema[i])):
                    t.requires_grad_(False)
                    t.grad = None
                    break
        self.grad_sum.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "grad_sum": self.grad_sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema, self.grad_sum = state["ema"], state["grad_sum"]


class ThresholdHistory(TrainHook):
    """Record every threshold's log2_t every ``every`` steps: ``steps`` and ``values[name]``."""

    def __init__(self, model: nn.Module, every: int = 10) -> None:
        self.every = every
        self.named = [(n, p) for n, p in model.named_parameters() if n.endswith("log2_t")]
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {n: [] for n, _ in self.named}

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        if step % self.every == 0 or step == 1:
            self.steps.append(step)
            for name, parameter in self.named:
                self.values[name].append(float(parameter.detach()))

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "values": {k: list(v) for k, v in self.values.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.values = list(state["steps"]), {k: list(v) for k, v in state["values"].items()}


def recipe_objective(config: RetrainConfig, teacher: nn.Module | None) -> Objective:
    """The recipe's loss: the labels' cross-entropy, or distillation from ``teacher`` (``config.distill``)."""
    if config.distill == "none":
        if teacher is not None:
            raise ValueError(
                "a teacher was given but RetrainConfig.distill is 'none': set distill='logits' or 'features'"
            )
        return Objective()
    if teacher is None:
        raise ValueError(
            f"RetrainConfig.distill={config.distill!r} needs the float model as the teacher: "
            "retrain(qmodel, train, val, config, teacher=float_model)"
        )
    return Distillation(teacher, config.distill, config.distill_temperature, config.distill_label_weight)


def retrain(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None,
    config: RetrainConfig | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    hooks: Sequence[TrainHook] = (),
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Retrain a fake-quantized ``model`` (weights and thresholds) with the TQT recipe.

    With ``config.train_thresholds=False`` the thresholds stay at their calibrated values; ``hooks``
    add observers (e.g. :class:`ThresholdHistory`). With ``config.distill`` ``"logits"`` or ``"features"``
    the loss is the distance to ``teacher``'s outputs (the float model; the labels of ``train`` and ``val``
    are not used) and the best checkpoint is the one that agrees best with the teacher on ``val``.
    Returns the :class:`~edgetrain.training.TrainResult`; ``model`` ends with the best weights.
    Under ``torchrun`` it joins the process group (or uses the one already open) and runs data-parallel
    (module docstring); a group it opened is closed (barrier, then destroy) before it returns.
    """
    cfg = config or RetrainConfig()
    objective = recipe_objective(cfg, teacher)
    opened = init_distributed(cfg.device)
    try:
        return _retrain(model, train, val, cfg, checkpoint, progress, hooks, objective)
    finally:
        if opened:
            close_distributed()


def _retrain(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None,
    cfg: RetrainConfig,
    checkpoint: str | os.PathLike[str] | None,
    progress: bool,
    hooks: Sequence[TrainHook],
    objective: Objective,
) -> TrainResult:
    torch.manual_seed(cfg.seed)
    set_bn_statistics(model, cfg.bn_statistics)
    weights, thresholds = split_parameters(model)
    if not cfg.train_thresholds:
        for t in thresholds:
            t.requires_grad_(False)
    groups = [{"params": weights, "lr": cfg.weight_lr}, {"params": thresholds, "lr": cfg.threshold_lr}]
    optimizer = adam(groups, betas=(0.9, 0.999), eps=1e-8)
    schedules = [
        staircase(cfg.weight_lr_decay, cfg.scaled(cfg.weight_lr_period)),
        staircase(cfg.threshold_lr_decay, cfg.scaled(cfg.threshold_lr_period)),
    ]
    recipe_hooks: list[TrainHook] = [FreezeBatchNorm(cfg.bn_stat_epochs)]
    if cfg.freeze_thresholds and cfg.train_thresholds and thresholds:
        start = cfg.scaled(cfg.freeze_start)
        recipe_hooks.append(IncrementalThresholdFreezing(thresholds, start, cfg.freeze_every, cfg.freeze_ema_decay))
    regularizer = None
    if cfg.weight_decay > 0:
        decayed = [w for w in weights if w.ndim > 1]
        regularizer = lambda: cfg.weight_decay * sum((w * w).sum() for w in decayed)  # noqa: E731
    trainer = Trainer(
        model,
        optimizer,
        train,
        val,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        schedules=schedules,
        hooks=[*recipe_hooks, *hooks],
        regularizer=regularizer,
        eval_every=cfg.eval_every,
        checkpoint=checkpoint,
        progress=progress,
        description="TQT retraining",
        device=cfg.device,
        find_unused_parameters=cfg.freeze_thresholds,  # a frozen threshold gets no gradient
        objective=objective,
    )
    return trainer.run()
