"""The main job: float network -> TQT quantized -> bit-exact integer program -> adapted on NVM -> report.

``run_pipeline(config)`` checks the whole config against its data and model first (nothing runs or
is written before that), then runs the stages in order, each cached in ``<output.dir>/<stage>/``
(see :mod:`edgetrain.pipeline.stages`): ``pretrain``, ``quantize``, ``export``, ``adapt``, then the
report (always re-rendered, it is cheap).
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetrain.adapt import DeviceNet, OnlineTrainer, make_rule
from edgetrain.adapt.scenarios import make_scenario
from edgetrain.data import Dataset, DataSource
from edgetrain.export import IntegerProgram, ort_session, to_integer, to_onnx
from edgetrain.graph import QuantizedModel, build_quantized_model, quantize
from edgetrain.modelfile import MODEL_FORMAT, read_model_file, save_model_file
from edgetrain.nvm import DriftSpec
from edgetrain.pipeline.config import ConfigError, PipelineConfig, preflight, rule_options, validate_config
from edgetrain.pipeline.models import build_model, data_source, quant_settings, retrain_settings
from edgetrain.pipeline.report import write_report
from edgetrain.pipeline.stages import (
    STATUS_FILE,
    StageError,
    StageResult,
    fingerprint,
    reset_status,
    run_stage,
    write_json_atomic,
    write_status_report,
)
from edgetrain.pipeline.steps import CHECKPOINT_NAME, adapt_device, verify_program
from edgetrain.tqt import ThresholdHistory, retrain
from edgetrain.training import evaluate, train_float

STAGE_NAMES = ("pretrain", "quantize", "export", "adapt")


def planned_stages(config: PipelineConfig) -> list[str]:
    """The stages ``config`` runs: all four, or without ``adapt`` when ``[adapt] rules`` is empty."""
    return [name for name in STAGE_NAMES if name != "adapt" or config.adapt.rules]


@dataclass
class PipelineData:
    train: Dataset
    val: Dataset
    test: Dataset


def load_pipeline_data(config: PipelineConfig) -> PipelineData:
    """The three splits of ``[data]``, preprocessed as it says (the same tensors for every stage)."""
    section = config.data
    source = data_source(section)
    train, val, test = source.load("train"), source.load("val"), source.load("test")
    if section.train_samples:
        train = train.subset(section.train_samples)
        val = val.subset(max(1, section.train_samples // 10))
    if section.test_samples:
        test = test.subset(section.test_samples)
    return PipelineData(train, val, test)


def save_state(config: PipelineConfig, kind: str, module: torch.nn.Module, path: Path) -> None:
    """The stage's model file (``edgetrain.modelfile``: architecture recorded, read without unpickling)."""
    meta = {"model": config.model.import_path or config.model.name, "data": data_source(config.data).as_dict()}
    save_model_file(path, kind, meta, module.state_dict())


def load_state(module: torch.nn.Module, path: Path, kind: str) -> None:
    module.load_state_dict(read_model_file(path, kind)["state_dict"])


def pretrain_stage(config: PipelineConfig, data: PipelineData, out: Path, log: Callable[[str], None]) -> StageResult:
    key = fingerprint("pretrain", MODEL_FORMAT, asdict(config.model), asdict(config.data), asdict(config.pretrain))

    def body(directory: Path) -> dict[str, Any]:
        torch.manual_seed(config.data.seed)
        model = build_model(config.model, data.train)
        section = config.pretrain
        result = train_float(
            model,
            data.train,
            data.val,
            epochs=section.epochs,
            lr=section.lr,
            batch_size=section.batch_size,
            seed=config.data.seed,
            checkpoint=directory / "checkpoint.pt",
        )
        save_state(config, "float", model, directory / "model.pt")
        (directory / "checkpoint.pt").unlink(missing_ok=True)
        accuracy = evaluate(model, data.test)
        log(f"[pretrain] float test accuracy {accuracy:.4f} ({result.seconds:.0f} s)")
        return {
            "test_accuracy": accuracy,
            "val_accuracy": result.best_val_accuracy,
            "seconds": result.seconds,
            "history": result.history,
        }

    return run_stage(out, "pretrain", key, body, log)


def float_model(config: PipelineConfig, data: PipelineData, stage: StageResult) -> torch.nn.Module:
    model = build_model(config.model, data.train)
    load_state(model, stage.directory / "model.pt", "float")
    return model.eval()


def quantize_stage(
    config: PipelineConfig, data: PipelineData, out: Path, pretrained: StageResult, log: Callable[[str], None]
) -> StageResult:
    key = fingerprint("quantize", MODEL_FORMAT, pretrained.fingerprint, asdict(config.quantize))
    section = config.quantize

    def body(directory: Path) -> dict[str, Any]:
        model = float_model(config, data, pretrained)
        calib = data.train.images[: section.calibration_samples]
        static = quantize(model, calib[:1], calib, quant_settings(config.quantize), mode="static")
        summary: dict[str, Any] = {"static_accuracy": evaluate(static, data.test), "retrained": False}
        log(f"[quantize] static INT{section.weight_bits} test accuracy {summary['static_accuracy']:.4f}")
        final, mode = static, "static"
        if section.retrain_epochs > 0:
            recipe = retrain_settings(section)
            train = data.train.subset(section.retrain_samples) if section.retrain_samples else data.train
            qmodel = quantize(model, calib[:1], calib, quant_settings(config.quantize), mode="retrain")
            history = ThresholdHistory(qmodel, every=5)
            teacher = model if recipe.distill != "none" else None
            result = retrain(
                qmodel,
                train,
                data.val,
                recipe,
                checkpoint=directory / "checkpoint.pt",
                hooks=[history],
                teacher=teacher,
            )
            (directory / "checkpoint.pt").unlink(missing_ok=True)
            summary.update(
                retrained=True,
                retrained_accuracy=evaluate(qmodel, data.test),
                retrain_seconds=result.seconds,
                retrain_best_epoch=result.best_epoch,
                recipe=recipe.as_dict(),
                threshold_history={"steps": history.steps, "values": history.values},
            )
            log(f"[quantize] TQT-retrained test accuracy {summary['retrained_accuracy']:.4f}")
            final, mode = qmodel, "retrain"
        save_state(config, "quantized", final, directory / "qmodel.pt")
        summary["mode"] = mode
        summary["quantizers"] = [asdict(q) for q in final.quantizers()]
        return summary

    return run_stage(out, "quantize", key, body, log)


def quantized_model(
    config: PipelineConfig, data: PipelineData, pretrained: StageResult, quantized: StageResult
) -> QuantizedModel:
    """Rebuild the stage's QuantizedModel (graph rewrite only, no calibration) and load its state."""
    model = float_model(config, data, pretrained)
    qmodel = build_quantized_model(
        model, data.train.images[:1], quant_settings(config.quantize), quantized.summary["mode"]
    )
    load_state(qmodel, quantized.directory / "qmodel.pt", "quantized")
    for module in qmodel.modules():
        if hasattr(module, "freeze_bn"):
            module.freeze_bn()
    return qmodel.eval()


def export_stage(
    config: PipelineConfig,
    data: PipelineData,
    out: Path,
    pretrained: StageResult,
    quantized: StageResult,
    log: Callable[[str], None],
) -> StageResult:
    key = fingerprint("export", quantized.fingerprint, asdict(config.export), config.data.test_samples)

    def body(directory: Path) -> dict[str, Any]:
        qmodel = quantized_model(config, data, pretrained, quantized)
        meta = {"model": config.model.import_path or config.model.name, "data": adaptation_dataset(config).as_dict()}
        program = to_integer(qmodel, meta=meta)
        program.run(data.train.images[: config.quantize.calibration_samples])  # observed MAC widths in the manifest
        program.save(directory / "integer")
        program = IntegerProgram.load(directory / "integer")  # verify what was written, not what is in memory
        images = data.test.images[: config.export.verify_samples or len(data.test)]
        labels = data.test.labels[: len(images)].numpy()
        check = verify_program(qmodel, program, images)
        mismatches, reference = check.mismatches, check.reference_top1
        summary: dict[str, Any] = {
            "verified_samples": len(images),
            "integer_mismatches": mismatches,
            "integer_accuracy": check.accuracy(labels),
            "accumulator_saturations": program.stats.saturated_total,
            "mac_bits": program.mac_bits(),
        }
        log(
            f"[export] integer program: {mismatches} mismatching outputs out of {len(images)} (bit-exact: "
            f"{'yes' if mismatches == 0 else 'NO'})"
        )
        if config.export.onnx:
            path = to_onnx(qmodel, directory / "model.onnx", images[:1])
            session = ort_session(path)
            name = session.get_inputs()[0].name
            onnx_top1 = np.concatenate(
                [
                    session.run(None, {name: images[i : i + 500].numpy()})[0].argmax(1)
                    for i in range(0, len(images), 500)
                ]
            )
            summary["onnx_agreement"] = float((onnx_top1 == reference).mean())
            summary["onnx_accuracy"] = float((onnx_top1 == labels).mean())
            log(f"[export] onnxruntime top-1 agreement {summary['onnx_agreement']:.4%}")
        return summary

    return run_stage(out, "export", key, body, log)


def adapt_stage(
    config: PipelineConfig,
    out: Path,
    exported: StageResult,
    log: Callable[[str], None],
) -> StageResult:
    """Each rule adapts the exported integer program itself (``DeviceNet.from_program``); the adapted
    programs land in ``adapt/<rule>/program/``."""
    section = config.adapt
    key = fingerprint("adapt", exported.fingerprint, asdict(section))

    def body(directory: Path) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if section.scenario == "shift":
            options["block_length"] = section.shift_block
        scenario = make_scenario(
            section.scenario, dataset=adaptation_dataset(config), samples=section.samples, seed=section.seed, **options
        )
        if section.drift:
            scenario = dataclasses.replace(scenario, drift=DriftSpec(section.drift))
        program = IntegerProgram.load(exported.directory / "integer")
        results = {}
        for rule_name in section.rules:
            rule = make_rule(rule_name, rule_options(config, rule_name))
            device = DeviceNet.from_program(program)
            trainer = OnlineTrainer(
                device,
                rule,
                scenario,
                seed=section.seed,
                log_every=max(section.samples // 200, 1),
                test_samples=section.test_samples,
            )
            run_dir = directory / rule_name
            resume = (run_dir / CHECKPOINT_NAME).exists()
            log(f"[adapt] {rule_name} on {section.scenario}{' + ' + section.drift + ' drift' if section.drift else ''}")
            run_log = adapt_device(
                trainer,
                run_dir,
                section.samples,
                resume=resume,
                test_every=max(section.samples // 4, 1),
                checkpoint_every=max(section.samples // 10, 1),
                model={"program": str(exported.directory / "integer")},
            )
            (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
            final = run_log["final"]
            results[rule_name] = {
                k: final[k]
                for k in (
                    "online_accuracy",
                    "test_accuracy",
                    "max_writes",
                    "total_writes",
                    "pulse_max_writes",
                    "write_density",
                    "energy_pj",
                    "projected_lifetime_samples",
                    "aux_memory_bits",
                )
            }
            results[rule_name]["samples_per_second"] = run_log["timing"]["samples_per_second"]
            results[rule_name]["seconds"] = run_log["timing"]["seconds"]
            log(
                f"[adapt] {rule_name}: online accuracy {final['online_accuracy']:.3f}, "
                f"max writes per cell {final['max_writes']} (code changes), total {final['total_writes']}"
            )
        return {"scenario": scenario.describe(), "rules": results}

    return run_stage(out, "adapt", key, body, log)


def adaptation_dataset(config: PipelineConfig) -> DataSource:
    """The scenario streams come from the run's own data (any dataset, a user's folder included), with
    the same root and preprocessing as every other stage."""
    return data_source(config.data)


def run_pipeline(
    config: PipelineConfig, command: str | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Check the config, run every stage (skipping the ones already done for the same inputs) and write
    the report.

    Before any stage runs or anything is written: the config is validated whole
    (:func:`~edgetrain.pipeline.config.validate_config`), its data is loaded and :func:`preflight`
    builds and traces the model (every op supported) and, with ``[adapt] rules``, builds the adapting
    device; each raises :class:`~edgetrain.pipeline.config.ConfigError`. The config is then saved as
    ``<output.dir>/config.toml``; ``command`` is the command line the report gives to reproduce the run
    (default: ``edgetrain run <output.dir>/config.toml``). If a stage fails or is interrupted, the
    report says what finished and what did not (``<output.dir>/report/``) and the error propagates.
    Returns a summary dict (``stage_seconds`` / ``stage_cpu_seconds``: wall / CPU time of each stage in
    this run, 0 when reused);
    the report is at ``summary["report_html"]``.
    """
    start = time.perf_counter()
    validate_config(config)
    out = Path(config.output.dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out} is a file; choose a folder (--out) for the stages and the report")
    data = load_pipeline_data(config)
    preflight(config, data.train)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(config.to_toml())
    except OSError as err:
        raise StageError(f"cannot write to the output folder {out}: {err.strerror or err}; choose --out") from err
    reset_status(out)
    try:
        summary = _run_stages(config, data, out, log)
    except BaseException as err:
        if (out / STATUS_FILE).exists():  # at least one stage started
            write_status_report(out, planned_stages(config), err)
        raise
    summary["command"] = command or f"edgetrain run {shlex.quote(str(out / 'config.toml'))}"
    summary["config"] = config.to_dict()
    report_start, report_cpu = time.perf_counter(), time.process_time()
    markdown, html = write_report(summary, config, out)
    summary["stage_seconds"]["report"] = time.perf_counter() - report_start
    summary["stage_cpu_seconds"]["report"] = time.process_time() - report_cpu
    summary["seconds"] = time.perf_counter() - start
    summary["report_md"], summary["report_html"] = str(markdown), str(html)
    write_json_atomic(out / "summary.json", summary)
    return summary


def _run_stages(config: PipelineConfig, data: PipelineData, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The stages in order; the summary of each under its name, and their times under ``stage_seconds``."""
    log(f"data: {data.train.name} train {len(data.train)} / val {len(data.val)} / test {len(data.test)}")
    pretrained = pretrain_stage(config, data, out, log)
    quantized = quantize_stage(config, data, out, pretrained, log)
    exported = export_stage(config, data, out, pretrained, quantized, log)
    stages = [pretrained, quantized, exported]
    if config.adapt.rules:
        stages.append(adapt_stage(config, out, exported, log))
    summary: dict[str, Any] = {stage.name: stage.summary for stage in stages}
    summary["test_images"] = len(data.test)
    summary["stage_seconds"] = {stage.name: stage.seconds for stage in stages}
    summary["stage_cpu_seconds"] = {stage.name: stage.cpu_seconds for stage in stages}
    return summary
