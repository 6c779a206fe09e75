"""``edgetrain adapt`` / ``edgetrain report``: a killed run resumed with --resume ends with the same log
as an uninterrupted one; clear errors for a missing or corrupt checkpoint; plots and table rendered."""

from __future__ import annotations

import json

import pytest
import torch

from edgetrain.adapt.pretrain import build_qnet, save_model
from edgetrain.cli import main

SPEC = {"arch": "lrt-cnn", "width": 4, "hidden": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    torch.manual_seed(0)
    save_model(build_qnet(SPEC), SPEC, path, {"note": "untrained"})
    return path


def adapt_args(model_file, out, *extra: str) -> list[str]:
    return [
        "adapt",
        "--model",
        str(model_file),
        "--scenario",
        "digital-drift",
        "--rule",
        "lowrank",
        "--batch-fc",
        "20",
        "--samples",
        "60",
        "--out",
        str(out),
        "--checkpoint-every",
        "20",
        "--test-every",
        "30",
        "--test-samples",
        "20",
        "--no-progress",
        *extra,
    ]


def without_timing(path) -> dict:
    log = json.loads(path.read_text())
    log.pop("timing")
    return log


def test_killed_run_resumes_to_the_same_log(model_file, tmp_path, interrupt_adaptation_at, capsys):
    assert main(adapt_args(model_file, tmp_path / "whole")) == 0
    interrupt_adaptation_at(45)
    assert main(adapt_args(model_file, tmp_path / "killed")) != 0
    assert "--resume" in capsys.readouterr().err.strip().splitlines()[-1]  # Ctrl-C: one line, how to resume
    interrupt_adaptation_at(None)
    assert not (tmp_path / "killed" / "log.json").exists()
    assert main(adapt_args(model_file, tmp_path / "killed")) == 2  # refuses to overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(adapt_args(model_file, tmp_path / "killed", "--resume")) == 0
    assert without_timing(tmp_path / "killed" / "log.json") == without_timing(tmp_path / "whole" / "log.json")

    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "adapt_digital-drift.png").stat().st_size > 0
    table = (tmp_path / "report.md").read_text()
    assert table.count("| digital-drift | lowrank r4 max-norm | 60 |") == 2


def test_missing_and_corrupt_checkpoints_are_clear_errors(model_file, tmp_path, capsys):
    assert main(adapt_args(model_file, tmp_path / "none", "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    run = tmp_path / "corrupt"
    assert main(adapt_args(model_file, run)) == 0
    (run / "checkpoint.safetensors").write_bytes(b"garbage")
    assert main(adapt_args(model_file, run, "--resume")) == 1  # a failure, not a usage error
    assert "corrupt" in capsys.readouterr().err
    assert main(["adapt", "--model", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty")]) == 2
