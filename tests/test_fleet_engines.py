"""The fleet on Flower's two engines: the simulation engine (3 devices x 2 rounds, through the CLI)
and the deployment engine over loopback (a SuperLink and 2 SuperNodes). Both bounded in time; both
check that no Ray or Flower process outlives the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgetrain.fleet import FleetConfig, run_fleet

ENGINE_PROCESSES = ("ray::", "raylet", "gcs_server", "flower-superlink", "flower-supernode", "flower-superexec",
                    "flwr-serverapp", "flwr-clientapp")  # fmt: skip


def engine_processes() -> set[tuple[int, str]]:
    """Live (not zombie) Ray and Flower processes on this machine."""
    ps = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in ps.splitlines():
        pid, stat, args = line.split(None, 2) if len(line.split(None, 2)) == 3 else (*line.split(None, 1), "")
        if not stat.startswith("Z") and any(name in args for name in ENGINE_PROCESSES):
            found.add((int(pid), args[:120]))
    return found


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    import torch

    from edgetrain.adapt.pretrain import build_qnet, save_model

    torch.manual_seed(0)
    spec = {"arch": "lrt-cnn", "width": 4, "hidden": 16}
    path = tmp_path_factory.mktemp("fleet-engine-model") / "tiny.safetensors"
    save_model(build_qnet(spec), spec, path)
    return str(path)


@pytest.mark.slow
def test_three_devices_two_rounds_on_the_simulation_engine(tmp_path, tiny_model) -> None:
    before = engine_processes()
    out = tmp_path / "fleet"
    argv = [str(Path(sys.executable).parent / "edgetrain"), "fleet", "--devices", "3", "--rounds", "2", "--strategy",
            "federated-lowrank", "--samples-per-round", "8", "--test-samples", "20", "--model", tiny_model,
            "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output.decode(errors="replace")[-3000:]
    result = json.loads((out / "fleet.json").read_text())
    figures = result["strategies"]["federated-lowrank"]
    assert [r["round"] for r in figures["rounds"]] == [0, 1, 2]
    assert all(r["accepted"] == 3 for r in figures["rounds"][:2]) and figures["rounds"][1]["downlink_bytes"] > 0
    assert sorted(d["device"] for d in figures["devices"]) == [0, 1, 2]
    assert all(d["samples"] == 16 for d in figures["devices"])
    assert (out / "fleet.md").is_file() and (out / "accuracy_vs_round.png").is_file()
    assert engine_processes() <= before, "a Ray or Flower process outlived the simulation"


@pytest.mark.slow
def test_two_supernodes_on_the_deployment_engine_over_loopback(tmp_path, tiny_model) -> None:
    before = engine_processes()
    config = FleetConfig(
        devices=2, rounds=1, samples_per_round=8, strategies=("federated-lowrank",), model=tiny_model,
        test_samples=20, engine="deployment", round_timeout=240.0,
    )  # fmt: skip
    result = run_fleet(config, tmp_path / "fleet")
    figures = result["strategies"]["federated-lowrank"]
    assert figures["rounds"][0]["accepted"] == 2 and figures["rounds"][1]["downlink_bytes"] > 0
    assert sorted(d["device"] for d in figures["devices"]) == [0, 1]
    assert all(d["fleet_update_writes"] > 0 for d in figures["devices"])
    logs = Path(tmp_path / "fleet" / "logs")
    assert {"superlink.log", "supernode-0.log", "supernode-1.log"} <= {p.name for p in logs.iterdir()}
    assert engine_processes() <= before, "a SuperLink, SuperNode or SuperExec outlived the run"
