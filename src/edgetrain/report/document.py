"""A small report builder: the same content written as ``report.md`` (with PNG files beside it)
and as a self-contained ``report.html`` (PNG plots embedded as base64, inline CSS, no scripts).

Every file is written atomically (``edgetrain.atomic``), the two documents last, and figures left
over from an earlier report in the same folder are removed only after the new report is complete:
an interrupted write leaves the previous report whole."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from edgetrain.atomic import atomic_write, write_bytes_atomic, write_text_atomic  # noqa: E402

FIGURE_PATTERN = "figure_*.png"

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1000px;
       margin: 2em auto; padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1 { border-bottom: 2px solid #2b6cb0; padding-bottom: .2em; }
h2 { margin-top: 1.8em; color: #2b6cb0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #cbd5e0; padding: .3em .7em; text-align: right; }
th { background: #edf2f7; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #e2e8f0; }
figcaption { font-size: .9em; color: #4a5568; }
pre { background: #f7fafc; border: 1px solid #e2e8f0; padding: .8em; overflow-x: auto; font-size: .85em; }
.note { color: #4a5568; font-size: .92em; }
"""


@dataclass
class _Block:
    kind: str
    payload: Any


@dataclass
class Report:
    """Accumulate headings, text, tables, figures and code; ``write(folder)`` renders both formats."""

    title: str
    blocks: list[_Block] = field(default_factory=list)
    _figure_count: int = 0

    def heading(self, text: str) -> None:
        self.blocks.append(_Block("heading", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(_Block("paragraph", text))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(_Block("table", (headers, [[_cell(v) for v in row] for row in rows])))

    def figure(self, figure: Figure, caption: str) -> None:
        self._figure_count += 1
        self.blocks.append(_Block("figure", (figure, caption, f"figure_{self._figure_count:02d}.png")))

    def image(self, png: str | os.PathLike[str], caption: str) -> None:
        """A PNG that already exists (copied next to the report)."""
        self._figure_count += 1
        self.blocks.append(_Block("image", (Path(png), caption, f"figure_{self._figure_count:02d}.png")))

    def code(self, text: str, language: str = "") -> None:
        self.blocks.append(_Block("code", (text, language)))

    def write(self, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``report.md``, ``report.html`` and the PNG plots into ``folder``."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        md, body = [f"# {self.title}", ""], [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            if block.kind == "heading":
                md += [f"## {block.payload}", ""]
                body.append(f"<h2>{html.escape(block.payload)}</h2>")
            elif block.kind == "paragraph":
                md += [block.payload, ""]
                body.append(f"<p>{html.escape(block.payload)}</p>")
            elif block.kind == "table":
                headers, rows = block.payload
                md += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                md += ["| " + " | ".join(row) + " |" for row in rows] + [""]
                head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif block.kind in ("figure", "image"):
                source, caption, name = block.payload
                if block.kind == "figure":
                    atomic_write(out / name, partial(_save_png, source))
                else:
                    write_bytes_atomic(out / name, Path(source).read_bytes())
                encoded = base64.b64encode((out / name).read_bytes()).decode()
                md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
                body.append(
                    f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
            else:
                text, language = block.payload
                md += [f"```{language}", text.rstrip(), "```", ""]
                body.append(f"<pre><code>{html.escape(text.rstrip())}</code></pre>")
        markdown_path, html_path = out / "report.md", out / "report.html"
        write_text_atomic(markdown_path, "\n".join(md))
        write_text_atomic(
            html_path,
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body)
            + "</body></html>",
        )
        current = {b.payload[2] for b in self.blocks if b.kind in ("figure", "image")}
        for stale in out.glob(FIGURE_PATTERN):
            if stale.name not in current:
                stale.unlink()
        return markdown_path, html_path


def _save_png(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=110, bbox_inches="tight", format="png")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)
