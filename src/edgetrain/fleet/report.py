"""The fleet report: three plots and a markdown section from a fleet.json (docs/fleet.md).

accuracy_vs_round.png (mean held-out accuracy of the devices after each round, per strategy),
bytes_vs_accuracy.png (total uplink bytes against final fleet accuracy), writes_per_device.png (max
writes per cell of each device, per strategy), and fleet.md with the strategy table and the faults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from edgetrain.atomic import atomic_write  # noqa: E402


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def write_report(result: dict[str, Any], out: str | Path) -> Path:
    """Write the plots and out/fleet.md for a :func:`edgetrain.fleet.run_fleet` result; returns fleet.md."""
    out = Path(out)
    strategies = result["strategies"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, figures in strategies.items():
        points = [(r["round"], r["test_accuracy"]) for r in figures["rounds"] if r["test_accuracy"] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set(xlabel="round (held-out accuracy after the round's samples)", ylabel="mean held-out accuracy")
    ax.set_title("Fleet accuracy by round")
    ax.legend()
    _save(fig, out / "accuracy_vs_round.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, figures in strategies.items():
        ax.scatter(max(figures["uplink_bytes"], 1), figures["test_accuracy"], s=60, label=name)
    ax.set_xscale("log")
    ax.set(xlabel="total uplink bytes (serialized payloads)", ylabel="final mean held-out accuracy")
    ax.set_title("Bytes against accuracy")
    ax.legend()
    _save(fig, out / "bytes_vs_accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(strategies), 1)
    for i, (name, figures) in enumerate(strategies.items()):
        devices = [d["device"] for d in figures["devices"]]
        writes = [d["max_writes"] for d in figures["devices"]]
        ax.bar(np.asarray(devices) + i * width, writes, width=width, label=name)
    ax.set(xlabel="device", ylabel="max writes per cell")
    ax.set_title("NVM writes per device")
    ax.legend()
    _save(fig, out / "writes_per_device.png")

    lines = [
        "## Fleet",
        "",
        "| strategy | fleet test acc | worst device | online acc | uplink B/round | uplink B | downlink B | "
        "max writes | total writes | aux bits/device |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in strategies.items():
        lines.append(
            f"| {name} | {f['test_accuracy']:.4f} | {f['min_device_test_accuracy']:.4f} | {f['online_accuracy']:.4f} | "
            f"{f['uplink_bytes_per_round']:.0f} | {f['uplink_bytes']} | {f['downlink_bytes']} | {f['max_writes']} | "
            f"{f['total_writes']} | {f['aux_memory_bits']} |"
        )
    faults = [
        f"- {name}, round {r['round']}: {kind} device {e.get('device')} ({e.get('reason', 'no reply')})"
        for name, f in strategies.items()
        for r in f["rounds"]
        for kind in ("rejected", "dropped", "silent")
        for e in r[kind]
    ]
    if faults:
        lines += ["", "Faults (the rounds went on with the other devices):", "", *faults]
    lines += [
        "",
        "![accuracy by round](accuracy_vs_round.png) ![bytes against accuracy](bytes_vs_accuracy.png) "
        "![writes per device](writes_per_device.png)",
        "",
    ]
    text = "\n".join(lines)
    atomic_write(out / "fleet.md", lambda tmp: tmp.write_text(text))
    return out / "fleet.md"
