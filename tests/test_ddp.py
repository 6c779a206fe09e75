"""Data-parallel TQT retraining: ``torchrun --standalone --nproc-per-node=2`` on CPU (gloo) equals a
single process on the same global batch; every rank holds the same weights and thresholds after every
step; rank 0's checkpoint resumes an interrupted run. On the labels and by distillation from the float
net (``DISTILL`` in the environment).

This file is also the script torchrun runs (``__main__``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from edgetrain.data import Dataset
from edgetrain.graph import QuantConfig, quantize
from edgetrain.tqt import RetrainConfig, retrain
from edgetrain.training import Trainer, TrainHook

INTERRUPT_AT = 5  # steps; the checkpoint before it is the one at step 4 (eval_every = 2)
DISTILL = "EDGETRAIN_TEST_DISTILL"  # environment: "logits" retrains on the float net's outputs


def _setup() -> tuple[nn.Module, Dataset, Dataset, RetrainConfig, nn.Module | None]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)
    )
    images = torch.rand(72, 1, 6, 6)
    labels = (images.mean((1, 2, 3)) * 3 * 2).long().clamp(0, 2)
    train = Dataset("toy", "train", images[:60], labels[:60], ("a", "b", "c"))  # batches of 16: 16, 16, 16, 12
    val = Dataset("toy", "val", images[60:], labels[60:], ("a", "b", "c"))
    qmodel = quantize(net.eval(), images[:1], images, QuantConfig(), mode="retrain")
    distill = os.environ.get(DISTILL, "none")
    recipe = RetrainConfig(
        epochs=2, batch_size=16, weight_lr=1e-2, threshold_lr=1e-2, bn_stat_epochs=0, eval_every=2, distill=distill
    )
    return qmodel, train, val, recipe, (net if distill != "none" else None)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class SameOnEveryRank(TrainHook):
    """After each step, rank 0's weights and thresholds are broadcast and compared bit for bit."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        import torch.distributed as dist

        mine = _flat(trainer.model)
        reference = mine.clone()
        dist.broadcast(reference, 0)
        if not torch.equal(mine, reference):
            raise AssertionError(f"rank {trainer.rank} differs from rank 0 after step {step}")


class Interrupt(TrainHook):
    """Stop every rank at step ``at`` (None: never), as a Ctrl-C would."""

    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def main(out: Path) -> None:
    """Under torchrun: an interrupted run, resumed from rank 0's checkpoint, every step checked."""
    import torch.distributed as dist

    from edgetrain.distributed import close_distributed, init_distributed, world

    torch.set_num_threads(1)
    init_distributed("cpu")
    rank, world_size = world()
    assert world_size == 2
    qmodel, train, val, recipe, teacher = _setup()
    checkpoint = out / "retrain.pt"
    try:
        retrain(
            qmodel,
            train,
            val,
            recipe,
            checkpoint=checkpoint,
            progress=False,
            hooks=[SameOnEveryRank(), Interrupt(INTERRUPT_AT)],
            teacher=teacher,
        )
    except KeyboardInterrupt:
        pass
    dist.barrier()
    qmodel, *_ = _setup()  # a fresh process would start from scratch too
    hooks = [SameOnEveryRank(), Interrupt(None)]
    retrain(qmodel, train, val, recipe, checkpoint=checkpoint, progress=False, hooks=hooks, teacher=teacher)
    if rank == 0:
        torch.save(qmodel.state_dict(), out / "ddp_final.pt")
    close_distributed()


@pytest.mark.parametrize("distill", ["none", "logits"])
def test_torchrun_two_ranks_equal_one_process_on_the_global_batch(tmp_path: Path, monkeypatch, distill: str) -> None:
    monkeypatch.setenv(DISTILL, distill)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc-per-node=2", __file__, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "retrain.pt").exists()  # rank 0's checkpoint
    ddp = torch.load(tmp_path / "ddp_final.pt", weights_only=True)
    qmodel, train, val, recipe, teacher = _setup()
    calibrated = {name: value.clone() for name, value in qmodel.state_dict().items()}
    retrain(qmodel, train, val, recipe, progress=False, teacher=teacher)
    single = qmodel.state_dict()
    assert ddp.keys() == single.keys()
    # The all-reduced mean of two half-batch gradients sums in another order than the one-process mean
    # (float32 reassociation, which depends on the host's SIMD kernels); Adam's normalisation turns a
    # last-bit gradient difference into up to ~1e-5 of weight after 8 steps (seen on an AVX-512 host).
    # A missing or wrong all-reduce moves weights by lr-sized steps (1e-2), far outside this tolerance.
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=3e-5, msg=f"{name} differs")
    thresholds = [name for name in single if name.endswith("log2_t")]
    assert thresholds and any(float(ddp[n]) != float(calibrated[n]) for n in thresholds)  # they were trained


def test_device_and_rank_share() -> None:
    from edgetrain.distributed import rank_share, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    images, labels = torch.arange(7.0).reshape(7, 1, 1, 1), torch.arange(7)
    shares = [rank_share(images, labels, rank, 3)[1].tolist() for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]  # every sample once, whatever the batch size


if __name__ == "__main__":
    main(Path(sys.argv[1]))
