"""The fleet's server merge, update checks, config and one in-process fleet run with faults.

The Flower engines themselves are exercised in tests/test_fleet_engines.py; here the ServerApp's
``serve`` talks to the ClientApp through a stand-in grid that delivers messages in-process.
"""

from __future__ import annotations

import io
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgetrain.fleet import Fault, FleetConfig, check_update, mean_delta, merge_lowrank


def npy_bytes(shape: tuple[int, ...], dtype: type) -> int:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype=dtype))
    return len(buffer.getvalue())


def random_factors(rng: np.random.Generator, n: int, m: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((n, r)), rng.standard_normal((m, r))


def test_merge_equals_the_exact_mean_when_the_total_rank_fits() -> None:
    rng = np.random.default_rng(0)
    shared_left = rng.standard_normal((12, 2))
    updates = [(shared_left @ rng.standard_normal((2, 2)), rng.standard_normal((9, 2))) for _ in range(3)]
    exact = sum(left @ right.T for left, right in updates) / 3  # rank <= 2 (one shared column space)
    left, right = merge_lowrank(updates, rank=4)
    assert left.shape == (12, 4) and right.shape == (9, 4)
    np.testing.assert_allclose(left @ right.T, exact, atol=1e-5 * np.abs(exact).max())

    updates = [random_factors(rng, 12, 9, 2), random_factors(rng, 12, 9, 2)]  # total rank 4 = r
    exact = sum(left @ right.T for left, right in updates) / 2
    left, right = merge_lowrank(updates, rank=4)
    np.testing.assert_allclose(left @ right.T, exact, atol=1e-5 * np.abs(exact).max())


def test_merge_is_the_best_rank_r_approximation_when_the_total_rank_does_not_fit() -> None:
    rng = np.random.default_rng(1)
    updates = [random_factors(rng, 20, 15, 3) for _ in range(4)]  # total rank 12 > r = 4
    mean = sum(left @ right.T for left, right in updates) / 4
    u, s, vt = np.linalg.svd(mean)
    best = (u[:, :4] * s[:4]) @ vt[:4]
    left, right = merge_lowrank(updates, rank=4)
    merged = left @ right.T
    # Eckart-Young: the error of the best rank-4 approximation is the tail of the spectrum
    tail = np.sqrt((s[4:] ** 2).sum())
    assert np.linalg.norm(mean - merged) == pytest.approx(tail, rel=1e-4)
    np.testing.assert_allclose(merged, best, atol=1e-4 * np.abs(best).max())


def test_a_broadcast_rank_of_k_r_keeps_the_exact_mean() -> None:
    rng = np.random.default_rng(3)
    updates = [random_factors(rng, 20, 15, 3) for _ in range(4)]  # total rank 12
    mean = sum(left @ right.T for left, right in updates) / 4
    left, right = merge_lowrank(updates, rank=12)
    assert left.shape == (20, 12) and right.shape == (15, 12)
    np.testing.assert_allclose(left @ right.T, mean, atol=1e-5 * np.abs(mean).max())
    left, right = merge_lowrank([random_factors(rng, 6, 4, 3) for _ in range(4)], rank=12)
    assert left.shape == (6, 4) and right.shape == (4, 4)  # no more columns than the matrix has rank
    with pytest.raises(ValueError, match="merge_rank"):
        FleetConfig(merge_rank=0)


def test_factors_on_the_link_round_trip() -> None:
    from edgetrain.fleet.merge import decode_factors, encode_factors

    rng = np.random.default_rng(2)
    factors = random_factors(rng, 30, 20, 4)
    exact = decode_factors("fc", encode_factors("fc", factors, 32))
    np.testing.assert_allclose(exact[0], factors[0], rtol=1e-6)
    sent = encode_factors("fc", factors, 16)
    assert sent["fc.L"].dtype == np.float16 and sent["fc.scale"].shape == (2,)
    for got, want in zip(decode_factors("fc", sent), factors, strict=True):
        assert np.abs(got - want).max() <= 2**-11 * np.abs(want).max()  # float16: 11 significant bits


def test_mean_delta_and_update_checks() -> None:
    np.testing.assert_allclose(mean_delta([np.array([[1, 2]]), np.array([[3, -2]])]), [[2.0, 0.0]])
    expected = {"fc.L": (4, 2), "fc.R": (3, 2)}
    good = {"fc.L": np.ones((4, 2), np.float32), "fc.R": np.ones((3, 2), np.float32)}
    assert check_update(good, expected) is None
    assert "NaN" in check_update({**good, "fc.R": np.full((3, 2), np.nan, np.float32)}, expected)
    assert "shape" in check_update({**good, "fc.L": np.ones((4, 3), np.float32)}, expected)
    assert "missing" in check_update({"fc.L": good["fc.L"]}, expected)


def test_config_from_toml_and_errors(tmp_path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        'devices = 4\nrounds = 3\nstrategies = ["local", "federated-lowrank"]\n'
        '[[faults]]\nkind = "corrupt"\ndevice = 1\nround = 0\n'
    )
    config = FleetConfig.load(path)
    assert config.devices == 4 and config.strategies == ("local", "federated-lowrank")
    assert config.faults == (Fault("corrupt", 1, 0),)
    assert FleetConfig.from_json(config.to_json()) == config
    assert config.device_classes(1) == (3, 4, 5, 6, 7)
    with pytest.raises(ValueError, match="unknown fleet config key"):
        FleetConfig.from_dict({"device": 3})
    with pytest.raises(ValueError, match="names device 5"):
        FleetConfig(devices=3, faults=(Fault("dropout", 5, 0),))
    with pytest.raises(ValueError, match="unknown fleet strategies"):
        FleetConfig(strategies=("fedprox",))


class InProcessGrid:
    """A stand-in for Flower's Grid: delivers each message to the ClientApp in this process, an
    exception as an error reply and no reply from a device that took longer than the timeout (what
    Flower's engines do). A device's time is its real time plus the seconds it slept on the virtual
    clock ``sleep`` (patched into the app, so a silent device costs the test nothing)."""

    def __init__(self, devices: int) -> None:
        from flwr.app import Context, RecordDict

        self.contexts = {
            100 + k: Context(1, 100 + k, node_config={"partition-id": k}, state=RecordDict(), run_config={})
            for k in range(devices)
        }
        self.slept = 0.0

    def sleep(self, seconds: float) -> None:
        self.slept += seconds

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        from edgetrain.fleet.app import client_app

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            start, slept = time.perf_counter(), self.slept
            try:
                reply = client_app(message, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - the engines turn any ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=str(err)), reply_to=message)
            if timeout is None or time.perf_counter() - start + self.slept - slept <= timeout:
                replies.append(reply)
        return replies


@pytest.fixture
def in_process_serve(monkeypatch):
    """``serve`` of the ServerApp as an engine would run it, with devices on an :class:`InProcessGrid`
    of N devices: ``in_process_serve(N, config, out)``."""
    from flwr.supercore.task_identity import TaskIdentity

    from edgetrain.fleet import app

    for key in ("_run_id", "_node_id", "_task_id"):  # what an engine sets in the ServerApp's process
        monkeypatch.setattr(TaskIdentity, key, 1)

    def run(devices: int, config: FleetConfig, out):
        grid = InProcessGrid(devices)
        clock = SimpleNamespace(sleep=grid.sleep, monotonic=time.monotonic, perf_counter=time.perf_counter)
        monkeypatch.setattr(app, "time", clock)
        return app.serve(grid, config, out)

    return run


def test_a_rejected_update_and_a_dropped_device_do_not_stop_the_round(
    tmp_path, tiny_fleet, one_thread, in_process_serve
) -> None:
    config = tiny_fleet(
        devices=3,
        strategies=("federated-lowrank", "fedavg"),
        faults=(Fault("corrupt", 1, 0), Fault("dropout", 2, 1)),
        gate_samples=0,
    )
    result = in_process_serve(3, config, tmp_path)
    assert json.loads((tmp_path / "fleet.json").read_text()) == json.loads(json.dumps(result))
    shapes = {"conv1": (4, 9), "conv2": (4, 36), "conv3": (4, 36), "conv4": (4, 36), "fc1": (16, 64), "fc2": (10, 16)}
    factor_bytes = sum(
        npy_bytes((n, 4), np.float16) + npy_bytes((m, 4), np.float16) + npy_bytes((2,), np.float32)
        for n, m in shapes.values()
    )
    delta_bytes = sum(npy_bytes(shape, np.int16) for shape in shapes.values())
    nan_delta_bytes = sum(npy_bytes(shape, np.float32) for shape in shapes.values())  # NaN needs a float
    nan_factor_bytes = sum(
        npy_bytes((n, 4), np.float32) + npy_bytes((m, 4), np.float32) + npy_bytes((2,), np.float32)
        for n, m in shapes.values()
    )
    cases = (("federated-lowrank", factor_bytes, nan_factor_bytes), ("fedavg", delta_bytes, nan_delta_bytes))
    for strategy, payload, corrupt in cases:
        figures = result["strategies"][strategy]
        first, second, final = figures["rounds"]
        # round 0: device 1 sent NaN, the server named it and merged the other two
        assert [r["device"] for r in first["rejected"]] == [1] and "NaN" in first["rejected"][0]["reason"]
        assert first["accepted"] == 2 and first["downlink_bytes"] == 0
        assert first["uplink_bytes"] == 2 * payload + corrupt
        # round 1: device 2 dropped out half-way, the round went on with devices 0 and 1
        assert [d["device"] for d in second["dropped"]] == [2] and "dropped out" in second["dropped"][0]["reason"]
        assert second["accepted"] == 2 and second["uplink_bytes"] == 2 * payload
        assert second["downlink_bytes"] > 0 and second["downlink_bytes"] % 3 == 0
        # final scoring: device 2 rejoined from its state saved after round 0
        devices = {d["device"]: d for d in figures["devices"]}
        assert set(devices) == {0, 1, 2} and not final["dropped"] and not final["rejected"]
        assert devices[2]["samples"] == 8 and devices[0]["samples"] == 16
        for key in ("test_accuracy", "uplink_bytes", "downlink_bytes", "max_writes", "aux_memory_bits"):
            assert figures[key] is not None
    # federated low-rank writes the weights only at the two fleet update events: a cell changes at most twice
    lowrank = result["strategies"]["federated-lowrank"]
    assert 0 < lowrank["max_writes"] <= 2
    assert all(d["total_writes"] == d["fleet_update_writes"] for d in lowrank["devices"])


def test_a_silent_device_is_listed_and_the_round_goes_on(tmp_path, tiny_fleet, one_thread, in_process_serve) -> None:
    config = tiny_fleet(
        devices=3,
        strategies=("federated-lowrank",),
        round_timeout=60.0,
        faults=(Fault("silent", 1, 1),),
        gate_samples=8,
    )
    from edgetrain.fleet.device import gate_choice

    figures = in_process_serve(3, config, tmp_path)["strategies"]["federated-lowrank"]
    first, second, final = figures["rounds"]
    assert first["accepted"] == 3 and not first["silent"]
    # round 1: device 1 slept past the 60 s timeout (on the virtual clock); the server named it and
    # merged the other two
    assert second["silent"] == [{"device": 1, "node": 101}]
    assert second["accepted"] == 2 and not second["dropped"] and not second["rejected"]
    assert second["uplink_bytes"] == 2 * first["uplink_bytes"] // 3
    # the final round: every device (the silent one too) got the broadcast and reported
    assert final["downlink_bytes"] == first["uplink_bytes"] and not final["silent"]  # 3 x one payload
    devices = {d["device"]: d for d in figures["devices"]}
    assert set(devices) == {0, 1, 2}
    for index, device in devices.items():  # the gate judged the broadcasts; what it declined wrote nothing
        effects = device["fleet_update_per_round"]
        assert [e["round"] for e in effects] == ([2] if index == 1 else [1, 2])  # device 1's reply 1 was lost
        for effect in effects:
            scores = {
                k: effect[f"gate_{k}_accuracy"] for k in ("fleet", "own") if effect[f"gate_{k}_accuracy"] is not None
            }
            assert "fleet" in scores and effect["gate_choice"] == gate_choice(effect["gate_current_accuracy"], scores)
            assert effect["cells_written"] == 0 or effect["gate_choice"] != "keep"
        assert device["fleet_updates_declined"] == sum(e["gate_choice"] == "keep" for e in effects)
    assert devices[0]["fleet_update_per_round"][0]["gate_own_accuracy"] is not None  # it held its own update


def fleet_device(tiny_fleet, strategy: str = "federated-lowrank", **options):
    """Device 0 of a tiny fleet (the ``tiny_fleet`` fixture) under ``strategy``."""
    from edgetrain.fleet.device import FleetDevice

    return FleetDevice(tiny_fleet(strategies=(strategy,), **options), 0, strategy)


def broadcast_of(device, scale: float) -> dict[str, np.ndarray]:
    from edgetrain.fleet.merge import encode_factors

    rng = np.random.default_rng(3)
    update = {}
    for layer in device.trainer.net.weight_layers:
        n, m = layer.shape2d
        update.update(
            encode_factors(layer.name, (scale * rng.standard_normal((n, 4)), rng.standard_normal((m, 4))), 32)
        )
    return update


def broadcast_lsbs(layer, update, fleet_lr: float, lr: float) -> np.ndarray:
    """The unrounded fleet step of one layer in LSBs, written out: x = eta lr sqrt(R) L R^T / lsb (R = 8)."""
    from edgetrain.fleet.merge import decode_factors

    left, right = decode_factors(layer.name, update)
    return fleet_lr * lr * math.sqrt(8) * (left @ right.T) / layer.formats.weight.lsb


def test_the_fleet_step_is_eta_lr_sqrt_r_times_the_merged_product(tiny_fleet, one_thread) -> None:

    device = fleet_device(tiny_fleet, fleet_lr=0.5, lr=0.01, gate_samples=0)
    update = broadcast_of(device, 1.0)
    before = {name: array.codes.copy() for name, array in device.trainer.arrays.items()}
    written = device.apply(update)
    changed = 0
    for layer in device.trainer.net.weight_layers:
        array = device.trainer.arrays[layer.name]
        step = np.rint(broadcast_lsbs(layer, update, fleet_lr=0.5, lr=0.01))
        expected = np.clip(before[layer.name] - step, array.fmt.qmin, array.fmt.qmax)
        np.testing.assert_array_equal(array.codes, expected)
        np.testing.assert_array_equal(layer.codes(), expected)  # the network computes with what was written
        changed += int(np.count_nonzero(expected != before[layer.name]))
    assert written == changed > 0 and device.fleet_writes == written
    with pytest.raises(ValueError, match="fleet_lr must be > 0"):
        FleetConfig(fleet_lr=0.0)


def test_a_sparse_fleet_event_keeps_the_ceil_f_n_m_largest_cells(tiny_fleet, one_thread) -> None:
    """write_fraction f: of the non-zero cells of dW_q = round(x), only the ceil(f n m) with the
    largest |x| are written, every other cell keeps its code."""
    from edgetrain.fleet.device import sparse_step

    x = np.array([[2.6, -1.4, 0.2], [2.4, 0.3, -3.9]])
    step = np.rint(x).astype(np.int64)
    np.testing.assert_array_equal(sparse_step(step.copy(), x, 0.5), [[3, 0, 0], [2, 0, -4]])  # ceil(3) = 3 cells
    np.testing.assert_array_equal(sparse_step(step.copy(), x, 0.3), [[3, 0, 0], [0, 0, -4]])  # ceil(1.8) = 2
    np.testing.assert_array_equal(sparse_step(step.copy(), x, 0.1), [[0, 0, 0], [0, 0, -4]])  # ceil(0.6) = 1
    np.testing.assert_array_equal(sparse_step(step.copy(), x, 1.0), step)
    np.testing.assert_array_equal(sparse_step(step.copy(), x, 0.7), step)  # 5 cells allowed, 4 changed

    fraction = 0.1
    device = fleet_device(tiny_fleet, fleet_lr=0.5, lr=0.01, gate_samples=0, write_fraction=fraction)
    update = broadcast_of(device, 1.0)
    before = {name: array.codes.copy() for name, array in device.trainer.arrays.items()}
    written = device.apply(update)
    expected_writes = 0
    for layer in device.trainer.net.weight_layers:
        array = device.trainer.arrays[layer.name]
        x = broadcast_lsbs(layer, update, fleet_lr=0.5, lr=0.01)
        dense = np.rint(x)
        keep = math.ceil(fraction * x.size)
        magnitudes = np.sort(np.abs(x[dense != 0]))[::-1]
        threshold = magnitudes[keep - 1] if magnitudes.size > keep else 0.0
        sparse = np.where((dense != 0) & (np.abs(x) >= threshold), dense, 0)
        assert np.count_nonzero(sparse) == min(keep, np.count_nonzero(dense))
        expected = np.clip(before[layer.name] - sparse, array.fmt.qmin, array.fmt.qmax)
        np.testing.assert_array_equal(array.codes, expected)
        expected_writes += int(np.count_nonzero(expected != before[layer.name]))
    assert written == expected_writes > 0
    with pytest.raises(ValueError, match="write_fraction must be in"):
        FleetConfig(write_fraction=0.0)


def test_held_out_on_all_classes_while_the_stream_shows_a_subset(tiny_fleet) -> None:
    from edgetrain.fleet.device import DeviceStream

    config = tiny_fleet(test_classes="all", test_samples=60)
    stream = DeviceStream(config, 1)
    assert config.device_test_classes(1) == tuple(range(10)) and config.device_classes(1) == (3, 4, 5, 6, 7)
    assert set(stream.batch(0, 16)[1].tolist()) <= {3, 4, 5, 6, 7}
    assert not set(stream.test_set[1].tolist()) <= {3, 4, 5, 6, 7}
    assert stream.describe()["held_out_classes"] == list(range(10))
    assert tiny_fleet().device_test_classes(1) == (3, 4, 5, 6, 7)
    with pytest.raises(ValueError, match="unknown test_classes"):
        FleetConfig(test_classes="some")


def test_the_gate_choice() -> None:
    from edgetrain.fleet.device import gate_choice

    assert gate_choice(0.5, {"fleet": 0.5, "own": 0.5}) == "fleet"  # ties: the broadcast first
    assert gate_choice(0.5, {"fleet": 0.5, "own": 0.75}) == "own"
    assert gate_choice(0.5, {"fleet": 0.25, "own": 0.5}) == "own"  # own ties with the current weights
    assert gate_choice(0.5, {"fleet": 0.25, "own": 0.375}) == "keep"
    assert gate_choice(0.5, {"fleet": 0.625}) == "fleet" and gate_choice(0.5, {"fleet": 0.25}) == "keep"


def test_the_gate_scores_candidates_on_the_last_samples_and_writes_its_choice(
    tiny_fleet, one_thread, monkeypatch
) -> None:
    import copy

    from edgetrain.fleet.device import FleetDevice, prediction_accuracy

    device = fleet_device(tiny_fleet, gate_samples=8, bn_refresh=False)
    device.learn(12)
    device.report()  # the device keeps its own factors for the gate
    assert set(device.own) == {layer.name for layer in device.trainer.net.weight_layers}
    update = broadcast_of(device, 50.0)
    candidates = {"fleet": device.fleet_steps(update), "own": device.own_steps()}
    images, labels = device.stream.batch(4, 12)  # the ring buffer: the last 8 samples it learnt from
    want = {}
    for name, steps in candidates.items():
        shadow = copy.deepcopy(device.trainer.net)
        for layer in shadow.weight_layers:
            array = device.trainer.arrays[layer.name]
            layer.set_codes(np.clip(array.codes - steps[layer.name], array.fmt.qmin, array.fmt.qmax))
        want[name] = prediction_accuracy(shadow, images, labels)
    weights = [layer.weight.clone() for layer in device.trainer.net.weight_layers]
    assert device.shadow_accuracy(candidates) == (prediction_accuracy(device.trainer.net, images, labels), want)
    for layer, weight in zip(device.trainer.net.weight_layers, weights, strict=True):
        assert torch.equal(layer.weight, weight)  # the candidates were only tried, in RAM
    # the choice is written: nothing for "keep", the own update for "own" (one update event either way)
    before = {name: array.codes.copy() for name, array in device.trainer.arrays.items()}
    monkeypatch.setattr(FleetDevice, "shadow_accuracy", lambda self, c: (0.75, {"fleet": 0.5, "own": 0.625}))
    assert device.apply(update) == 0 and device.declined == 1 and device.metrics()["fleet_updates_declined"] == 1
    assert all(np.array_equal(device.trainer.arrays[name].codes, codes) for name, codes in before.items())
    pixels = images[0].numel()  # the buffer (8 samples of 8-bit pixels and an 8-bit label) is aux memory
    ungated = fleet_device(tiny_fleet, gate_samples=0).metrics()["aux_memory_bits"]
    assert device.metrics()["aux_memory_bits"] >= ungated + 8 * (8 * pixels + 8) == ungated + device.buffer_bits
    device.learn(4)
    device.report()
    norms = copy.deepcopy(device.own_norms)  # stateful max-norms: apply() must start from the same state
    own = device.own_steps()
    device.own_norms = norms
    monkeypatch.setattr(FleetDevice, "shadow_accuracy", lambda self, c: (0.5, {"fleet": 0.25, "own": 0.5}))
    before = {name: array.codes.copy() for name, array in device.trainer.arrays.items()}
    written = device.apply(update)
    assert device.own_writes == 1 and device.fleet_writes == 0 and written > 0
    for layer in device.trainer.net.weight_layers:
        array = device.trainer.arrays[layer.name]
        want_codes = np.clip(before[layer.name] - own[layer.name], array.fmt.qmin, array.fmt.qmax)
        np.testing.assert_array_equal(array.codes, want_codes)


class FutureTracingStream:
    """A device's stream that records the samples asked for and, with ``poison``, gives every sample
    the device has not reached yet a wrong label (a look-ahead would see them)."""

    def __init__(self, device, poison: bool) -> None:
        self.device, self.stream, self.poison = device, device.stream, poison
        self.asked: list[tuple[int, int]] = []

    def __getattr__(self, name: str):
        return getattr(self.stream, name)

    def batch(self, start: int, stop: int):
        self.asked.append((start, stop))
        images, labels = self.stream.batch(start, stop)
        if self.poison:
            future = torch.arange(start, stop) >= self.device.trainer.step_count
            labels = torch.where(future, (labels + 1) % 10, labels)
        return images, labels


@pytest.mark.parametrize("bn_refresh", [False, True])
def test_the_gate_uses_no_future_sample(tiny_fleet, one_thread, bn_refresh) -> None:
    """Two identical devices decide on the same broadcast, one of them with every future label
    poisoned: the same scores, choice and writes, and no sample at or past the device's step asked
    for. The BN refresh replays only the buffer and keeps the statistics of the written weights only."""
    runs = []
    for poison in (False, True):
        device = fleet_device(tiny_fleet, gate_samples=8, bn_refresh=bn_refresh)
        device.learn(12)
        device.report()
        device.stream = FutureTracingStream(device, poison)
        bn_before = [copy_state(bn) for bn in device.trainer.net.bn_layers]
        written = device.apply(broadcast_of(device, 0.5))
        assert device.stream.asked and all(stop <= 12 for _, stop in device.stream.asked)
        refreshed = [
            not states_equal(copy_state(bn), old)
            for bn, old in zip(device.trainer.net.bn_layers, bn_before, strict=True)
        ]
        runs.append((device.gate, written, {n: a.codes.copy() for n, a in device.trainer.arrays.items()}, refreshed))
    (gate, written, codes, refreshed), (gate_p, written_p, codes_p, _) = runs
    assert gate == gate_p and written == written_p
    assert all(np.array_equal(codes[name], codes_p[name]) for name in codes)
    assert any(refreshed) == (bn_refresh and written > 0)
    with pytest.raises(ValueError, match="bn_refresh replays the gate's sample buffer"):
        FleetConfig(gate_samples=0, bn_refresh=True)
    assert FleetConfig().refreshes_statistics and not FleetConfig(gate_samples=0).refreshes_statistics
    assert not FleetConfig(bn_refresh=False).refreshes_statistics


def copy_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a)


def test_a_rejoined_device_has_an_empty_buffer_and_writes_the_broadcast_ungated(tmp_path, tiny_fleet, one_thread):
    device = fleet_device(tiny_fleet, gate_samples=8)
    device.learn(12)
    device.report()
    device.save(tmp_path / "device.safetensors")
    rejoined = fleet_device(tiny_fleet, gate_samples=8)
    rejoined.restore(tmp_path / "device.safetensors")  # power lost: RAM (buffer, own factors) is gone
    assert rejoined.recent_samples()[1].numel() == 0 and not rejoined.own
    assert rejoined.apply(broadcast_of(rejoined, 50.0)) == rejoined.fleet_writes > 0 and rejoined.gate is None


def test_report_writes_plots_and_markdown(tmp_path) -> None:
    from edgetrain.fleet import write_report

    rounds = [
        {"round": 0, "final": False, "uplink_bytes": 10, "downlink_bytes": 0, "test_accuracy": 0.5,
         "rejected": [{"device": 1, "reason": "fc.L holds 8 NaN/inf value(s)"}], "dropped": [], "silent": []},
        {"round": 1, "final": True, "uplink_bytes": 0, "downlink_bytes": 30, "test_accuracy": 0.6,
         "rejected": [], "dropped": [], "silent": []},
    ]  # fmt: skip
    device = {"device": 0, "max_writes": 2}
    figures = {
        "test_accuracy": 0.6, "min_device_test_accuracy": 0.55, "online_accuracy": 0.5, "uplink_bytes": 10,
        "downlink_bytes": 30, "uplink_bytes_per_round": 10.0, "max_writes": 2, "total_writes": 5,
        "aux_memory_bits": 64, "rounds": rounds, "devices": [device],
    }  # fmt: skip
    report = write_report({"strategies": {"federated-lowrank": figures}}, tmp_path)
    text = report.read_text()
    assert "| federated-lowrank | 0.6000 |" in text and "rejected device 1" in text
    for name in ("accuracy_vs_round.png", "bytes_vs_accuracy.png", "writes_per_device.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_cli_rejects_a_bad_config_in_one_line(tmp_path, capsys) -> None:
    from edgetrain.cli import main

    bad = tmp_path / "fleet.toml"
    bad.write_text("devices = 2\nbogus = 1\n")
    assert main(["fleet", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "unknown fleet config key(s) ['bogus']" in capsys.readouterr().err
    assert main(["fleet", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "run")]) == 2


def test_cli_flags_override_the_config_fields(tmp_path) -> None:
    import argparse

    from edgetrain.cli.fleet import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    config = tmp_path / "fleet.toml"
    config.write_text("devices = 2\nwrite_fraction = 0.5\n")
    args = parser.parse_args(
        ["fleet", str(config), "--write-fraction", "0.05", "--test-classes", "all", "--gate-agree", "--out", "x"]
    )
    fleet = config_from_args(args)
    assert (fleet.devices, fleet.write_fraction, fleet.test_classes, fleet.gate_agree) == (2, 0.05, "all", True)
    kept = config_from_args(parser.parse_args(["fleet", str(config), "--out", "x"]))
    assert (kept.write_fraction, kept.test_classes, kept.gate_agree) == (0.5, "device", False)


def test_a_local_round_device_sends_nothing_and_writes_its_own_update(tiny_fleet, one_thread) -> None:
    """The ablation "local-round": federated low-rank's device without the fleet: nothing on the link,
    its own round update as the only candidate (ungated here: written as is)."""
    import copy

    device = fleet_device(tiny_fleet, "local-round", gate_samples=0, fleet_lr=4.0)
    assert device.apply({}) == 0  # nothing held yet
    device.learn(8)
    assert device.report() == {} and set(device.own) == {layer.name for layer in device.trainer.net.weight_layers}
    before = {name: array.codes.copy() for name, array in device.trainer.arrays.items()}
    norms = copy.deepcopy(device.own_norms)
    own = device.own_steps()
    device.own_norms = norms
    written = device.apply({})
    assert written > 0 and device.own_writes == 1 and device.fleet_writes == 0 and not device.own
    for layer in device.trainer.net.weight_layers:
        array = device.trainer.arrays[layer.name]
        want = np.clip(before[layer.name] - own[layer.name], array.fmt.qmin, array.fmt.qmax)
        np.testing.assert_array_equal(array.codes, want)


PERSONAL_CANDIDATES = {
    # own + broadcast in one event; own + broadcast on the cells where the two steps agree in sign;
    # the broadcast with the own update on the classifier (the last weight layer)
    "sum": lambda own, fleet, last: own + fleet,
    "agree": lambda own, fleet, last: own + np.where(np.sign(fleet) == np.sign(own), fleet, 0),
    "head": lambda own, fleet, last: own if last else fleet,
}


@pytest.mark.parametrize("personal", sorted(PERSONAL_CANDIDATES))
def test_a_personalised_candidate_writes_own_update_and_broadcast_in_one_event(
    personal, tiny_fleet, one_thread, monkeypatch
) -> None:
    import copy

    from edgetrain.fleet.device import FleetDevice, gate_choice

    assert gate_choice(0.5, {"fleet": 0.5, "own": 0.5, personal: 0.75}) == personal
    assert gate_choice(0.5, {"fleet": 0.75, "own": 0.5, personal: 0.75}) == "fleet"  # ties: the broadcast first
    tie = personal if personal == "head" else "own"  # the tie order: fleet, head, own, sum, agree
    assert gate_choice(0.5, {"fleet": 0.5, "own": 0.75, personal: 0.75}) == tie
    device = fleet_device(tiny_fleet, gate_samples=8, fleet_lr=4.0, **{f"gate_{personal}": True})
    device.learn(8)
    device.report()
    update = broadcast_of(device, 1.0)
    norms = copy.deepcopy(device.own_norms)
    own, fleet = device.own_steps(), device.fleet_steps(update)
    device.own_norms = norms
    tried = {}

    def shadow(self, candidates):
        tried.update(candidates)
        return 0.5, {"fleet": 0.5, "own": 0.5, personal: 0.625}

    monkeypatch.setattr(FleetDevice, "shadow_accuracy", shadow)
    before = {name: array.codes.copy() for name, array in device.trainer.arrays.items()}
    written = device.apply(update)
    assert set(tried) == {"fleet", "own", personal} and device.gate["choice"] == personal
    assert written == device.fleet_writes > 0 and device.own_writes == 0
    last = device.trainer.net.weight_layers[-1].name
    steps = {name: PERSONAL_CANDIDATES[personal](own[name], fleet[name], name == last) for name in own}
    assert any(not np.array_equal(steps[name], own[name]) for name in own)  # the broadcast took part
    for layer in device.trainer.net.weight_layers:
        array = device.trainer.arrays[layer.name]
        step = steps[layer.name]
        if personal == "agree":  # the fleet only reinforces the own update: no cell outside its support
            assert not step[own[layer.name] == 0].any()
        np.testing.assert_array_equal(array.codes, np.clip(before[layer.name] - step, array.fmt.qmin, array.fmt.qmax))


def test_a_fedavg_array_tracks_every_update_event_once() -> None:
    """FedAvg's delta: what the writes changed, through either entry of an update event (the rules
    write with apply_update, which may call write), each change counted once, drift left out."""
    from edgetrain.fixedpoint import FixedPointFormat
    from edgetrain.fleet.device import TrackedNVMArray
    from edgetrain.nvm import DriftSpec

    codes = np.arange(-6, 6).reshape(3, 4)
    array = TrackedNVMArray(codes, FixedPointFormat(8, True))
    array.apply_update(np.ones((3, 4), dtype=np.int64))
    array.apply_update(np.full((3, 4), -2, dtype=np.int64), np.ones((3, 4), dtype=np.int64))  # through write
    array.write(array.codes + 3)
    np.testing.assert_array_equal(array.written, array.codes - codes)
    np.testing.assert_array_equal(array.written, np.full((3, 4), 4))
    before = array.codes.copy()
    assert DriftSpec("digital", p0=1000.0).apply(array, 10, np.random.default_rng(0)) > 0  # drift: not a write
    assert not np.array_equal(array.codes, before)
    np.testing.assert_array_equal(array.written, np.full((3, 4), 4))


def test_fresh_gate_samples_are_in_no_report_until_the_next_one(tiny_fleet, one_thread) -> None:
    """gate_fresh: a round's report closes gate_samples = G samples before the round ends, so the gate
    scores on G samples in neither the own update nor the broadcast; those G samples open the next
    report. Against a device that learns the same stream and closes its sums at the written-out steps
    (S - G and 2S - G): the same factors in both reports, and the gate's buffer is exactly the G
    samples after the first report closed."""
    from edgetrain.fleet.device import pending_factors

    device = fleet_device(tiny_fleet, gate_samples=3, gate_fresh=True)
    twin = fleet_device(tiny_fleet, gate_samples=3)
    sums = []
    for stop in (8 - 3, 16 - 3):
        twin.learn_samples(stop)
        sums.append({name: pending_factors(state, 4) for name, state in twin.trainer.rule.layers.items()})
    device.learn(8)
    assert device.trainer.step_count == 8 and len(device.test_history) == 1
    first = device.report()
    images, _ = device.recent_samples()
    torch.testing.assert_close(images, device.stream.batch(5, 8)[0])  # the gate's buffer: the fresh samples
    # a zero broadcast: it ties with the current weights and ties go to it, so nothing is written and
    # the twin (which writes nothing) stays comparable; the gate still scored the own update
    assert device.apply(broadcast_of(device, 0.0)) == 0
    assert device.gate is not None and device.gate["choice"] == "fleet" and "own" in device.gate
    device.learn(8)
    second = device.report()
    for report, want in zip((first, second), sums, strict=True):
        for name, (left, right) in want.items():
            got = (report[f"{name}.L"].astype(np.float64), report[f"{name}.R"].astype(np.float64))
            got = (got[0] * report[f"{name}.scale"][0], got[1] * report[f"{name}.scale"][1])
            np.testing.assert_allclose(got[0] @ got[1].T, left @ right.T, atol=2e-3 * np.abs(left @ right.T).max())
    with pytest.raises(ValueError, match="gate_fresh"):
        FleetConfig(gate_fresh=True, gate_samples=50, samples_per_round=50)
