"""Per-layer weight precision: QuantConfig.depthwise_weight_bits and layer_weight_bits, in the graph pass,
the integer program, the pipeline config and the CLI."""

import tomllib

import pytest
import torch
from torch import nn

from edgetrain.export import ort_session, to_integer, to_onnx
from edgetrain.graph import QuantConfig, quantize
from edgetrain.models import create_model


@pytest.fixture(scope="module")
def mobilenet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("mobilenetv2-tiny").eval(), torch.rand(16, 1, 28, 28)


def weight_bits(qmodel) -> dict[str, int]:
    return {q.name.removesuffix(".weight_q"): q.bits for q in qmodel.quantizers() if q.role == "weight"}


def test_depthwise_and_pattern_bits_follow_their_precedence(mobilenet, tmp_path) -> None:
    model, x = mobilenet
    depthwise = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1}
    assert depthwise  # mobilenetv2-tiny's 3x3 depthwise convs
    config = QuantConfig(weight_bits=4, depthwise_weight_bits=8, layer_weight_bits={"blocks.2.*": 8, "classifier": 4})
    qmodel = quantize(model, x[:1], x, config, mode="static")
    bits = weight_bits(qmodel)
    for name, b in bits.items():
        if name == "classifier":
            expected = 4  # a pattern beats the last layer's first_last_weight_bits
        elif name.startswith("blocks.2.") or name == "stem.0" or name in depthwise:
            expected = 8
        else:
            expected = 4
        assert b == expected, (name, b)
    program = to_integer(qmodel)
    assert (program.run(x) == qmodel(x).detach().numpy()).all()  # mixed widths stay bit-exact
    path = to_onnx(qmodel, tmp_path / "mixed.onnx", x[:2])
    session = ort_session(path)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert (out.argmax(1) == qmodel(x).detach().numpy().argmax(1)).all()


def test_a_pattern_that_matches_no_layer_names_the_layers(mobilenet) -> None:
    model, x = mobilenet
    with pytest.raises(ValueError, match=r"'block\.9' matches no conv/linear layer.*blocks\.0\.block\.3"):
        quantize(model, x[:1], x, QuantConfig(layer_weight_bits={"block.9": 8}))
    with pytest.raises(ValueError):
        QuantConfig(layer_weight_bits={"stem.0": 1})


def test_config_keys_reach_the_quantizer() -> None:
    from edgetrain.pipeline.config import ConfigError, config_from_dict, validate_config
    from edgetrain.pipeline.models import quant_settings

    raw = {"quantize": {"weight_bits": 4, "depthwise_weight_bits": 8, "layer_weight_bits": {"blocks.0.*": 8}}}
    config = quant_settings(validate_config(config_from_dict(raw)).quantize)
    assert config.depthwise_weight_bits == 8 and config.layer_weight_bits == {"blocks.0.*": 8}
    assert quant_settings(validate_config(config_from_dict({})).quantize).depthwise_weight_bits is None
    reread = config_from_dict(tomllib.loads(validate_config(config_from_dict(raw)).to_toml()))  # the run's config.toml
    assert reread.quantize.layer_weight_bits == {"blocks.0.*": 8} and reread.quantize.depthwise_weight_bits == 8
    with pytest.raises(ConfigError, match="layer_weight_bits must be a table"):
        config_from_dict({"quantize": {"layer_weight_bits": {"blocks.0.*": "8"}}})
    with pytest.raises(ConfigError, match=r"depthwise_weight_bits must be 0 or 4 or 8, got 6"):
        validate_config(config_from_dict({"quantize": {"depthwise_weight_bits": 6}}))


def test_cli_flags_reach_the_model_file(tmp_path, capsys) -> None:
    from edgetrain.cli import build_parser, main
    from edgetrain.modelfile import read_model_file

    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--float", "f", "--out", "q", "--layer-weight-bits", "stem.0=6"])
    assert "expected PATTERN=4 or PATTERN=8" in capsys.readouterr().err
    f, q = str(tmp_path / "float.pt"), str(tmp_path / "int4.pt")
    common = ["--threads", "1", "--train-samples", "64"]
    assert main(["train", "--model", "mnistnet", "--data", "digits", "--epochs", "1", *common, "--out", f]) == 0
    flags = ["--weight-bits", "4", "--layer-weight-bits", "4=8", "--calib", "32", "--table"]
    assert main(["quantize", "--float", f, *flags, *common, "--out", q]) == 0
    assert read_model_file(q, "quantized")["config"]["layer_weight_bits"] == {"4": 8}
    rows = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines() if "weight_q" in line}
    assert rows["4.weight_q"] == "int8" and "int4" in rows.values()
