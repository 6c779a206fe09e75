"""The bad-input catalogue: each case, the exact fragment of its one-line message, its exit status,
and that nothing already computed was lost or overwritten."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import edgetrain.cli.pipeline as cli_pipeline
import edgetrain.pipeline.run as pipeline_run
from edgetrain.cli import main
from edgetrain.data import Dataset
from edgetrain.pipeline.config import ConfigError, PipelineConfig, load_config
from edgetrain.training import train_float

torch.set_num_threads(1)

CONFIG_CASES = [
    ("[quantize]\nweight_bits = 17", "[quantize] weight_bits must be 4 or 8, got 17"),
    ("[quantize]\nweight_bits = 3", "[quantize] weight_bits must be 4 or 8, got 3"),
    ("[quantize]\nact_bits = 17", "[quantize] act_bits must be 2 to 16, got 17"),
    ("[quantize]\ncalibration_samples = 0", "[quantize] calibration_samples must be >= 1, got 0"),
    ("[quantize]\nweight_lr = 0", "[quantize] weight_lr must be a number > 0, got 0.0"),
    ("[adapt]\nrank = 0", "[adapt] rank must be >= 1, got 0"),
    ("[adapt]\nsamples = -5", "[adapt] samples must be >= 1, got -5"),
    ("[adapt]\nlr = -1", "[adapt] lr must be a number > 0, got -1.0"),
    ("[pretrain]\nlr = nan", "[pretrain] lr must be a number > 0, got nan"),
    ("[pretrain]\nepochs = 0", "[pretrain] epochs must be >= 1, got 0"),
    ("[data]\ntrain_samples = -10", "[data] train_samples must be >= 0 (0: all), got -10"),
    ("[data]\ntest_samples = -1", "[data] test_samples must be >= 0 (0: all), got -1"),
    ("[export]\nverify_samples = -1", "[export] verify_samples must be >= 0 (0: the whole test split), got -1"),
    ('[adapt]\nrules = ["lowrank", "sgdd"]', "[adapt] rules = 'sgdd' is unknown (did you mean 'sgd'?); valid: "),
    ('[adapt]\nrules = ["sgd", "sgd"]', "[adapt] rules lists a rule twice"),
    ('[adapt]\nscenario = "shfit"', "[adapt] scenario = 'shfit' is unknown (did you mean 'shift'?)"),
    ('[adapt]\ndrift = "quantum"', "[adapt] drift = 'quantum' is unknown; valid: '', analog, digital"),
    ('[model]\nname = "resnet"', "[model] name = 'resnet' is unknown"),
    ('[model]\nimport = "no_colon"', "[model] import = 'no_colon' must look like 'package.module:callable'"),
    ('[data]\ndataset = "folder"', '[data] dataset = "folder" needs root'),
    ('[output]\ndir = " "', "[output] dir must be a folder path"),
    ("[adapt]\nrank = 0\nsamples = 0", "config has 2 problems: [adapt] samples must be >= 1, got 0; [adapt] rank"),
]


@pytest.mark.parametrize(("text", "fragment"), CONFIG_CASES)
def test_config_catalogue(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def test_a_typo_in_the_second_rule_deletes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    for stage, name in (("pretrain", "model.pt"), ("adapt/lowrank", "log.json"), ("adapt/sgd", "log.json")):
        (out / stage).mkdir(parents=True)
        (out / stage / name).write_text(f"results of {stage}")
    (out / "report").mkdir()
    (out / "report" / "report.md").write_text("the previous report")
    before = _snapshot(out)
    config = tmp_path / "typo.toml"
    config.write_text(f'[adapt]\nrules = ["lowrank", "sdg"]\n[output]\ndir = "{out}"\n')
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "[adapt] rules = 'sdg' is unknown (did you mean 'sgd'?)" in err and len(err.splitlines()) == 1
    assert _snapshot(out) == before


def _unsupported_op_model(folder: Path, monkeypatch) -> str:
    """A model file whose forward uses torch.fft (no quantized op covers it); returns its import spec."""
    (folder / "gram_net.py").write_text(
        "import torch\n"
        "class Gram(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        x = x.flatten(1)\n"
        "        return self.fc(x * torch.fft.fft(x).real)\n"
        "def build():\n"
        "    return Gram()\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    return "gram_net:build"


def test_unsupported_op_is_found_before_any_stage_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    _unsupported_op_model(tmp_path, monkeypatch)
    out = tmp_path / "run"
    config = tmp_path / "gram.toml"
    sections = '[model]\nimport = "gram_net:build"\n[data]\ndataset = "digits"\n[adapt]\nrules = []\n'
    config.write_text(sections + f'[output]\ndir = "{out}"\n')
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "[model] cannot be quantized" in err and "fft" in err and len(err.splitlines()) == 1
    assert not (out / "pretrain").exists() and not (out / ".pretrain.partial").exists()

    in_float = sections.replace("rules = []", 'rules = ["sgd"]') + "[quantize]\nallow_float = true\n"
    config.write_text(in_float + f'[output]\ndir = "{out}"\n')  # quantizes, but the device runs integers only
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "[adapt] the model cannot be adapted on the device" in err and len(err.splitlines()) == 1
    assert not (out / "pretrain").exists() and not (out / ".pretrain.partial").exists()


def test_api_run_pipeline_checks_the_model_before_any_stage_runs(tmp_path: Path, monkeypatch) -> None:
    config = PipelineConfig()
    config.model.import_path = _unsupported_op_model(tmp_path, monkeypatch)
    config.data.dataset, config.adapt.rules, config.output.dir = "digits", [], str(tmp_path / "run")
    with pytest.raises(ConfigError, match="cannot be quantized.*fft"):
        pipeline_run.run_pipeline(config, log=lambda _: None)
    assert not (tmp_path / "run").exists()  # no stage ran, nothing was written
    config.model.import_path, config.adapt.samples = "", 0
    with pytest.raises(ConfigError, match=r"\[adapt\] samples must be >= 1, got 0"):  # the whole config, too
        pipeline_run.run_pipeline(config, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_out_pointing_at_a_file(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "results.txt"
    blocker.write_text("keep me")
    config = tmp_path / "run.toml"
    config.write_text(f'[output]\ndir = "{blocker}"\n')
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"output folder {blocker} is a file" in err and "disk space" not in err
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["train", "--model", "mnistnet", "--out", "x.pt", "--threads", "0"], "argument --threads: must be > 0, got 0"),
        (["train", "--model", "mnistnet", "--out", "x.pt", "--lr", "-1"], "argument --lr: must be > 0, got -1"),
        (["train", "--model", "mnistnet", "--out", "x.pt", "--lr", "inf"], "argument --lr: must be > 0, got inf"),
        (["train", "--model", "mnistnet", "--out", "x.pt", "--epochs", "two"], "argument --epochs: 'two' is not an"),
        (["eval", "--checkpoint", "q.pt", "--samples", "0"], "argument --samples: must be > 0, got 0"),
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str], fragment: str, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2 and fragment in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    argv = ["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(FileNotFoundError):
        main(["--debug", *argv])


def test_ctrl_c_ends_with_one_line_saying_how_to_resume(tmp_path: Path, monkeypatch, capsys) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_pipeline, "run_config", interrupted)
    assert main(["run", str(tmp_path / "any.toml")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        "edgetrain run: interrupted; run the same command again to resume: finished stages are reused, "
        "the interrupted one continues"
    )


# -- train / quantize / eval on the 8x8 digits ------------------------------------------------------


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "float.pt"
    argv = ["train", "--model", "mnistnet", "--data", "digits", "--epochs", "1", "--threads", "1"]
    assert main([*argv, "--train-samples", "128", "--out", str(out)]) == 0
    return out


def test_train_leaves_no_resume_file_and_a_new_lr_trains_a_new_model(float_checkpoint: Path) -> None:
    assert not Path(str(float_checkpoint) + ".resume").exists()
    first = torch.load(float_checkpoint, weights_only=True)["state_dict"]
    argv = ["train", "--model", "mnistnet", "--data", "digits", "--epochs", "1", "--threads", "1"]
    assert main([*argv, "--train-samples", "128", "--lr", "0.01", "--out", str(float_checkpoint)]) == 0
    second = torch.load(float_checkpoint, weights_only=True)["state_dict"]
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_train_out_pointing_at_a_folder(tmp_path: Path, capsys) -> None:
    argv = ["train", "--model", "mnistnet", "--data", "digits", "--epochs", "1", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err


def test_garbage_onnx_and_integer_out_on_a_file(float_checkpoint: Path, tmp_path: Path, capsys) -> None:
    quantized = tmp_path / "int8.pt"
    argv = ["quantize", "--float", str(float_checkpoint), "--calib", "32", "--train-samples", "64", "--threads", "1"]
    assert main([*argv, "--out", str(quantized)]) == 0
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00garbage, not a protobuf")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(quantized), "--onnx", str(garbage), "--samples", "16"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{garbage} is not a loadable ONNX model" in err and len(err.splitlines()) == 1
    blocker = tmp_path / "program"
    blocker.write_text("keep me")
    assert main(["export", "--checkpoint", str(quantized), "--format", "integer", "--out", str(blocker)]) == 2
    assert "is a file; an integer program is a folder" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"
    program = tmp_path / "prog"
    assert main(["export", "--checkpoint", str(quantized), "--format", "integer", "--out", str(program)]) == 0
    assert "MAC widths observed on 512 training images" in capsys.readouterr().out
    mac_bits = json.loads((program / "manifest.json").read_text())["mac_bits"]
    assert mac_bits and all(
        0 < w["observed"] <= w["worst_case"] and w["observed_samples"] == 512 for w in mac_bits.values()
    )
    assert main(["eval", "--checkpoint", str(quantized), "--integer", str(program), "--samples", "32"]) == 0
    out = capsys.readouterr().out
    assert "accumulator values saturated" in out and "MAC bits worst" in out


# -- the training loop's resume file ----------------------------------------------------------------


def _tiny_data(count: int = 32) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 1, 4, 4, generator=generator)
    return Dataset("tiny", "train", images, torch.randint(0, 3, (count,), generator=generator), ("a", "b", "c"))


def test_resume_file_of_another_lr_is_refused_naming_lr(tmp_path: Path) -> None:
    data, checkpoint = _tiny_data(), tmp_path / "run.resume"
    train_float(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), data, None, 1, 1e-3, 8, checkpoint=checkpoint)
    assert checkpoint.exists()
    with pytest.raises(ValueError, match=r"belongs to another run \(lr \[0.001\] there, \[0.01\] here\)"):
        train_float(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), data, None, 1, 1e-2, 8, checkpoint=checkpoint)


def test_no_best_val_shown_without_a_validation_split(capsys) -> None:
    result = train_float(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), _tiny_data(), None, 1, 1e-3, 8)
    assert "best_val" not in capsys.readouterr().err and math.isnan(result.best_val_accuracy)


def test_a_failed_run_replaces_the_stale_report_with_what_finished(tmp_path: Path, monkeypatch, capsys) -> None:
    from edgetrain.pipeline.stages import fingerprint, run_stage

    out = tmp_path / "run"
    (out / "report").mkdir(parents=True)
    (out / "report" / "report.md").write_text("the report of an earlier config")
    (out / "report" / "figure_01.png").write_bytes(b"an old plot")

    def stops_in_quantize(config, data, out, log):
        run_stage(out, "pretrain", fingerprint("pretrain", {}), lambda d: {"test_accuracy": 0.5}, log)
        run_stage(out, "quantize", fingerprint("quantize", {}), lambda d: 1 / 0, log)

    monkeypatch.setattr(pipeline_run, "_run_stages", stops_in_quantize)
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\ndataset = "digits"\n[adapt]\nrules = []\n[output]\ndir = "{out}"\n')
    assert main(["run", str(config)]) == 1
    assert capsys.readouterr().err.strip() == (
        "edgetrain run: error: ZeroDivisionError: division by zero (edgetrain --debug run ... shows the traceback)"
    )
    report = (out / "report" / "report.md").read_text()
    assert "| pretrain | done |" in report and "| quantize | failed | ZeroDivisionError: division by zero |" in report
    assert "| export | not run |" in report and not (out / "report" / "figure_01.png").exists()


def test_a_failing_browser_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    from edgetrain.report import browser

    monkeypatch.setattr(browser, "find_chromium", lambda: "/bin/false")
    page = tmp_path / "report.html"
    page.write_text("<html></html>")
    with pytest.raises(RuntimeError, match=r"Chromium failed to render .*report.html \(exit 1\): no message$"):
        browser.screenshot(page, tmp_path / "shot.png")
