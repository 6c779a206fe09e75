"""The Flower apps of the fleet: a ClientApp per device and the ServerApp that merges and broadcasts.

docs/fleet.md. Round t of a strategy (t = 0 .. rounds): the ServerApp sends every device a "train"
message holding the fleet config (JSON), the round and the broadcast of round t - 1 (an
``ArrayRecord``; empty at t = 0 and for ``local``). The device applies the broadcast as one NVM
update event, learns ``samples_per_round`` samples (none at t = rounds, the final scoring), saves its
non-volatile state and replies with its payload (``ArrayRecord``: low-rank factors or a weight
delta) and its metrics (``MetricRecord``). The server rejects an update that is malformed or not
finite and names the device, counts a device whose reply is an error (it dropped out) or missing
(it never reported), merges the accepted updates (:mod:`edgetrain.fleet.merge`) and goes on with
the rest. Bytes are the payloads' serialized sizes: the sum of ``len(Array.data)`` (NumPy ``.npy``
bytes, header included) of every array sent, uplink per device reply, downlink per device message.

``client_app`` and ``server_app`` are module-level for the deployment engine (``flwr run`` with
``edgetrain.fleet.app:server_app`` / ``:client_app``; the ServerApp reads the run config keys
``fleet-config`` (a JSON config file) and ``out`` (the run folder)); the simulation engine uses
:func:`make_server_app` with the config in hand.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from edgetrain.atomic import write_json_atomic
from edgetrain.fleet.config import FleetConfig
from edgetrain.fleet.device import GATE_CHOICES, FleetDevice, load_device_net
from edgetrain.fleet.merge import (
    FactorNorms,
    check_update,
    decode_factors,
    encode_factors,
    mean_delta,
    merge_lowrank,
)

LOG = logging.getLogger("edgetrain.fleet")
RESULT_NAME = "fleet.json"
NODE_WAIT_SECONDS = 120.0

client_app = ClientApp()
_DEVICES: dict[tuple[str, int], FleetDevice] = {}  # (state folder, device) -> the device in this process
# (one fleet's devices at a time: each device's state is saved every round, so a dropped one is rebuilt)


# -- the device side ---------------------------------------------------------------------------------
def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Serialized size of a payload: the ``.npy`` bytes of every array it carries."""
    return sum(len(array.data) for array in record.values())


def _device(config: FleetConfig, strategy: str, index: int, state: Path) -> FleetDevice:
    """This process's device ``index``: cached, else rebuilt from its saved state (a rejoin), else new."""
    key = (str(state.parent), index)
    if key not in _DEVICES:
        for other in [k for k in _DEVICES if k[0] != key[0]]:  # another strategy's fleet: saved, drop it
            del _DEVICES[other]
        torch.set_num_threads(1)
        device = FleetDevice(config, index, strategy)
        if state.is_file():
            device.restore(state)
        _DEVICES[key] = device
    return _DEVICES[key]


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round on one device (module docstring); injected faults happen here."""
    order = msg.content.config_records["fleet"]
    config = FleetConfig.from_json(str(order["config"]))
    strategy, round_index, final = str(order["strategy"]), int(order["round"]), bool(order["final"])
    index = int(context.node_config["partition-id"])
    state = Path(str(order["state_dir"])) / f"device-{index}.safetensors"
    device = _device(config, strategy, index, state)
    faults = set() if final else config.faults_of(index, round_index)
    update = from_record(msg.content.array_records["update"])
    update_writes = device.apply(update)
    if update_writes:
        device.save(state)  # the update event is in non-volatile memory: it survives a dropout
    after_update = device.trainer.test_accuracy() if update and not final else float("nan")
    if "dropout" in faults:
        device.learn(config.samples_per_round // 2)
        del _DEVICES[(str(state.parent), index)]  # power lost: only the saved (non-volatile) state survives
        raise RuntimeError(f"device {index} dropped out half-way through round {round_index} (injected fault)")
    if "silent" in faults:
        time.sleep(config.round_timeout + 1.0)
    if final:
        device.score()  # the last broadcast is in: the held-out accuracy the fleet ends with
    else:
        device.learn(config.samples_per_round)
    payload = device.report() if not final else {}
    if "corrupt" in faults:
        payload = {key: np.full(value.shape, np.nan, dtype=np.float32) for key, value in payload.items()}
    device.save(state)
    metrics = {
        **device.metrics(),
        "update_writes": update_writes,
        "test_accuracy_after_update": device.test_history[-1] if final and update else after_update,
        "round": round_index,
    }
    content = RecordDict({"payload": to_record(payload), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


# -- the server side ---------------------------------------------------------------------------------
def expected_payload(strategy: str, shapes: dict[str, tuple[int, int]], config: FleetConfig) -> dict[str, tuple]:
    """The arrays a device of ``strategy`` must send, with their shapes."""
    if strategy == "federated-lowrank":
        out: dict[str, tuple[int, ...]] = {}
        for name, (n, m) in shapes.items():
            out[f"{name}.L"], out[f"{name}.R"] = (n, config.rank), (m, config.rank)
            if config.factor_bits == 16:
                out[f"{name}.scale"] = (2,)
        return out
    if strategy in ("fedavg", "fedavg-sgd"):
        return {f"{name}.delta": shape for name, shape in shapes.items()}
    return {}


def merge(
    strategy: str,
    updates: list[dict[str, np.ndarray]],
    shapes: dict[str, tuple[int, int]],
    config: FleetConfig,
    norms: FactorNorms,
) -> dict[str, np.ndarray]:
    """The broadcast of a round from the accepted updates (empty when there is nothing to share)."""
    if not updates or strategy == "local":
        return {}
    out: dict[str, np.ndarray] = {}
    for name in shapes:
        if strategy == "federated-lowrank":
            factors = merge_lowrank([decode_factors(name, u) for u in updates], config.merge_rank or config.rank)
            if config.max_norm:
                factors = norms(name, factors)
            out.update(encode_factors(name, factors, config.factor_bits))
        else:
            out[f"{name}.delta"] = mean_delta([u[f"{name}.delta"] for u in updates]).astype(np.float32)
    return out


def update_record(round_index: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the broadcast of the start of ``round_index`` did on a device: held-out accuracy right
    after it, the acceptance gate's accuracies on its window (the current weights, the broadcast, the
    device's own update) and its choice (None: gate off or no broadcast), the size of its
    weight-code step (Frobenius norm over all layers and largest entry, in LSBs), the cells it
    wrote. Removes those per-round keys from ``metrics`` (NaN there means "none")."""

    def number(key: str) -> float | None:
        value = float(metrics.pop(key, math.nan))
        return None if np.isnan(value) else value

    choice = int(metrics.pop("gate_choice"))
    return {
        "round": round_index,
        "test_accuracy_after_update": number("test_accuracy_after_update"),
        "gate_current_accuracy": number("gate_current_accuracy"),
        "gate_fleet_accuracy": number("gate_fleet_accuracy"),
        "gate_own_accuracy": number("gate_own_accuracy"),
        "gate_sum_accuracy": number("gate_sum_accuracy"),
        "gate_agree_accuracy": number("gate_agree_accuracy"),
        "gate_head_accuracy": number("gate_head_accuracy"),
        "gate_choice": None if choice < 0 else GATE_CHOICES[choice],
        "step_fro_lsb": number("update_step_fro_lsb"),  # of the broadcast as offered, all layers
        "step_max_lsb": number("update_step_max_lsb"),
        "cells_written": int(metrics["update_writes"]),
    }


def short_reason(reason: str | None) -> str:
    """The last line of a device's error (Flower wraps the exception in its traceback)."""
    lines = [line.strip(" '>") for line in (reason or "no reason given").strip().splitlines() if line.strip(" '>")]
    return lines[-1][:300] if lines else "no reason given"


def _wait_for_nodes(grid: Grid, count: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} devices connected within {NODE_WAIT_SECONDS:.0f} s")
        time.sleep(0.2)
        nodes = sorted(grid.get_node_ids())
    return nodes


def run_strategy(grid: Grid, nodes: list[int], config: FleetConfig, strategy: str, out: Path) -> dict[str, Any]:
    """All rounds of one strategy; returns its per-round and per-device figures."""
    shapes = {layer.name: tuple(layer.shape2d) for layer in load_device_net(str(config.model)).weight_layers}
    expected = expected_payload(strategy, shapes, config)
    norms = FactorNorms()
    state_dir = out / "devices" / uuid.uuid4().hex[:12]  # this run's device states (a fresh fleet)
    update: dict[str, np.ndarray] = {}
    node_device: dict[int, int] = {}
    devices: dict[int, dict[str, Any]] = {}
    rounds: list[dict[str, Any]] = []
    for round_index in range(config.rounds + 1):
        final = round_index == config.rounds
        broadcast = to_record(update)
        order = ConfigRecord(
            {
                "config": config.to_json(),
                "strategy": strategy,
                "round": round_index,
                "final": final,
                "state_dir": str(state_dir),
            }
        )
        messages = [
            Message(RecordDict({"fleet": order, "update": broadcast}), dst_node_id=node, message_type="train")
            for node in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
        accepted: list[dict[str, np.ndarray]] = []
        rejected, dropped = [], []
        uplink = 0
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                reason = short_reason(reply.error.reason)
                dropped.append({"device": node_device.get(node), "node": node, "reason": reason})
                LOG.warning(
                    "%s round %d: device %s dropped out: %s", strategy, round_index, node_device.get(node), reason
                )
                continue
            metrics = dict(reply.content.metric_records["metrics"])
            index = int(metrics["device"])
            node_device[node] = index
            per_round = ("test_accuracy_per_round", "online_accuracy_per_round", "fleet_update_per_round")
            devices.setdefault(index, {"device": index, **{key: [] for key in per_round}})
            update_effect = update_record(round_index, metrics)  # takes its keys out of metrics
            devices[index].update(metrics)
            devices[index]["test_accuracy_per_round"].append((round_index, metrics["test_accuracy"]))
            devices[index]["online_accuracy_per_round"].append((round_index, metrics["online_accuracy"]))
            if round_index > 0 and strategy != "local":
                devices[index]["fleet_update_per_round"].append(update_effect)
            record = reply.content.array_records["payload"]
            uplink += record_bytes(record)
            if final:
                continue
            arrays = from_record(record)
            reason = check_update(arrays, expected)
            if reason is not None:
                rejected.append({"device": index, "reason": reason})
                LOG.warning("%s round %d: rejected the update of device %d: %s", strategy, round_index, index, reason)
            elif expected:
                accepted.append(arrays)
        silent = [{"device": node_device.get(node), "node": node} for node in nodes if node not in answered]
        for entry in silent:
            LOG.warning("%s round %d: device %s never reported", strategy, round_index, entry["device"])
        scores = [m["test_accuracy"] for m in devices.values()]
        rounds.append(
            {
                "round": round_index,
                "final": final,
                "downlink_bytes": record_bytes(broadcast) * len(nodes),
                "uplink_bytes": uplink,
                "accepted": len(accepted),
                "rejected": rejected,
                "dropped": dropped,
                "silent": silent,
                "test_accuracy": float(np.mean(scores)) if scores else None,
            }
        )
        LOG.info(
            "%s round %d/%d: %d accepted, %d rejected, %d dropped, %d silent; uplink %d B, downlink %d B; "
            "mean held-out accuracy %s",
            strategy, round_index, config.rounds, len(accepted), len(rejected), len(dropped), len(silent),
            rounds[-1]["uplink_bytes"], rounds[-1]["downlink_bytes"], rounds[-1]["test_accuracy"],
        )  # fmt: skip
        update = merge(strategy, accepted, shapes, config, norms) if not final else {}
    return summarize(strategy, rounds, devices)


def summarize(strategy: str, rounds: list[dict[str, Any]], devices: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Fleet figures of one strategy from its rounds and the devices' last reports."""
    per_device = [devices[k] for k in sorted(devices)]
    tests = [d["test_accuracy"] for d in per_device]
    training = [r for r in rounds if not r["final"]]
    return {
        "strategy": strategy,
        "test_accuracy": float(np.mean(tests)) if tests else None,
        "min_device_test_accuracy": float(np.min(tests)) if tests else None,
        "online_accuracy": float(np.mean([d["online_accuracy"] for d in per_device])) if per_device else None,
        "uplink_bytes": int(sum(r["uplink_bytes"] for r in rounds)),
        "downlink_bytes": int(sum(r["downlink_bytes"] for r in rounds)),
        "uplink_bytes_per_round": float(np.mean([r["uplink_bytes"] for r in training])) if training else 0.0,
        "max_writes": int(max((d["max_writes"] for d in per_device), default=0)),
        "total_writes": int(sum(d["total_writes"] for d in per_device)),
        "aux_memory_bits": int(max((d["aux_memory_bits"] for d in per_device), default=0)),
        "rounds": rounds,
        "devices": per_device,
    }


def serve(grid: Grid, config: FleetConfig, out: Path) -> dict[str, Any]:
    """Every strategy of ``config`` in turn on the same devices (fresh state per strategy); writes
    ``out/fleet.json`` and returns it."""
    if not LOG.handlers:  # the ServerApp's process: one line per round on stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("edgetrain fleet: %(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
    nodes = _wait_for_nodes(grid, config.devices)[: config.devices]
    result: dict[str, Any] = {"config": json.loads(config.to_json()), "strategies": {}}
    for strategy in config.strategies:
        t0 = time.perf_counter()
        result["strategies"][strategy] = run_strategy(grid, nodes, config, strategy, out / strategy)
        result["strategies"][strategy]["seconds"] = time.perf_counter() - t0
    write_json_atomic(out / RESULT_NAME, result)
    return result


def make_server_app(config: FleetConfig, out: Path) -> ServerApp:
    """A ServerApp running :func:`serve` on ``config`` (the simulation engine)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, config, out)

    return app


server_app = ServerApp()


@server_app.main()
def deployed_main(grid: Grid, context: Context) -> None:
    """The deployment engine's entry: config and output folder from the run config."""
    config = FleetConfig.load(str(context.run_config["fleet-config"]))
    serve(grid, config, Path(str(context.run_config["out"])))
