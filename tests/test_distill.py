"""Retraining without labels: distillation from the float model (edgetrain.training.Distillation)."""

import pytest
import torch
import torch.nn.functional as F
from test_retrain import TinyQuantNet
from torch import nn

from edgetrain.data import Dataset, load_dataset, unlabelled
from edgetrain.tqt import RetrainConfig, retrain
from edgetrain.training import Distillation, outputs, train_float


def test_logits_loss_is_t2_kl_and_its_gradient_is_t_times_the_softmax_gap() -> None:
    """T^2 KL(softmax(t/T) || softmax(s/T)), mean over the batch; d/ds = T (softmax(s/T) - softmax(t/T)) / N."""
    torch.manual_seed(0)
    n, temperature = 5, 2.5
    t = torch.randn(n, 7) * 3
    s = (torch.randn(n, 7) * 3).requires_grad_()
    objective = Distillation(nn.Identity(), "logits", temperature)  # the teacher's output is its input: t
    loss = objective.loss(s, t, torch.zeros(n, dtype=torch.int64))
    p_t, log_p_s = F.softmax(t / temperature, 1), F.log_softmax(s / temperature, 1)
    expected = temperature**2 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    gap = F.softmax(s.detach() / temperature, 1) - p_t
    torch.testing.assert_close(s.grad, temperature * gap / n)
    summed = objective.loss(s.detach(), t, torch.zeros(n, dtype=torch.int64), reduction="sum")
    torch.testing.assert_close(summed, n * expected)
    assert float(objective.loss(t, t, torch.zeros(n, dtype=torch.int64))) == pytest.approx(0.0, abs=1e-6)


def test_label_weight_mixes_the_labels_cross_entropy_with_distillation() -> None:
    """a CE(s, y) + (1 - a) T^2 KL per sample; a = 1 is plain cross-entropy; scored by accuracy when a > 0."""
    torch.manual_seed(3)
    t, s, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    kd = Distillation(nn.Identity(), "logits", 2.0).loss(s, t, y)
    mixed = Distillation(nn.Identity(), "logits", 2.0, label_weight=0.25)
    torch.testing.assert_close(mixed.loss(s, t, y), 0.25 * F.cross_entropy(s, y) + 0.75 * kd)
    torch.testing.assert_close(Distillation(nn.Identity(), "logits", 2.0, 1.0).loss(s, t, y), F.cross_entropy(s, y))
    assert mixed.metric == "val_accuracy" and Distillation(nn.Identity()).metric == "val_agreement"
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = Dataset("x", "val", torch.randn(30, 1, 2, 2), torch.randint(0, 3, (30,)), ("a", "b", "c"))
    accuracy = float((outputs(net, data.images).argmax(1) == data.labels).float().mean())
    assert Distillation(net, "logits", label_weight=0.5).score(net, data) == pytest.approx(accuracy)
    with pytest.raises(ValueError, match="label_weight"):
        Distillation(nn.Identity(), "features", label_weight=0.5)
    with pytest.raises(ValueError, match="label_weight"):
        Distillation(nn.Identity(), "logits", label_weight=1.5)


def test_features_loss_is_one_minus_the_cosine() -> None:
    torch.manual_seed(1)
    t = torch.randn(4, 3, 2, 2)
    objective = Distillation(nn.Identity(), "features")
    labels = torch.zeros(4, dtype=torch.int64)
    s = torch.randn(4, 3, 2, 2)
    expected = (1 - F.cosine_similarity(s.flatten(1), t.flatten(1))).mean()
    torch.testing.assert_close(objective.loss(s, t, labels), expected)
    assert float(objective.loss(3 * t, t, labels)) == pytest.approx(0.0, abs=1e-6)  # scale does not matter
    assert float(objective.loss(-t, t, labels)) == pytest.approx(2.0)


def test_scores_are_agreement_with_the_teacher() -> None:
    torch.manual_seed(2)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    data = unlabelled(torch.randn(40, 3, 2, 2))
    negated = nn.Sequential(teacher, nn.Linear(5, 5, bias=False))
    with torch.no_grad():
        negated[1].weight.copy_(-torch.eye(5))
    for kind, same, opposite in (("logits", 1.0, None), ("features", 1.0, -1.0)):
        objective = Distillation(teacher, kind)
        assert objective.score(teacher, data) == pytest.approx(same)
        if opposite is not None:
            assert objective.score(negated, data) == pytest.approx(opposite)
    expected = (outputs(negated, data.images).argmax(1) == outputs(teacher, data.images).argmax(1)).float().mean()
    assert Distillation(teacher, "logits").score(negated, data) == pytest.approx(float(expected))


def test_distill_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="distill must be one of"):
        RetrainConfig(distill="soft")
    with pytest.raises(ValueError, match="set distill='logits'"):
        RetrainConfig(distill_label_weight=0.5)
    with pytest.raises(ValueError, match="temperature"):
        Distillation(nn.Identity(), "logits", 0.0)
    net, data = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), unlabelled(torch.rand(8, 1, 2, 2))
    with pytest.raises(ValueError, match="teacher=float_model"):
        retrain(net, data, None, RetrainConfig(distill="logits"), progress=False)
    with pytest.raises(ValueError, match="distill is 'none'"):
        retrain(net, data, None, RetrainConfig(), progress=False, teacher=net)
    wrong = Distillation(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), "logits")
    with pytest.raises(ValueError, match=r"teacher's outputs are \(8, 3\), the model's \(8, 2\)"):
        wrong.loss(net(data.images), data.images, data.labels)


@pytest.fixture(scope="module")
def float_digits_net() -> tuple[TinyQuantNet, Dataset, Dataset]:
    train, val = load_dataset("digits", "train"), load_dataset("digits", "val")
    torch.manual_seed(0)
    net = TinyQuantNet(8, 0.0)
    for q in (net.q_in, net.q_w1, net.q_a1, net.q_w2):
        q.enabled = False
    train_float(net, train, val, epochs=8, lr=3e-3, batch_size=32, progress=False)
    return net, train, val


def distilled(teacher: TinyQuantNet, train: Dataset, val: Dataset) -> tuple[TinyQuantNet, float, float]:
    """The teacher's weights at 3 bits (thresholds calibrated too wide), retrained on the teacher's logits;
    (student, agreement before, agreement after) on ``val``."""
    student = TinyQuantNet(3, 1.0)
    student.load_state_dict({k: v for k, v in teacher.state_dict().items() if not k.endswith("log2_t")}, strict=False)
    objective = Distillation(teacher, "logits")
    before = objective.score(student, val)
    config = RetrainConfig(epochs=3, batch_size=32, weight_lr=1e-4, threshold_lr=5e-2, distill="logits")
    retrain(student, train, val, config, progress=False, teacher=teacher)
    return student, before, objective.score(student, val)


def test_retraining_on_unlabelled_images_recovers_the_teachers_decisions(float_digits_net) -> None:
    teacher, train, val = float_digits_net
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = [m.training for m in teacher.modules()]
    student, before, after = distilled(teacher, unlabelled(train.images), unlabelled(val.images, split="val"))
    assert after > before + 0.05, (before, after)
    assert after > 0.9, after
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in weights.items())  # the teacher never trains
    assert [m.training for m in teacher.modules()] == modes  # its modes restored


def test_distillation_never_reads_the_labels(float_digits_net) -> None:
    teacher, train, val = float_digits_net
    scrambled = Dataset(train.name, "train", train.images, torch.randperm(len(train)) % 10, train.classes)
    a, _, after_a = distilled(teacher, unlabelled(train.images, name=train.name), val)
    b, _, after_b = distilled(teacher, scrambled, val)
    assert after_a == after_b
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
