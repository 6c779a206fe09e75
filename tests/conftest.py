"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Batch-1 work: intra-op threads only add barrier waits (badly so on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def interrupt_adaptation_at(monkeypatch):
    """``interrupt_adaptation_at(step)``: the online trainer raises KeyboardInterrupt (Ctrl-C) before
    learning sample ``step``; ``interrupt_adaptation_at(None)`` lets it run again."""
    from edgetrain.adapt import OnlineTrainer

    original = OnlineTrainer.learn_sample

    def arm(step: int | None) -> None:
        def learn_sample(self, image, label):
            if self.step_count == step:
                raise KeyboardInterrupt
            return original(self, image, label)

        monkeypatch.setattr(OnlineTrainer, "learn_sample", original if step is None else learn_sample)

    return arm


@pytest.fixture(scope="module")
def tiny_lrt_model_file(tmp_path_factory) -> str:
    """An untrained 4-channel LRT net saved as an adaptation model file (tests of mechanics, not accuracy)."""
    from edgetrain.adapt.pretrain import build_qnet, save_model

    torch.manual_seed(0)
    spec = {"arch": "lrt-cnn", "width": 4, "hidden": 16}
    path = tmp_path_factory.mktemp("tiny-lrt") / "tiny.safetensors"
    save_model(build_qnet(spec), spec, path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_fleet(tiny_lrt_model_file):
    """FleetConfig(**fields) of the tiny LRT net: 2 devices x 2 rounds x 8 samples, 20 held-out samples
    each, unless ``fields`` say otherwise (the fleet tests' mechanics, not accuracy)."""
    from edgetrain.fleet import FleetConfig

    small = {"devices": 2, "rounds": 2, "samples_per_round": 8, "model": tiny_lrt_model_file, "test_samples": 20}
    return lambda **fields: FleetConfig(**{**small, **fields})
