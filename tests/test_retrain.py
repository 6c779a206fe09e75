"""The training loop and the TQT retraining recipe (DESIGN.md section 3)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.data import load_dataset
from edgetrain.graph.modules import TieSplitMaximum, quantize_activation
from edgetrain.tqt import RetrainConfig, TQTQuantizer, retrain, split_parameters
from edgetrain.training import Trainer, TrainHook, adam, evaluate, load_checkpoint, staircase, train_float


class TinyQuantNet(nn.Module):
    """A two-layer net with hand-placed TQT quantizers on the input, weights and activations."""

    def __init__(self, bits: int, log2_t: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)
        self.q_in = TQTQuantizer(bits, signed=False, log2_t=log2_t)
        self.q_w1 = TQTQuantizer(bits, signed=True, log2_t=log2_t)
        self.q_a1 = TQTQuantizer(bits, signed=False, log2_t=log2_t)
        self.q_w2 = TQTQuantizer(bits, signed=True, log2_t=log2_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_in(x.flatten(1))
        x = self.q_a1(F.relu(F.linear(x, self.q_w1(self.fc1.weight), self.fc1.bias)))
        return F.linear(x, self.q_w2(self.fc2.weight), self.fc2.bias)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "val")


@pytest.fixture(scope="module")
def pretrained(digits) -> dict[str, torch.Tensor]:
    train, val = digits
    torch.manual_seed(0)
    net = TinyQuantNet(8, 0.0)
    for q in (net.q_in, net.q_w1, net.q_a1, net.q_w2):
        q.enabled = False
    result = train_float(net, train, val, epochs=8, lr=3e-3, batch_size=32, progress=False)
    assert result.best_val_accuracy > 0.9
    return net.state_dict()


def test_trained_thresholds_beat_fixed_thresholds(digits, pretrained) -> None:
    train, val = digits
    accuracies = {}
    for train_thresholds in (True, False):
        net = TinyQuantNet(3, 1.0)  # 3-bit, thresholds too wide: weights are ~0.1
        net.load_state_dict({k: v for k, v in pretrained.items() if not k.endswith("log2_t")}, strict=False)
        config = RetrainConfig(
            epochs=3, batch_size=32, weight_lr=1e-4, threshold_lr=5e-2, train_thresholds=train_thresholds
        )
        retrain(net, train, val, config, progress=False)
        accuracies[train_thresholds] = evaluate(net, val)
        moved = net.q_w1.log2_t.item() != 1.0
        assert moved == train_thresholds
    assert accuracies[True] > accuracies[False] + 0.05, accuracies


def test_two_adam_groups_and_staircase(digits) -> None:
    net = TinyQuantNet(8, 0.0)
    weights, thresholds = split_parameters(net)
    assert len(thresholds) == 4 and len(weights) == 4
    shared = TinyQuantNet(8, 0.0)
    shared.q_w2.log2_t = shared.q_w1.log2_t  # a shared-scale group: one parameter object
    assert len(split_parameters(shared)[1]) == 3
    schedule = staircase(0.5, 1000 * 24 // 48)
    assert [schedule(s) for s in (0, 499, 500, 1000)] == [1.0, 1.0, 0.5, 0.25]
    assert RetrainConfig(batch_size=48).scaled(1000) == 500


def test_trainers_adam_equals_the_per_tensor_loop_bit_for_bit() -> None:
    """``training.adam`` (foreach kernels, used by every trainer) takes the same steps as torch's per-tensor
    loop on a quantized net's two groups (weights and scalar thresholds), to the last bit."""
    generator = torch.Generator().manual_seed(0)
    nets = [TinyQuantNet(8, 0.0) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = [p.detach().clone() for p in nets[0].parameters()]
    optimizers = []
    for net, make in zip(nets, (adam, lambda groups, **kw: torch.optim.Adam(groups, foreach=False, **kw)), strict=True):
        weights, thresholds = split_parameters(net)
        optimizers.append(make([{"params": weights, "lr": 1e-3}, {"params": thresholds, "lr": 1e-2}], eps=1e-8))
    assert optimizers[0].param_groups[0]["foreach"] and not optimizers[1].param_groups[0]["foreach"]
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=generator) for p in nets[0].parameters()]
        for net, optimizer in zip(nets, optimizers, strict=True):
            for p, g in zip(net.parameters(), grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(not torch.equal(a, b) for a, b in zip(nets[0].parameters(), start, strict=True))


def test_batch_norm_frozen_after_first_epoch(digits) -> None:
    train, _ = digits
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    bn = net[2]
    seen: list[tuple[int, bool]] = []

    class Spy(TrainHook):
        def on_step_end(self, trainer: Trainer, step: int) -> None:
            seen.append((step, bn.training))

    from edgetrain.tqt.retrain import FreezeBatchNorm

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    trainer = Trainer(
        net, opt, train.subset(64), None, epochs=2, batch_size=32, hooks=[FreezeBatchNorm(1), Spy()], progress=False
    )
    before = bn.running_mean.clone()
    trainer.run()
    assert [t for _, t in seen] == [True, True, False, False]
    assert not torch.equal(before, bn.running_mean)


def test_incremental_threshold_freezing(digits, pretrained) -> None:
    train, val = digits
    net = TinyQuantNet(8, 0.0)
    net.load_state_dict(pretrained)
    config = RetrainConfig(
        epochs=4,
        batch_size=32,
        weight_lr=1e-4,
        threshold_lr=1e-3,
        freeze_thresholds=True,
        freeze_start=48,
        freeze_every=10,
    )
    retrain(net, train, val, config, progress=False)
    frozen = [q.frozen for q in (net.q_in, net.q_w1, net.q_a1, net.q_w2)]
    assert any(frozen)


class StopAt(TrainHook):
    def __init__(self, step: int) -> None:
        self.stop = step

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        if step == self.stop:
            raise KeyboardInterrupt


def make_trainer(net: nn.Module, train, val, checkpoint: Path | None, hooks=()) -> Trainer:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    return Trainer(
        net, opt, train, val, epochs=3, batch_size=64, seed=5, hooks=hooks, checkpoint=checkpoint, progress=False
    )


def test_resume_reproduces_uninterrupted_run(digits, tmp_path: Path) -> None:
    train, val = digits
    torch.manual_seed(1)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    torch.manual_seed(2)
    full = make_trainer(reference, train, val, None).run()

    interrupted = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
    interrupted.load_state_dict(initial)
    torch.manual_seed(2)
    ckpt = tmp_path / "run.pt"
    steps_per_epoch = (len(train) + 63) // 64
    with pytest.raises(KeyboardInterrupt):
        make_trainer(interrupted, train, val, ckpt, hooks=[StopAt(steps_per_epoch + 3)]).run()
    assert ckpt.exists() and not (tmp_path / "run.pt.tmp").exists()
    resumed_net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
    resumed = make_trainer(resumed_net, train, val, ckpt, hooks=[StopAt(-1)]).run()
    assert resumed.history == full.history
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed_net.state_dict()[key]), key


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_diverging_loss_is_reported(digits) -> None:
    train, _ = digits
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        net[1].weight.fill_(float("nan"))
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    with pytest.raises(FloatingPointError, match="learning rate"):
        Trainer(net, opt, train.subset(32), None, epochs=1, batch_size=32, progress=False).run()


def test_checkpoint_of_another_run_is_refused(digits, tmp_path: Path) -> None:
    train, val = digits
    ckpt = tmp_path / "run.pt"
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    make_trainer(net, train.subset(128), val, ckpt).run()
    with pytest.raises(ValueError, match="belongs to another run"):
        make_trainer(net, train, val, ckpt).run()


def test_tie_split_maximum_has_torch_maximums_values_and_gradients() -> None:
    """QLeakyReLU's max: torch.maximum's values and gradients (ties split in half), on random values
    with many exact ties."""
    torch.manual_seed(0)
    a = torch.randint(-4, 5, (3, 4, 5, 5)).float() / 4
    b = torch.randint(-4, 5, (3, 4, 5, 5)).float() / 4  # ~1 in 9 elements tie
    g = torch.randn_like(a)
    fast = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    ref = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    y_fast, y_ref = TieSplitMaximum.apply(*fast), torch.maximum(*ref)
    (y_fast * g).sum().backward()
    (y_ref * g).sum().backward()
    assert bool((a == b).any()) and torch.equal(y_fast, y_ref)
    assert torch.equal(fast[0].grad, ref[0].grad) and torch.equal(fast[1].grad, ref[1].grad)


@pytest.mark.parametrize("log2_t", [2.0, 1.0, 3.0])  # thresholds 4, 2: ReLU6 fused; 8: not fused
def test_fused_relu6_equals_relu6_then_the_quantizer(log2_t: float) -> None:
    torch.manual_seed(0)
    x = torch.cat([torch.randn(500) * 4, torch.tensor([6.0, 5.9, 255.5 / 64, 4.0, 0.0, -0.0, -1.0])])
    g = torch.randn_like(x)
    fused, reference = TQTQuantizer(8, signed=False, log2_t=log2_t), TQTQuantizer(8, signed=False, log2_t=log2_t)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf = quantize_activation(fused.train(), xf, "relu6")
    yr = reference.train()(F.hardtanh(xr, 0.0, 6.0))
    (yf * g).sum().backward()
    (yr * g).sum().backward()
    assert torch.equal(yf, yr) and torch.equal(xf.grad, xr.grad)
    torch.testing.assert_close(fused.log2_t.grad, reference.log2_t.grad, rtol=1e-5, atol=1e-5)
