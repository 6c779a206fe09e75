"""The report builder: markdown + self-contained HTML, rendered by headless Chromium."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from edgetrain.report import Report
from edgetrain.report.browser import find_chromium, screenshot


def build(folder: Path) -> tuple[Path, Path]:
    report = Report("Test report")
    report.heading("Accuracy")
    report.paragraph("Float <b>vs</b> quantized.")
    report.table(["model", "accuracy"], [["float", 0.91234], ["int8", 0.9]])
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(np.arange(10), np.arange(10) ** 2, color="tab:red", linewidth=4)
    report.figure(fig, "a red curve")
    plt.close(fig)
    report.code("edgetrain demo", "bash")
    return report.write(folder)


def test_markdown_and_html(tmp_path: Path) -> None:
    md, html = build(tmp_path)
    text = md.read_text()
    assert "| float | 0.9123 |" in text and "![a red curve](figure_01.png)" in text
    assert (tmp_path / "figure_01.png").stat().st_size > 1000
    page = html.read_text()
    assert "data:image/png;base64," in page  # self-contained
    assert "&lt;b&gt;vs&lt;/b&gt;" in page  # text is escaped
    assert "<script" not in page


@pytest.mark.skipif(find_chromium() is None, reason="Chromium not installed (scripts/setup.sh installs it)")
def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    _, html = build(tmp_path)
    png = screenshot(html, tmp_path / "shot.png", width=800, height=900)
    image = plt.imread(png)
    assert image.shape[0] >= 800 and image.shape[1] >= 700
    red = (image[..., 0] > 0.7) & (image[..., 1] < 0.4) & (image[..., 2] < 0.4)
    assert red.sum() > 200  # the embedded plot is actually drawn, not a broken image
