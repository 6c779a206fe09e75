"""Pipeline config validation and cached stages (issue: the main job)."""

import json
from pathlib import Path

import pytest

from edgetrain.cli.pipeline import demo_config, fallback_to_digits
from edgetrain.pipeline.config import ConfigError, PipelineConfig, config_from_dict, load_config, validate_config
from edgetrain.pipeline.stages import StageError, fingerprint, run_stage


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[model]\nimport = "mypkg.nets:build"\n[pretrain]\nepochs = 3\nlr = 1\n[adapt]\nrules = ["sgd"]\n')
    config = load_config(path)
    assert config.model.import_path == "mypkg.nets:build"
    assert config.pretrain.epochs == 3 and config.pretrain.lr == 1.0 and isinstance(config.pretrain.lr, float)
    assert config.adapt.rules == ["sgd"]
    assert config.quantize.weight_bits == PipelineConfig().quantize.weight_bits


def test_round_trip_through_toml(tmp_path: Path) -> None:
    config = PipelineConfig()
    config.adapt.samples = 123
    path = tmp_path / "again.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"modle": {}}, "unknown section \\[modle\\] \\(did you mean 'model'\\?\\)"),
        ({"pretrain": {"epoch": 2}}, "unknown key 'epoch' in \\[pretrain\\] \\(did you mean 'epochs'\\?\\)"),
        ({"pretrain": {"epochs": "two"}}, "\\[pretrain\\] epochs must be int"),
        ({"pretrain": {"epochs": True}}, "must be int"),
        ({"adapt": {"rules": "sgd"}}, "list of strings"),
        ({"data": 3}, "must be a table"),
    ],
)
def test_config_errors(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\nname = 1")
    with pytest.raises(ConfigError, match="not valid"):
        load_config(broken)


def test_stage_runs_once_and_reruns_when_inputs_change(tmp_path: Path) -> None:
    calls: list[str] = []

    def body(directory: Path) -> dict:
        calls.append(directory.name)
        (directory / "out.txt").write_text("x")
        return {"value": len(calls)}

    logs: list[str] = []
    first = run_stage(tmp_path, "stage", fingerprint("a"), body, logs.append)
    again = run_stage(tmp_path, "stage", fingerprint("a"), body, logs.append)
    assert not first.skipped and again.skipped and again.summary == {"value": 1}
    changed = run_stage(tmp_path, "stage", fingerprint("b"), body, logs.append)
    assert not changed.skipped and changed.summary == {"value": 2}
    (tmp_path / "stage" / "out.txt").unlink()  # an output went missing: the stage is invalid
    assert not run_stage(tmp_path, "stage", fingerprint("b"), body, logs.append).skipped
    assert len(calls) == 3


def test_interrupted_stage_runs_again_and_keeps_its_checkpoint(tmp_path: Path) -> None:
    def crash(directory: Path) -> dict:
        (directory / "checkpoint.pt").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "stage", "k", crash, lambda _: None)
    assert not (tmp_path / "stage" / "stage.json").exists()
    seen = {}

    def resume(directory: Path) -> dict:
        seen["checkpoint"] = (directory / "checkpoint.pt").read_text()
        return {}

    run_stage(tmp_path, "stage", "k", resume, lambda _: None)
    assert seen["checkpoint"] == "partial"
    assert json.loads((tmp_path / "stage" / "stage.json").read_text())["fingerprint"] == "k"


def test_read_only_output_folder(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        blocked = tmp_path / "file-not-folder"
        blocked.write_text("")  # root ignores permissions; a file where a folder should be fails for anyone
        with pytest.raises(StageError, match="cannot create the output folder"):
            run_stage(blocked, "stage", "k", lambda d: {}, lambda _: None)
    else:
        tmp_path.chmod(0o500)
        try:
            with pytest.raises(StageError, match="cannot create the output folder"):
                run_stage(tmp_path, "stage", "k", lambda d: {}, lambda _: None)
        finally:
            tmp_path.chmod(0o700)


def test_disk_full_during_a_stage_is_a_clear_cli_error(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno

    import edgetrain.cli.pipeline as cli_pipeline
    from edgetrain.cli import main

    def full_disk(config, command):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "quantize" / "checkpoint.pt"))

    monkeypatch.setattr(cli_pipeline, "run_pipeline", full_disk)
    path = tmp_path / "run.toml"
    path.write_text(PipelineConfig().to_toml())
    assert main(["run", str(path)]) == 1  # a failure, not a usage error
    message = capsys.readouterr().err
    assert "No space left on device" in message and "checkpoint.pt" in message
    assert "Free disk space" in message and "reused" in message and len(message.strip().splitlines()) == 1


def test_the_demo_config_is_valid_and_its_digits_fallback_scores_the_whole_test_split() -> None:
    config = validate_config(demo_config("runs/x"))
    assert config.data.test_samples == 2000 and config.export.verify_samples == 0  # every figure on 2000 images
    assert config.adapt.rules == ["lowrank", "sgd-sr", "bias-only", "inference"]  # fair SGD and no-adaptation baselines
    fallback = validate_config(fallback_to_digits(demo_config("runs/x")))
    assert (fallback.data.dataset, fallback.data.test_samples, fallback.adapt.rules) == ("digits", 0, [])


def quantize_stage_with_spy(tmp_path: Path, monkeypatch, quantize_keys: dict) -> tuple[list[tuple], object]:
    """Run the pipeline's quantize stage on 64 digits with ``[quantize]`` keys, recording every
    ``retrain(...)`` call as (recipe, kwargs); returns (calls, the stage result)."""
    from edgetrain.pipeline import run as pipeline_run
    from edgetrain.pipeline.models import build_model
    from edgetrain.pipeline.stages import StageResult

    raw = {
        "data": {"dataset": "digits", "train_samples": 64, "test_samples": 32},
        "quantize": {"calibration_samples": 32, "batch_size": 32, **quantize_keys},
    }
    config = validate_config(config_from_dict(raw))
    data = pipeline_run.load_pipeline_data(config)
    (tmp_path / "pretrain").mkdir()
    pipeline_run.save_state(config, "float", build_model(config.model, data.train), tmp_path / "pretrain" / "model.pt")
    pretrained = StageResult("pretrain", "0" * 16, {}, tmp_path / "pretrain", False)
    calls, real = [], pipeline_run.retrain

    def spy(qmodel, train, val, recipe, **kwargs):
        calls.append((recipe, kwargs))
        return real(qmodel, train, val, recipe, progress=False, **kwargs)

    monkeypatch.setattr(pipeline_run, "retrain", spy)
    return calls, pipeline_run.quantize_stage(config, data, tmp_path, pretrained, lambda _: None)


def test_bn_statistics_key_is_validated_and_reaches_the_retrain_recipe(tmp_path: Path, monkeypatch) -> None:
    """``[quantize] bn_statistics``: checked by name, passed to RetrainConfig by the quantize stage and
    recorded in the stage's inputs (stage.json) and summary (the recipe)."""
    from edgetrain.pipeline.models import retrain_settings

    assert PipelineConfig().quantize.bn_statistics == "float"
    unknown = r"\[quantize\] bn_statistics = 'quantised' is unknown \(did you mean 'quantized'\?\); valid: float, quant"
    with pytest.raises(ConfigError, match=unknown):
        validate_config(config_from_dict({"quantize": {"bn_statistics": "quantised"}}))
    assert retrain_settings(PipelineConfig().quantize).bn_statistics == "float"
    calls, result = quantize_stage_with_spy(tmp_path, monkeypatch, {"bn_statistics": "quantized"})
    assert [recipe.bn_statistics for recipe, _ in calls] == ["quantized"]
    assert result.summary["recipe"]["bn_statistics"] == "quantized"
    assert json.loads((tmp_path / "quantize" / "stage.json").read_text())["inputs"]["bn_statistics"] == "quantized"


def test_distill_key_is_validated_and_gives_the_quantize_stage_a_teacher(tmp_path: Path, monkeypatch) -> None:
    """``[quantize] distill``: checked by name; the quantize stage retrains on the float model's logits
    (the pretrained model as the teacher) and records the recipe."""
    with pytest.raises(ConfigError, match=r"\[quantize\] distill = 'logit' is unknown \(did you mean 'logits'\?\)"):
        validate_config(config_from_dict({"quantize": {"distill": "logit"}}))
    calls, result = quantize_stage_with_spy(tmp_path, monkeypatch, {"distill": "logits"})
    assert [(recipe.distill, kwargs["teacher"] is not None) for recipe, kwargs in calls] == [("logits", True)]
    assert result.summary["recipe"]["distill"] == "logits"
