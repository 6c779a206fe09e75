"""Where accuracy is lost: per-quantizer SQNR / clipping and per-layer float recovery."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from edgetrain.analysis import analysis_report, analyze
from edgetrain.data import Dataset
from edgetrain.graph import QuantConfig, quantize


def _net_and_data(top: float) -> tuple[nn.Module, Dataset]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(), nn.Linear(8, 3)
    ).eval()
    images = torch.rand(96, 1, 6, 6) * top
    with torch.no_grad():
        net[-1].bias -= net(images).mean(0)  # centred logits: every class present
        labels = net(images).argmax(1)  # the float net is right by construction
    return net, Dataset("toy", "val", images, labels, ("a", "b", "c"))


def test_quantizer_sqnr_and_clipping_follow_their_definitions() -> None:
    net, data = _net_and_data(top=1.5)  # values above 1 clip in an int8 input of threshold 1
    qmodel = quantize(net, data.images[:1], data.images, QuantConfig(), mode="static")
    qmodel.net.input_quant.out_q.set_log2_t(0.0)  # threshold 1: scale 2^-7, codes clip at 127
    analysis = analyze(qmodel, data.images)
    row = next(q for q in analysis.quantizers if q.name == "input_quant.out_q")
    x = data.images.double()
    q = torch.round(x * 128).clamp(-128, 127) / 128
    expected_sqnr = 10 * math.log10(float((x * x).sum()) / float(((q - x) ** 2).sum()))
    assert row.exponent == -7 and math.isclose(row.sqnr_db, expected_sqnr, rel_tol=1e-9)
    assert math.isclose(row.clipped, float((torch.round(x * 128) > 127).double().mean()), rel_tol=1e-12)
    assert row.cumulative_sqnr_db == row.sqnr_db  # nothing upstream of the input quantizer
    # downstream tensors accumulate the error of everything before them
    last = next(q for q in analysis.quantizers if q.name.endswith("out_q") and q.layer == "5")
    assert last.cumulative_sqnr_db < last.sqnr_db
    # the input clips, so auto calibration would choose a larger threshold than the one in use
    assert row.best_exponent > row.exponent


def test_the_layer_that_hurts_recovers_the_most(tmp_path: Path) -> None:
    net, data = _net_and_data(top=1.0)
    qmodel = quantize(net, data.images[:1], data.images, QuantConfig(), mode="static")
    hurt = qmodel.net.get_submodule("3")  # the hidden linear layer: starve its output quantizer
    hurt.out_q.set_log2_t(float(hurt.out_q.log2_t) - 4)  # 1/16 of its calibrated threshold
    table, png = analysis_report(qmodel, data.images, data, tmp_path / "analysis.png")
    analysis = analyze(qmodel, data.images, data)
    best = max(analysis.layers, key=lambda r: r.recovered_pt)
    assert best.layer == "3" and best.recovered_pt > 0
    assert analysis.float_accuracy == 1.0 and analysis.quantized_accuracy < 1.0
    assert png.exists() and png.stat().st_size > 0 and "layer kept in float" in table


def test_the_table_names_the_calibration_in_use() -> None:
    net, data = _net_and_data(top=1.0)
    qmodel = quantize(net, data.images[:1], data.images, QuantConfig(), mode="static")
    stats = {q.name: q for q in analyze(qmodel, data.images).quantizers}
    assert stats["input_quant.out_q"].calibration.startswith("auto:")
    qmodel.net.input_quant.out_q.set_log2_t(0.0)  # by hand: no method to name
    analysis = analyze(qmodel, data.images)
    row = next(line for line in analysis.table().splitlines() if line.startswith("input_quant.out_q"))
    assert "calibrated" in analysis.table().splitlines()[0] and " - " in row and "auto:" not in row
