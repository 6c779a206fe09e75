"""Offline pretraining of the network that will adapt on the device, and its model files.

The LRT reference pretrains float then quantized-in-the-loop with the same 8/16/8-bit quantizers
(the authors' code). Here the :class:`QNet` itself is trained (quantized forward, STE backward,
full-precision gradients, batch statistics feeding the streaming-BN EMAs) with
``edgetrain.training.train_float``; what is saved is exactly the network the device starts from.
Model files are safetensors (:mod:`edgetrain.adapt.checkpoint`) holding the architecture spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetrain.adapt.checkpoint import CheckpointError, load_state, save_state
from edgetrain.adapt.qnet import QNet, quantize_for_adaptation
from edgetrain.data import Dataset
from edgetrain.modelfile import read_model_file
from edgetrain.models import LRTNet, create_model


def build_float(spec: dict[str, Any]) -> nn.Module:
    """A float model from a spec: ``{"arch": "lrt-cnn", "width": 128, "hidden": 512}`` builds the LRT
    paper net (narrower variants for quick runs); any other ``arch`` comes from the model zoo."""
    arch = spec.get("arch", "lrt-cnn")
    if arch == "lrt-cnn":
        return LRTNet(width=int(spec.get("width", 128)), hidden=int(spec.get("hidden", 512)))
    return create_model(arch, image_size=int(spec.get("image_size", 28)))


def build_qnet(spec: dict[str, Any]) -> QNet:
    """The paper-format :class:`QNet` of ``spec`` with fresh (float-initialised) parameters."""
    model = build_float(spec)
    model.eval()
    return quantize_for_adaptation(model)


def pretrain(
    spec: dict[str, Any],
    train: Dataset,
    val: Dataset | None,
    epochs: int = 2,
    lr: float = 2.5e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> tuple[QNet, float]:
    """Quantized-in-the-loop pretraining of ``spec`` (Adam, cosine decay); returns (net, best val acc)."""
    from edgetrain.training import train_float

    torch.manual_seed(seed)
    net = build_qnet(spec)
    net.set_online(False)
    result = train_float(net, train, val, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    return net, result.best_val_accuracy


def save_model(net: QNet, spec: dict[str, Any], path: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write a model file: the spec, free-form ``info`` and every parameter and buffer."""
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    save_state({"spec": spec, "info": info or {}, "state": state}, path)


def load_model(path: str | Path) -> tuple[QNet, dict[str, Any]]:
    """Read a :func:`save_model` file into a fresh :class:`QNet`; returns (net, its metadata)."""
    data = load_state(path)
    if "spec" not in data or "state" not in data:
        raise CheckpointError(f"{path} is not an edgetrain adaptation model file (no spec/state)")
    net = build_qnet(data["spec"])
    try:
        net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in data["state"].items()})
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not match its architecture {data['spec']}: {err}") from err
    return net, {"spec": data["spec"], "info": data.get("info", {})}


def load_for_adaptation(path: str | Path, arch: str | None = None) -> tuple[QNet, dict[str, Any]]:
    """The paper-format :class:`QNet` of a model file: an adaptation model file (:func:`save_model`),
    an ``edgetrain train`` float model file (its recorded architecture), or a bare float state dict of
    ``arch`` (default ``lrt-cnn``; bare state dicts do not record it), all read without unpickling.
    ``arch`` given for a file that records another one is a :class:`CheckpointError` naming both.
    A quantized model belongs on the device as its exported program (``edgetrain adapt --program``)."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"model file {source} does not exist")
    if source.suffix == ".safetensors":
        net, meta = load_model(source)
        recorded = meta["spec"].get("arch", "lrt-cnn")
        if arch is not None and arch != recorded:
            raise CheckpointError(f"{source} holds a {recorded}, not a {arch}; drop --arch (the file records it)")
        return net, meta
    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or pickled file
        raise CheckpointError(f"{source} is neither an adaptation model nor a float state dict: {err}") from err
    if isinstance(data, dict) and data.get("kind") == "quantized":
        raise CheckpointError(
            f"{source} is a quantized model: export it (`edgetrain export --format integer`) and adapt the "
            "program with `edgetrain adapt --program`"
        )
    spec: dict[str, Any] = {"arch": arch or "lrt-cnn"}
    if isinstance(data, dict) and data.get("kind") == "float":
        meta = read_model_file(source, "float", arch)["meta"]
        spec = {"arch": meta["model"], "image_size": meta.get("image_size", 28)}
        data = data["state_dict"]
    elif isinstance(data, dict):
        data = data.get("model", data.get("state_dict", data))
    model = build_float(spec)
    try:
        model.load_state_dict(data)
    except (RuntimeError, TypeError) as err:
        raise CheckpointError(f"{source} does not hold a {spec['arch']} state dict: {err}") from err
    model.eval()
    try:
        net = quantize_for_adaptation(model)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{spec['arch']} does not fit the paper-format device ({err}); quantize and export it, then "
            "`edgetrain adapt --program`"
        ) from None
    return net, {"spec": spec, "info": {"source": str(source)}}
