"""One network from quantize to adapt on the command line: train -> quantize -> export -> adapt --program
-> eval --program, on the 8x8 digits (fast); a killed adaptation resumes to the identical log and the
identical adapted program; resuming with other settings and --arch mismatches are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetrain.cli import main
from edgetrain.export import IntegerProgram

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    f, q, p = root / "float.pt", root / "int8.pt", root / "program"
    common = ["--threads", "1", "--train-samples", "256"]
    assert main(["train", "--model", "mnistnet", "--data", "digits", "--epochs", "1", *common, "--out", str(f)]) == 0
    assert main(["quantize", "--float", str(f), "--mode", "static", "--calib", "64", *common, "--out", str(q)]) == 0
    assert main(["export", "--checkpoint", str(q), "--format", "integer", "--out", str(p)]) == 0
    return {"float": f, "quantized": q, "program": p}


def adapt_args(program, out, *extra: str) -> list[str]:
    return [
        "adapt",
        "--program",
        str(program),
        "--scenario",
        "digital-drift",
        "--rule",
        "lowrank",
        "--samples",
        "60",
        "--batch-fc",
        "20",
        "--checkpoint-every",
        "20",
        "--test-every",
        "30",
        "--test-samples",
        "50",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def without_timing(path) -> dict:
    log = json.loads(path.read_text())
    log.pop("timing")
    return log


def test_adapt_program_then_eval_program(exported, tmp_path, capsys):
    program = IntegerProgram.load(exported["program"])
    assert program.meta["model"] == "mnistnet" and program.meta["data"]["name"] == "digits"
    out = tmp_path / "run"
    assert main(adapt_args(exported["program"], out)) == 0
    assert "max writes/cell" in capsys.readouterr().out
    log = json.loads((out / "log.json").read_text())
    assert log["config"]["model"]["program"] == str(exported["program"])
    adapted = IntegerProgram.load(out / "program")
    changed = sum(int((adapted.tensors[k] != program.tensors[k]).sum()) for k in program.tensors)
    assert changed > 0
    assert main(["eval", "--program", str(out / "program"), "--samples", "100"]) == 0
    assert "integer top-1" in capsys.readouterr().out


def test_killed_program_run_resumes_to_identical_log_and_program(exported, tmp_path, interrupt_adaptation_at):
    assert main(adapt_args(exported["program"], tmp_path / "whole")) == 0
    interrupt_adaptation_at(45)
    assert main(adapt_args(exported["program"], tmp_path / "killed")) != 0
    interrupt_adaptation_at(None)
    assert not (tmp_path / "killed" / "program").exists()
    assert main(adapt_args(exported["program"], tmp_path / "killed", "--resume")) == 0
    assert without_timing(tmp_path / "killed" / "log.json") == without_timing(tmp_path / "whole" / "log.json")
    whole, killed = (
        IntegerProgram.load(tmp_path / "whole" / "program"),
        IntegerProgram.load(tmp_path / "killed" / "program"),
    )
    assert whole.tensors.keys() == killed.tensors.keys()
    assert all(np.array_equal(whole.tensors[k], killed.tensors[k]) for k in whole.tensors)


def test_resume_with_other_settings_is_refused(exported, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(adapt_args(exported["program"], out)) == 0
    assert main([*adapt_args(exported["program"], out, "--resume"), "--seed", "3"]) != 0
    err = capsys.readouterr().err
    assert "other settings" in err and "seed: 0 -> 3" in err


def test_model_files_record_their_architecture(exported, tmp_path, capsys):
    assert main(["adapt", "--model", str(exported["float"]), "--arch", "resnet-tiny", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a mnistnet, not a resnet-tiny" in err[0]
    assert main(["adapt", "--model", str(exported["quantized"]), "--out", str(tmp_path / "q")]) != 0
    assert "adapt --program" in capsys.readouterr().err
