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


def test_quantize_bn_statistics_flag_reaches_retrain_and_the_model_file(tmp_path, capsys, monkeypatch) -> None:
    """``--bn-statistics``: float by default, passed to RetrainConfig, printed and recorded in the model file
    (``recipe``); a value outside float | quantized is a usage error naming both."""
    import pytest

    import edgetrain.cli.quantize as quantize_cli
    from edgetrain.cli import build_parser
    from edgetrain.modelfile import read_model_file

    args = ["quantize", "--float", "f.pt", "--mode", "retrain", "--out", "q.pt"]
    assert quantize_cli.recipe_from_args(build_parser().parse_args(args)).bn_statistics == "float"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*args, "--bn-statistics", "approximate"])
    err = capsys.readouterr().err
    assert "--bn-statistics: invalid choice: 'approximate'" in err and "float" in err and "quantized" in err
    f, q = str(tmp_path / "float.pt"), str(tmp_path / "int8.pt")
    common = ["--threads", "1", "--train-samples", "64"]
    assert main(["train", "--model", "mnistnet", "--data", "digits", "--epochs", "1", *common, "--out", f]) == 0
    seen, real = [], quantize_cli.retrain

    def spy(qmodel, train, val, recipe, **kwargs):
        seen.append(recipe)
        return real(qmodel, train, val, recipe, progress=False, **kwargs)

    monkeypatch.setattr(quantize_cli, "retrain", spy)
    flags = ["--mode", "retrain", "--bn-statistics", "quantized", "--calib", "32", "--batch-size", "32"]
    assert main(["quantize", "--float", f, *flags, *common, "--out", q]) == 0
    assert [recipe.bn_statistics for recipe in seen] == ["quantized"]
    assert "(BN statistics: quantized)" in capsys.readouterr().out
    assert read_model_file(q, "quantized")["recipe"]["bn_statistics"] == "quantized"


def test_quantize_distill_flag_retrains_on_the_float_models_outputs(tmp_path, capsys, monkeypatch) -> None:
    """``--distill logits``: the recipe says so, the float model is the teacher, the result is printed as
    agreement with it and recorded in the model file; an unknown kind is a usage error."""
    import pytest

    import edgetrain.cli.quantize as quantize_cli
    from edgetrain.cli import build_parser
    from edgetrain.modelfile import read_model_file

    args = ["quantize", "--float", "f.pt", "--mode", "retrain", "--out", "q.pt"]
    assert quantize_cli.recipe_from_args(build_parser().parse_args(args)).distill == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*args, "--distill", "soft"])
    assert "--distill: invalid choice: 'soft'" in capsys.readouterr().err
    f, q = str(tmp_path / "float.pt"), str(tmp_path / "int8.pt")
    common = ["--threads", "1", "--train-samples", "64"]
    assert main(["train", "--model", "mnistnet", "--data", "digits", "--epochs", "1", *common, "--out", f]) == 0
    teachers, real = [], quantize_cli.retrain

    def spy(qmodel, train, val, recipe, **kwargs):
        teachers.append(kwargs["teacher"])
        return real(qmodel, train, val, recipe, progress=False, **kwargs)

    monkeypatch.setattr(quantize_cli, "retrain", spy)
    flags = ["--mode", "retrain", "--distill", "logits", "--calib", "32", "--batch-size", "32"]
    assert main(["quantize", "--float", f, *flags, *common, "--out", q]) == 0
    assert len(teachers) == 1 and teachers[0] is not None
    assert "val top-1 agreement with the float model" in capsys.readouterr().out
    assert read_model_file(q, "quantized")["recipe"]["distill"] == "logits"
