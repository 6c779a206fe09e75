"""The fleet on Flower's two engines: the simulation engine (3 devices x 2 rounds, through the CLI)
and the deployment engine over loopback (a SuperLink and 2 SuperNodes). Both bounded in time; both
check that no Ray or Flower process outlives the run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from edgetrain.fleet import run_fleet
from edgetrain.fleet.engine import ProcessGroups, alive, carriers, descendants

ENGINE_PROCESSES = ("ray::", "raylet", "gcs_server", "flower-superlink", "flower-supernode", "flower-superexec",
                    "flwr-serverapp", "flwr-clientapp")  # fmt: skip


@pytest.fixture
def fleet_token():
    """A token for this test's processes (in their environment); whatever still carries it when the
    test ends, passed or failed, is killed, so a failed run leaves nothing behind either."""
    token = uuid.uuid4().hex
    yield token
    for pid in carriers(f"EDGETRAIN_FLEET_TEST={token}"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def engine_processes(token: str) -> set[tuple[int, int, str]]:
    """(pid, parent pid, command line) of the live (not zombie) Ray and Flower processes started by
    this test (its token is in their environment, inherited from the process the test started). Read
    from /proc, not ``ps``: ``ps`` cuts its lines at 80 columns when it has no terminal, and a long venv
    path pushes the program name past the cut."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            environ = (entry / "environ").read_bytes()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state == "Z" or not any(name in args for name in ENGINE_PROCESSES):
            continue
        if f"EDGETRAIN_FLEET_TEST={token}".encode() in environ.split(b"\0"):
            found.add((int(entry.name), int(parent), args))
    return found


@pytest.mark.slow
def test_three_devices_two_rounds_on_the_simulation_engine(tmp_path, tiny_lrt_model_file, fleet_token) -> None:
    token = fleet_token
    out = tmp_path / "fleet"
    argv = [str(Path(sys.executable).parent / "edgetrain"), "fleet", "--devices", "3", "--rounds", "2", "--strategy",
            "federated-lowrank", "--samples-per-round", "8", "--test-samples", "20", "--model", tiny_lrt_model_file,
            "--out", str(out)]  # fmt: skip
    env = {**os.environ, "EDGETRAIN_FLEET_TEST": token}
    log = tmp_path / "fleet.log"
    seen: set[tuple[int, int, str]] = set()  # the engine's processes while it runs (the check below finds them)
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            deadline = time.monotonic() + 480
            while proc.poll() is None and time.monotonic() < deadline:
                seen |= engine_processes(token)
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log.read_bytes()
    assert proc.returncode == 0, output.decode(errors="replace")[-3000:]
    result = json.loads((out / "fleet.json").read_text())
    figures = result["strategies"]["federated-lowrank"]
    assert [r["round"] for r in figures["rounds"]] == [0, 1, 2]
    assert all(r["accepted"] == 3 for r in figures["rounds"][:2]) and figures["rounds"][1]["downlink_bytes"] > 0
    assert sorted(d["device"] for d in figures["devices"]) == [0, 1, 2]
    assert all(d["samples"] == 16 for d in figures["devices"])
    assert result["model_sha256"] == hashlib.sha256(Path(tiny_lrt_model_file).read_bytes()).hexdigest()
    assert (out / "fleet.md").is_file() and (out / "accuracy_vs_round.png").is_file()
    assert any("ray::" in args for _, _, args in seen), "the Ray workers were not found while the fleet ran"
    assert not engine_processes(token), "a Ray or Flower process outlived the simulation"


@pytest.mark.slow
def test_two_supernodes_on_the_deployment_engine_over_loopback(tmp_path, tiny_fleet, monkeypatch, fleet_token) -> None:
    token = fleet_token
    monkeypatch.setenv("EDGETRAIN_FLEET_TEST", token)  # inherited by every process the engine starts
    config = tiny_fleet(
        rounds=1,
        strategies=("federated-lowrank",),
        engine="deployment",
        round_timeout=240.0,
        fleet_lr=1.0,  # the full step, ungated: the broadcast is written (checked below)
        gate_samples=0,
    )
    outcome: dict[str, object] = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_fleet(config, tmp_path / "fleet")))
    runner.start()
    seen: set[tuple[int, int, str]] = set()  # the engine's processes while it runs (the check below finds them)
    while runner.is_alive():
        seen |= engine_processes(token)
        runner.join(timeout=1.0)
    assert "result" in outcome, "the deployment run failed; its logs are under the run folder"
    result = outcome["result"]
    figures = result["strategies"]["federated-lowrank"]
    assert figures["rounds"][0]["accepted"] == 2 and figures["rounds"][1]["downlink_bytes"] > 0
    assert sorted(d["device"] for d in figures["devices"]) == [0, 1]
    assert all(d["fleet_update_writes"] > 0 for d in figures["devices"])
    logs = Path(tmp_path / "fleet" / "logs")
    assert {"superlink.log", "supernode-0.log", "supernode-1.log"} <= {p.name for p in logs.iterdir()}
    # the check below is not vacuous: this run's SuperLink and SuperNodes were seen while it ran
    assert any("flower-superlink" in args for _, _, args in seen), "the SuperLink was not found while the fleet ran"
    # the SuperNodes this run started are children of this process (a SuperNode's child caught between
    # fork and exec still shows the SuperNode's command line: not counted)
    supernodes = {pid for pid, parent, args in seen if "flower-supernode" in args and parent == os.getpid()}
    assert len(supernodes) == 2, f"the 2 SuperNodes were not found while it ran: {sorted(seen)}"
    assert not engine_processes(token), "a SuperLink, SuperNode or SuperExec outlived the run"


def test_process_groups_stop_reaches_a_reparented_process(tmp_path) -> None:
    """A child that starts a grandchild in a new session and exits: the grandchild is re-parented to
    init (no descendant of anything started, outside every started group) and must still be stopped."""
    groups = ProcessGroups(tmp_path / "logs")
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess; p = subprocess.Popen(['sleep', '300'], start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))"
    )
    child = groups.start("parent", [sys.executable, "-c", script], dict(os.environ))
    child.wait(timeout=60)
    grandchild = int(pid_file.read_text())
    try:
        assert Path(f"/proc/{grandchild}").exists() and grandchild not in descendants({child.pid})
        groups.stop(grace=2.0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(grandchild):
            time.sleep(0.1)
        assert not alive(grandchild), "the re-parented grandchild outlived ProcessGroups.stop"
    finally:
        if alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
