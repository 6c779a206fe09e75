"""bench/render.py: docs/BENCHMARKS.md holds every fragment once, headline ones first, with working links."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import render  # noqa: E402


def test_every_fragment_once_headline_first_and_every_contents_link_resolves(tmp_path, monkeypatch) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for name, title in [("fleet-x", "Fleet run"), ("tqt", "TQT"), ("demo", "Demo"), ("a-single", "Fleet run")]:
        (results / f"{name}.md").write_text(f"## {title}\n\nbody of {name}\n")
    (results / "tqt.json").write_text('{"recorded_at": "2026-12-03 12:00 UTC"}')
    monkeypatch.setattr(render, "ROOT", tmp_path)
    text = render.render()
    bodies = [text.index(f"body of {name}") for name in ("tqt", "demo", "a-single", "fleet-x")]
    assert bodies == sorted(bodies)  # ORDER (tqt before demo), then the appendix by file name
    assert text.index("# Appendix") < bodies[2] and text.index("# Appendix") > bodies[1]
    assert all(text.count(f"body of {name}") == 1 for name in ("tqt", "demo", "a-single", "fleet-x"))
    assert "_Recorded 2026-12-03 12:00 UTC._" in text
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) == len(set(links)) == 5  # four sections (two share a title) and the appendix
    assert "fleet-run" in links and "fleet-run-1" in links
