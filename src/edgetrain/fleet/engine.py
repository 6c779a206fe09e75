"""Running the fleet on Flower's engines (docs/fleet.md).

- Simulation (the default, one command on one machine): ``flwr.simulation.run_simulation`` with the
  Ray backend (Flower 1.42's only simulation backend), one Ray actor (``num_cpus = 1``) that hosts
  every device in turn, no runtime dependency installation; it runs in a child process
  (``python -m edgetrain.fleet CONFIG OUT``) whose process group is stopped afterwards, Ray's
  processes with it.
- Deployment: ``flower-superlink`` and one ``flower-supernode`` per device, insecure on loopback
  (127.0.0.1 only), the app submitted with ``flwr run``; for a real fleet start them with TLS
  certificates instead (docs/fleet.md). Every process is started in its own process group and the
  whole group is stopped at the end (a supernode's ``flower-superexec`` children included).

Before either engine runs, :func:`prepare_model` makes the device model: the configured model file
or exported program, or (``model`` unset) an exported integer program of the small LRT net
(float-trained on elastic digits, TQT-quantized), made once per run folder; fleet.json names it by
:func:`model_sha256`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgetrain.atomic import write_json_atomic
from edgetrain.fleet.config import FleetConfig

NO_INSTALL = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_DEDUP_LOGS": "0"}
APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgetrain-fleet"
version = "1.0.0"
description = "edgetrain fleet: federated low-rank adaptation of NVM devices"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgetrain"

[tool.flwr.app.components]
serverapp = "edgetrain.fleet.app:server_app"
clientapp = "edgetrain.fleet.app:client_app"

[tool.flwr.app.config]
fleet-config = "{config}"
out = "{out}"
"""


def prepare_model(config: FleetConfig, out: Path) -> FleetConfig:
    """``config`` with ``model`` set: as given, or the fleet's default device, an exported integer
    program (out/program): the LRT net of ``arch`` trained in float on elastic digits, quantized with
    TQT (static calibration, 8-bit weights) and exported; made once per run folder."""
    if config.model is not None:
        if not Path(config.model).exists():
            raise FileNotFoundError(f"device model {config.model} does not exist; give a model file or program folder")
        return replace(config, model=str(Path(config.model).resolve()))
    program_dir = (out / "program").resolve()
    if not (program_dir / "manifest.json").is_file():
        import torch

        from edgetrain.adapt.pretrain import build_float
        from edgetrain.adapt.scenarios import pretraining_set
        from edgetrain.export import to_integer
        from edgetrain.graph import QuantConfig, quantize
        from edgetrain.training import train_float

        torch.set_num_threads(1)
        torch.manual_seed(config.seed)
        train = pretraining_set(config.dataset, config.pretrain_samples, seed=config.seed)
        model = build_float(config.arch)
        train_float(model, train, None, epochs=config.pretrain_epochs, lr=2.5e-3, seed=config.seed, progress=False)
        model.eval()
        calibration = train.images[:256]
        qmodel = quantize(model, calibration[:1], calibration, QuantConfig(weight_bits=8), mode="static")
        to_integer(qmodel.eval(), meta={"model": config.arch, "dataset": config.dataset}).save(program_dir)
    return replace(config, model=str(program_dir))


def model_sha256(model: str | Path) -> str:
    """SHA-256 naming a device network: an exported program folder's ``manifest_sha256`` (its manifest
    holds the weights' digest), or a model file's bytes. Two runs whose devices ran the same network
    record the same digest."""
    path = Path(model)
    if path.is_dir():
        return json.loads((path / "manifest.json").read_text())["manifest_sha256"]
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_fleet(config: FleetConfig, out: str | Path) -> dict[str, Any]:
    """Run every strategy of ``config`` on its engine; returns the content of out/fleet.json (with
    ``model_sha256``, the device network's :func:`model_sha256`)."""
    from edgetrain.fleet.app import RESULT_NAME

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = prepare_model(config, out)
    result = out / RESULT_NAME
    result.unlink(missing_ok=True)
    if config.engine == "simulation":
        run_simulation_engine(config, out)
    else:
        run_deployment_engine(config, out)
    if not result.is_file():
        raise RuntimeError(f"the fleet's ServerApp wrote no {result}; its log above says why")
    figures = {**json.loads(result.read_text()), "model_sha256": model_sha256(config.model)}
    write_json_atomic(result, figures)
    return figures


def run_simulation_engine(config: FleetConfig, out: Path) -> None:
    """All strategies in one Flower simulation, run by a child process in its own process group
    (Ray's processes join the driver's group): when it ends, the group is stopped, so no Ray
    worker outlives the run even if ``ray.shutdown`` leaves one finishing."""
    config_path = out / "fleet-config.json"
    config_path.write_text(config.to_json())
    groups = ProcessGroups(out / "logs")
    try:
        proc = groups.start(
            "simulation",
            [sys.executable, "-m", "edgetrain.fleet", str(config_path), str(out)],
            {**os.environ, **NO_INSTALL},
            inherit_output=True,
        )
        proc.wait()
    finally:
        groups.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"the Flower simulation failed (exit {proc.returncode}); its log is above")


def simulate(config: FleetConfig, out: Path) -> None:
    """The simulation itself: ``run_simulation`` with the Ray backend, one actor (``num_cpus = 1``)."""
    os.environ.update(NO_INSTALL)
    import ray
    from flwr.simulation import run_simulation

    from edgetrain.fleet.app import client_app, make_server_app

    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 1, "num_gpus": 0, "include_dashboard": False, "logging_level": "warning"},
    }
    try:
        run_simulation(make_server_app(config, out), client_app, num_supernodes=config.devices, backend_config=backend)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, seconds: float) -> None:
    """Block until something listens on 127.0.0.1:``port`` (TimeoutError after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f} s") from None
            time.sleep(0.2)


class ProcessGroups:
    """Processes started in their own process groups; :meth:`stop` ends every group, every descendant,
    and every process that carries this run's token (``EDGETRAIN_FLEET_RUN`` in its environment,
    inherited by all it starts): a Ray or Flower process whose parent died is re-parented to init
    and is no descendant any more, but it still carries the token."""

    TOKEN_VARIABLE = "EDGETRAIN_FLEET_RUN"

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.token = uuid.uuid4().hex

    def start(
        self, name: str, argv: list[str], env: dict[str, str], inherit_output: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new process group, its output in logs/NAME.log (or this process's)."""
        env = {**env, self.TOKEN_VARIABLE: self.token}
        if inherit_output:
            proc = subprocess.Popen(argv, env=env, start_new_session=True)
        else:
            self.logs.mkdir(parents=True, exist_ok=True)
            with (self.logs / f"{name}.log").open("wb") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL, to every group and every descendant (some start their own session)."""
        family = {proc.pid for proc in self.procs}
        family |= descendants(family) | carriers(f"{self.TOKEN_VARIABLE}={self.token}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in family:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(alive(pid) for pid in family):
                for proc in self.procs:
                    proc.poll()
                time.sleep(0.1)
        for proc in self.procs:
            proc.wait(timeout=grace)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, already dead, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def carriers(marker: str) -> set[int]:
    """Every live process whose environment holds the entry ``marker`` (``NAME=value``; from /proc,
    Linux; processes of other users are not readable and not ours)."""
    wanted = marker.encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                    found.add(int(entry.name))
            except OSError:
                continue  # gone meanwhile, or not ours
    return found


def descendants(roots: set[int]) -> set[int]:
    """Every live descendant of ``roots`` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def run_deployment_engine(config: FleetConfig, out: Path, timeout: float | None = None) -> None:
    """SuperLink + one SuperNode per device on 127.0.0.1 (insecure), the app run with ``flwr run``;
    waits for out/fleet.json (at most ``timeout`` seconds, default rounds x strategies x round_timeout)."""
    from edgetrain.fleet.app import RESULT_NAME

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **NO_INSTALL, "FLWR_HOME": str(out / "flwr-home")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    link_port = free_port()
    (out / "flwr-home").mkdir(parents=True, exist_ok=True)
    (out / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    config_path = out / "fleet-config.json"
    config_path.write_text(config.to_json())
    app_dir = out / "flwr-app"
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT.format(config=config_path, out=out))
    groups = ProcessGroups(out / "logs")
    limit = timeout or 120.0 + config.round_timeout * (config.rounds + 1) * len(config.strategies)
    try:
        groups.start(
            "superlink",
            [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
            ],
            env,
        )
        wait_for_port(link_port, 120.0)
        for index in range(config.devices):
            groups.start(
                f"supernode-{index}",
                [
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={index} num-partitions={config.devices}",
                ],
                env,
            )
        submit = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app_dir), "fleet"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,
        )
        (out / "logs" / "flwr-run.log").write_text(submit.stdout + submit.stderr)
        if submit.returncode != 0:
            raise RuntimeError(f"flwr run failed (exit {submit.returncode}); see {out / 'logs' / 'flwr-run.log'}")
        deadline = time.monotonic() + limit
        while not (out / RESULT_NAME).is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fleet did not finish within {limit:.0f} s; logs in {out / 'logs'}")
            time.sleep(0.5)
    finally:
        groups.stop()
