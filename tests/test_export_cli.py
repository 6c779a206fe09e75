"""``edgetrain train / quantize / export / eval`` end to end on the 8x8 digits (fast)."""

from __future__ import annotations

import torch

from edgetrain.cli import main

torch.set_num_threads(1)


def test_cli_train_quantize_export_eval(tmp_path, capsys) -> None:
    f, q = str(tmp_path / "float.pt"), str(tmp_path / "int8.pt")
    assert (
        main(
            [
                "train",
                "--model",
                "mnistnet",
                "--data",
                "digits",
                "--epochs",
                "1",
                "--threads",
                "1",
                "--train-samples",
                "256",
                "--out",
                f,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "quantize",
                "--float",
                f,
                "--mode",
                "static",
                "--calib",
                "64",
                "--train-samples",
                "256",
                "--table",
                "--out",
                q,
            ]
        )
        == 0
    )
    assert "accumulator" in capsys.readouterr().out
    assert main(["export", "--checkpoint", q, "--format", "integer", "--out", str(tmp_path / "prog")]) == 0
    assert main(["export", "--checkpoint", q, "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                q,
                "--float",
                f,
                "--integer",
                str(tmp_path / "prog"),
                "--onnx",
                str(tmp_path / "m.onnx"),
                "--threads",
                "1",
                "--samples",
                "100",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "0 outputs differ from fake-quant" in out and "onnx" in out


def test_cli_errors_are_reported_without_traceback(tmp_path, capsys) -> None:
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert main(["eval", "--checkpoint", str(tmp_path / "bad.pt")]) == 1  # a failure, not a usage error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0]
