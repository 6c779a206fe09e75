"""The steps of a network's life, shared by the CLI commands and the pipeline stages.

``edgetrain quantize`` and the ``quantize`` stage both take their settings from
``edgetrain.pipeline.models.quant_settings``;
``edgetrain eval`` and the ``export`` stage both check the program with :func:`verify_program`;
``edgetrain adapt --program`` and the ``adapt`` stage both run :func:`adapt_device` on a
:class:`~edgetrain.adapt.DeviceNet` built from the exported program.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from edgetrain.adapt import DeviceNet, OnlineTrainer
from edgetrain.atomic import write_json_atomic
from edgetrain.export import IntegerProgram
from edgetrain.graph import QuantizedModel

CHECKPOINT_NAME = "checkpoint.safetensors"
VERIFY_BATCH = 500


@dataclass
class ProgramCheck:
    """The integer program against the fake-quantized model on the same images."""

    samples: int
    mismatches: int  # images whose output vector differs in any element
    integer_top1: np.ndarray
    reference_top1: np.ndarray

    def accuracy(self, labels: np.ndarray) -> float:
        return float((self.integer_top1 == labels[: self.samples]).mean())


@torch.no_grad()
def verify_program(qmodel: QuantizedModel, program: IntegerProgram, images: torch.Tensor) -> ProgramCheck:
    """Run both on ``images`` and count the images whose outputs differ (0 = bit-exact)."""
    qmodel.eval()
    mismatches, reference, integer = 0, [], []
    for start in tqdm(range(0, len(images), VERIFY_BATCH), desc="verify integer program", leave=False):
        batch = images[start : start + VERIFY_BATCH]
        expected = qmodel(batch).double().numpy()
        got = program.run(batch).astype(np.float64)
        mismatches += int(np.any(got != expected, axis=1).sum())
        reference.append(expected.argmax(1))
        integer.append(got.argmax(1))
    return ProgramCheck(len(images), mismatches, np.concatenate(integer), np.concatenate(reference))


def adapt_device(
    trainer: OnlineTrainer,
    out: Path,
    samples: int,
    resume: bool = False,
    test_every: int | None = None,
    checkpoint_every: int | None = None,
    progress: bool = True,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``trainer`` to ``samples`` with atomic checkpoints in ``out`` (continuing the checkpoint when
    ``resume``), then write ``out/log.json`` (``model`` describes the network in its config) and, for a
    :class:`DeviceNet`, the adapted integer program in ``out/program/``. Returns the log."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT_NAME
    if resume:
        trainer.resume(checkpoint)
    log = trainer.run(
        samples, test_every=test_every, checkpoint_every=checkpoint_every, checkpoint=checkpoint, progress=progress
    )
    if model is not None:
        log["config"]["model"] = model
    if isinstance(trainer.net, DeviceNet):
        trainer.net.to_program().save(out / "program")
    write_json_atomic(out / "log.json", log)
    trainer.save(checkpoint)
    return log
