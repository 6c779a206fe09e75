"""The fleet's server merge, update checks, config and one in-process fleet run with faults.

The Flower engines themselves are exercised in tests/test_fleet_engines.py; here the ServerApp's
``serve`` talks to the ClientApp through a stand-in grid that delivers messages in-process.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

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


@pytest.fixture(scope="module")
def tiny_model(tiny_lrt_model_file) -> str:
    return tiny_lrt_model_file


class InProcessGrid:
    """A stand-in for Flower's Grid: delivers each message to the ClientApp in this process, and an
    exception as an error reply (what Flower's engines do)."""

    def __init__(self, devices: int) -> None:
        from flwr.app import Context, RecordDict

        self.contexts = {
            100 + k: Context(1, 100 + k, node_config={"partition-id": k}, state=RecordDict(), run_config={})
            for k in range(devices)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        from edgetrain.fleet.app import client_app

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            try:
                replies.append(client_app(message, self.contexts[node]))
            except Exception as err:  # noqa: BLE001 - the engines turn any ClientApp exception into an error reply
                replies.append(Message(Error(code=0, reason=str(err)), reply_to=message))
        return replies


def test_a_rejected_update_and_a_dropped_device_do_not_stop_the_round(
    tmp_path, tiny_model, one_thread, monkeypatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from edgetrain.fleet.app import serve

    for key in ("_run_id", "_node_id", "_task_id"):  # what an engine sets in the ServerApp's process
        monkeypatch.setattr(TaskIdentity, key, 1)

    config = FleetConfig(
        devices=3,
        rounds=2,
        samples_per_round=8,
        strategies=("federated-lowrank", "fedavg"),
        model=tiny_model,
        test_samples=20,
        faults=(Fault("corrupt", 1, 0), Fault("dropout", 2, 1)),
    )
    result = serve(InProcessGrid(3), config, tmp_path)
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
