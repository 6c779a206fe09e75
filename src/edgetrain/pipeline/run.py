"""The main job: float network -> TQT quantized -> bit-exact integer program -> adapted on NVM -> report.

``run_pipeline(config)`` runs the stages in order, each cached in ``<output.dir>/<stage>/``
(see :mod:`edgetrain.pipeline.stages`): ``pretrain``, ``quantize``, ``export``, ``adapt``, then the
report (always re-rendered, it is cheap).
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edgetrain.data import Dataset, load_dataset
from edgetrain.pipeline.config import PipelineConfig
from edgetrain.pipeline.models import build_model
from edgetrain.pipeline.stages import StageResult, fingerprint, run_stage, write_json_atomic
from edgetrain.training import evaluate, train_float


@dataclass
class PipelineData:
    train: Dataset
    val: Dataset
    test: Dataset


def load_pipeline_data(config: PipelineConfig) -> PipelineData:
    section = config.data
    root = section.root or None
    train = load_dataset(section.dataset, "train", root=root, seed=section.seed)
    val = load_dataset(section.dataset, "val", root=root, seed=section.seed)
    test = load_dataset(section.dataset, "test", root=root, seed=section.seed)
    if section.train_samples:
        train = train.subset(section.train_samples)
        val = val.subset(max(1, section.train_samples // 10))
    if section.test_samples:
        test = test.subset(section.test_samples)
    return PipelineData(train, val, test)


def save_state(module: torch.nn.Module, path: Path) -> None:
    """state_dict via a temporary file and os.replace (loaded back with weights_only=True)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(module.state_dict(), tmp)
    tmp.replace(path)


def load_state(module: torch.nn.Module, path: Path) -> None:
    from edgetrain.training import load_checkpoint

    module.load_state_dict(load_checkpoint(path))


def pretrain_stage(config: PipelineConfig, data: PipelineData, out: Path, log: Callable[[str], None]) -> StageResult:
    key = fingerprint("pretrain", asdict(config.model), asdict(config.data), asdict(config.pretrain))

    def body(directory: Path) -> dict[str, Any]:
        torch.manual_seed(config.data.seed)
        model = build_model(config.model, data.train)
        section = config.pretrain
        result = train_float(
            model, data.train, data.val, epochs=section.epochs, lr=section.lr, batch_size=section.batch_size,
            seed=config.data.seed, checkpoint=directory / "checkpoint.pt",
        )
        save_state(model, directory / "model.pt")
        (directory / "checkpoint.pt").unlink(missing_ok=True)
        accuracy = evaluate(model, data.test)
        log(f"[pretrain] float test accuracy {accuracy:.4f} ({result.seconds:.0f} s)")
        return {"test_accuracy": accuracy, "val_accuracy": result.best_val_accuracy, "seconds": result.seconds,
                "history": result.history}

    return run_stage(out, "pretrain", key, body, log)


def float_model(config: PipelineConfig, data: PipelineData, stage: StageResult) -> torch.nn.Module:
    model = build_model(config.model, data.train)
    load_state(model, stage.directory / "model.pt")
    return model.eval()


def reproduce_command(config_path: str | None) -> str:
    """The command line that reruns this pipeline."""
    if config_path:
        return f"edgetrain run {shlex.quote(config_path)}"
    return "edgetrain " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if len(sys.argv) > 1 else "edgetrain demo"


def run_pipeline(
    config: PipelineConfig, config_path: str | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run every stage (skipping the ones already done for the same inputs) and write the report.

    Returns a summary dict; the report is at ``summary["report_html"]``.
    """
    start = time.perf_counter()
    out = Path(config.output.dir)
    data = load_pipeline_data(config)
    log(f"data: {data.train.name} train {len(data.train)} / val {len(data.val)} / test {len(data.test)}")
    pretrained = pretrain_stage(config, data, out, log)
    summary: dict[str, Any] = {"pretrain": pretrained.summary}
    summary["seconds"] = time.perf_counter() - start
    summary["command"] = reproduce_command(config_path)
    write_json_atomic(out / "summary.json", summary)
    return summary
