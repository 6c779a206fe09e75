"""``edgetrain train | quantize | export | eval``: float pretraining, TQT quantization, integer/ONNX export.

    edgetrain train    --model resnet-tiny --data fashion-mnist --epochs 3 --out runs/resnet/float.pt
    edgetrain quantize --float runs/resnet/float.pt --mode retrain --weight-bits 4 --out runs/resnet/int4.pt --table
    edgetrain export   --checkpoint runs/resnet/int4.pt --format integer --out runs/resnet/int4-program
    edgetrain eval     --checkpoint runs/resnet/int4.pt --float runs/resnet/float.pt \
                       --integer runs/resnet/int4-program --onnx runs/resnet/int4.onnx

Checkpoints are ``torch.save`` dictionaries of tensors and plain values, written to a temporary file
and moved into place (``os.replace``), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from edgetrain.cli import CLIError, positive_float, positive_int
from edgetrain.data import Dataset, DataSource, Preprocess
from edgetrain.data.images import COLORS
from edgetrain.distributed import DEVICES, is_main_process
from edgetrain.export import IntegerProgram, ort_session, to_integer, to_onnx
from edgetrain.fixedpoint import Rounding, reject_nan
from edgetrain.graph import QuantConfig, QuantizedModel, build_quantized_model, quantize
from edgetrain.modelfile import read_model_file, save_model_file
from edgetrain.models import MODELS
from edgetrain.pipeline.config import QuantizeSection
from edgetrain.pipeline.models import model_from_spec, quant_settings
from edgetrain.tqt import CALIBRATION_METHODS
from edgetrain.tqt.retrain import BN_STATISTICS, DISTILL, RetrainConfig, retrain
from edgetrain.training import evaluate, train_float


def _finish(out: str, kind: str, meta: dict[str, Any], state_dict: dict[str, Any], **extra: Any) -> None:
    """Save the model file (``edgetrain.modelfile``), then drop the finished run's ``<out>.resume``."""
    if Path(out).is_dir():
        raise CLIError(f"--out {out} is a folder; give a file path for the checkpoint (e.g. {Path(out) / 'model.pt'})")
    save_model_file(out, kind, meta, state_dict, **extra)
    Path(out + ".resume").unlink(missing_ok=True)


def _split(source: str | DataSource, split: str, samples: int | None) -> Dataset:
    data = (source if isinstance(source, DataSource) else DataSource(source)).load(split)
    return data.subset(samples) if samples else data


def _data_source(args: argparse.Namespace, meta: dict[str, Any] | None = None) -> DataSource:
    """--data/--root/--image-size/--resize/--color/--mean/--std as a DataSource; without --data, the one
    a model file records (``meta``)."""
    if args.data is None and meta is not None:
        return DataSource.from_dict(meta["data"]) if meta.get("data") else DataSource(meta["dataset"])
    preprocess = Preprocess(args.image_size, args.resize, args.color, tuple(args.mean), tuple(args.std))
    return DataSource(args.data or "fashion-mnist", args.root, preprocess)


def _model_meta(args: argparse.Namespace, data: Dataset) -> dict[str, Any]:
    c, h, _ = data.input_shape
    return {
        "model": args.model,
        "num_classes": data.num_classes,
        "in_channels": c,
        "image_size": h,
        "dataset": data.name,
    }


def _float_model(meta: dict[str, Any]) -> nn.Module:
    return model_from_spec(meta["model"], meta["num_classes"], meta["in_channels"], meta["image_size"])


def load_float(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    state = read_model_file(path, "float")
    model = _float_model(state["meta"])
    model.load_state_dict(state["state_dict"])
    return model.eval(), state["meta"]


def load_quantized(path: str | os.PathLike[str]) -> tuple[QuantizedModel, dict[str, Any]]:
    """Rebuild a quantized model from an ``edgetrain quantize`` checkpoint (graph pass, then state dict)."""
    state = read_model_file(path, "quantized")
    meta = state["meta"]
    example = torch.zeros(1, meta["in_channels"], meta["image_size"], meta["image_size"])
    qmodel = build_quantized_model(_float_model(meta), example, QuantConfig(**state["config"]), state["mode"])
    qmodel.load_state_dict(state["state_dict"])
    return qmodel.eval(), meta


def cmd_train(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if Path(args.out).is_dir():
        raise CLIError(f"--out {args.out} is a folder; give a file path for the checkpoint")
    source = _data_source(args)
    train, val = _split(source, "train", args.train_samples), _split(source, "val", None)
    meta = {**_model_meta(args, train), "data": source.as_dict()}
    model = _float_model(meta)
    result = train_float(
        model,
        train,
        val,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint=args.out + ".resume",
    )
    _finish(args.out, "float", meta, model.state_dict())
    print(
        f"float {args.model}: val top-1 {100 * result.best_val_accuracy:.2f}% (epoch {result.best_epoch:.1f}) "
        f"-> {args.out}"
    )
    return 0


def layer_bits(text: str) -> tuple[str, int]:
    """``PATTERN=BITS`` of ``--layer-weight-bits``."""
    pattern, _, bits = text.rpartition("=")
    if not pattern or bits not in ("4", "8"):
        raise argparse.ArgumentTypeError(f"expected PATTERN=4 or PATTERN=8 (e.g. 'blocks.0.*=8'), got {text!r}")
    return pattern, int(bits)


def recipe_from_args(args: argparse.Namespace) -> RetrainConfig:
    """``edgetrain quantize --mode retrain``'s flags as the TQT recipe's :class:`RetrainConfig`."""
    return RetrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        weight_lr=args.weight_lr,
        bn_statistics=args.bn_statistics,
        seed=args.seed,
        device=args.device,
        distill=args.distill,
        distill_temperature=args.distill_temperature,
        distill_label_weight=args.distill_label_weight,
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    model, meta = load_float(args.float)
    if args.model and args.model != meta["model"]:
        raise ValueError(f"--model {args.model} but {args.float} holds a {meta['model']}")
    source = _data_source(args, meta)
    train, val = _split(source, "train", args.train_samples), _split(source, "val", None)
    config = quant_settings(
        QuantizeSection(
            weight_bits=args.weight_bits,
            act_bits=args.act_bits,
            first_last_weight_bits=args.first_last_weight_bits,
            depthwise_weight_bits=args.depthwise_weight_bits or 0,
            layer_weight_bits=dict(args.layer_weight_bits or []),
            rounding=args.rounding,
            weight_calibration=args.weight_calibration or "",
            calibration=args.calibration,
            allow_float=args.allow_float,
        )
    )
    calib = train.images[: args.calib]
    qmodel = quantize(model, calib[:1], calib, config, mode=args.mode)
    extra: dict[str, Any] = {}
    headline = f"{args.mode} {config.weight_bits}-bit-weight {meta['model']}"
    summary = ""  # the score against the float model when retraining read no labels, else top-1 below
    if args.mode == "retrain":
        recipe = recipe_from_args(args)
        teacher = model if recipe.distill != "none" else None
        result = retrain(qmodel, train, val, recipe, checkpoint=args.out + ".resume", teacher=teacher)
        if not is_main_process():  # under torchrun: rank 0 reports and writes the model file
            return 0
        extra["recipe"] = recipe.as_dict()  # recorded in the model file (bn_statistics among them)
        headline += f" (BN statistics: {args.bn_statistics})"
        if teacher is not None and not recipe.distill_label_weight:  # the labels may be placeholders
            score = "top-1 agreement" if recipe.distill == "logits" else "mean cosine"
            summary = f"val {score} with the float model {result.best_val_accuracy:.4f} (distilled; labels not used)"
    if not summary:
        summary = f"val top-1 {100 * evaluate(qmodel, val):.2f}% (float {100 * evaluate(model, val):.2f}%)"
    print(f"{headline}: {summary}")
    if args.table:
        print(qmodel.quantizer_table())
    if args.analyze:
        _print_analysis(qmodel, calib, val, args.analyze)
    _finish(args.out, "quantized", meta, qmodel.state_dict(), config=config.as_dict(), mode=args.mode, **extra)
    print(f"-> {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    qmodel, meta = load_quantized(args.checkpoint)
    if args.format == "integer":
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise CLIError(f"--out {args.out} is a file; an integer program is a folder (manifest + weights)")
        program = to_integer(qmodel, meta=program_meta(meta))
        _observe_macs(program, DataSource.from_dict(program_meta(meta)["data"]), args.calib)
        path = program.save(args.out)
    else:
        example = torch.zeros(2, meta["in_channels"], meta["image_size"], meta["image_size"])
        path = to_onnx(qmodel, args.out, example)
    print(f"{args.format} export -> {path}")
    return 0


def _observe_macs(program: IntegerProgram, source: DataSource, samples: int) -> None:
    """Run the first ``samples`` training images so the manifest's ``mac_bits`` records observed MAC widths."""
    try:
        images = _split(source, "train", samples).images
    except (ValueError, FileNotFoundError) as err:
        print(f"observed MAC widths not recorded (the {source.name!r} training images are unavailable: {err})")
        return
    program.run(images)
    widest = max((w["observed"] or 0 for w in program.mac_bits().values()), default=0)
    print(f"MAC widths observed on {len(images)} training images: up to {widest} bits (manifest mac_bits)")


def _batched(fn: Any, images: torch.Tensor, label: str, batch: int = 500) -> np.ndarray:
    parts = [fn(images[i : i + batch]) for i in tqdm(range(0, len(images), batch), desc=label, leave=False)]
    return np.concatenate(parts)


def program_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A program's provenance: the model file's meta plus the data source its streams use."""
    return {**meta, "data": meta.get("data") or {"name": meta["dataset"]}}


def cmd_eval(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        if args.integer is None:
            raise CLIError("give --checkpoint (a quantized model) or --program (an integer program), or both")
        return _eval_program(args)
    qmodel, meta = load_quantized(args.checkpoint)
    session = _onnx_session(args.onnx) if args.onnx else None  # every input file is checked before any work
    data = _split(_data_source(args, meta), args.split, args.samples)
    labels = data.labels.numpy()
    with torch.no_grad():
        fake = _batched(lambda x: qmodel(x).numpy(), data.images, "fake-quant")
    rows = [("fake-quant", fake, "")]
    if args.float:
        model, _ = load_float(args.float)
        with torch.no_grad():
            rows.insert(0, ("float", _batched(lambda x: model(x).numpy(), data.images, "float"), ""))
    integer_program = None
    if args.integer:
        integer_program = IntegerProgram.load(args.integer)
        out = _batched(integer_program.run, data.images, "integer")
        saturated = integer_program.stats.saturated_total
        rows.append(
            (
                "integer",
                out,
                f"{int((out != fake).any(axis=1).sum())} outputs differ from fake-quant; "
                f"{saturated} accumulator values saturated",
            )
        )
    if session is not None:
        reject_nan(bool(torch.isnan(data.images).any()), "the evaluation data")  # the graph cannot raise itself
        name = session.get_inputs()[0].name
        out = _batched(lambda x: session.run(None, {name: x.numpy()})[0], data.images, "onnx")
        agreement = 100 * np.mean(out.argmax(1) == fake.argmax(1))
        rows.append(("onnx", out, f"top-1 agrees with fake-quant on {agreement:.2f}%"))
    print(f"{meta['model']} on {data.name}/{args.split} ({len(data)} images)")
    print(f"{'model':<11} {'top-1':>7}  note")
    for label, out, note in rows:
        print(f"{label:<11} {100 * np.mean(out.argmax(1) == labels):>6.2f}%  {note}")
    if integer_program is not None:
        _print_mac_table(integer_program)
    return 0


def _onnx_session(path: str) -> Any:
    try:
        return ort_session(path)
    except Exception as err:  # onnxruntime raises its own types for files that are not ONNX
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{path} is not a loadable ONNX model ({type(err).__name__}: {first[:200]})") from None


def _eval_program(args: argparse.Namespace) -> int:
    """Top-1 of an integer program alone, on the data its manifest records (or --data)."""
    from edgetrain.data import DataSource

    program = IntegerProgram.load(args.integer)
    recorded = program.meta.get("data")
    if args.data is None and not recorded:
        raise CLIError(f"{args.integer} does not record its dataset; pass --data")
    source = DataSource(args.data) if args.data else DataSource.from_dict(recorded)
    data = source.load(args.split)
    data = data.subset(args.samples) if args.samples else data
    out = _batched(program.run, data.images, "integer")
    accuracy = 100 * np.mean(out.argmax(1) == data.labels.numpy())
    name = program.meta.get("model", "integer program")
    print(f"{name} ({args.integer}) on {data.name}/{args.split} ({len(data)} images)")
    print(f"integer top-1 {accuracy:.2f}%; {program.stats.saturated_total} accumulator values saturated")
    _print_mac_table(program)
    return 0


def _print_mac_table(program: IntegerProgram) -> None:
    """Per layer: MAC width (worst case, observed here), accumulator width and saturated accumulator values."""
    stats = program.stats
    print(f"\n{'layer':<24} {'MAC bits worst':>14} {'observed':>8} {'accumulator':>11} {'saturated':>10}")
    for layer, widths in program.mac_bits().items():
        saturated = stats.accumulator_saturated.get(layer, 0)
        share = saturated / max(stats.accumulator_values.get(layer, 0), 1)
        print(
            f"{layer:<24} {widths['worst_case']:>14} {widths['observed'] or '-':>8} "
            f"{'int' + str(widths['accumulator']):>11} {saturated:>10} ({share:.2%})"
        )


def _print_analysis(qmodel: QuantizedModel, calib: torch.Tensor, val: Dataset, png: str) -> None:
    """``--analyze``: per-quantizer SQNR / clipping and per-layer float recovery (edgetrain.analysis)."""
    from edgetrain.analysis import analysis_report

    table, path = analysis_report(qmodel.cpu(), calib, val.subset(1000), png)
    print(table)
    print(f"analysis plot -> {path}")


def register(subparsers: argparse._SubParsersAction) -> None:
    models = ", ".join(sorted(MODELS))

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
        p.add_argument("--seed", type=int, default=0)

    def data_spec(p: argparse.ArgumentParser) -> None:
        """The [data] keys of a pipeline config (docs/user-guide.md)."""
        p.add_argument("--root", default=None, help="data folder for --data folder (image tree, .npy or IDX)")
        p.add_argument("--image-size", type=int, default=0, help="square input side after resize + centre crop")
        p.add_argument("--resize", type=int, default=0, help="shorter side before the crop (default: --image-size)")
        p.add_argument("--color", default="", choices=COLORS, help="gray | rgb (default: as the images are)")
        p.add_argument("--mean", type=float, nargs="+", default=[], help="per-channel normalisation mean")
        p.add_argument("--std", type=float, nargs="+", default=[], help="per-channel normalisation std")

    p = subparsers.add_parser("train", help="float pretraining of a zoo model or your own (checkpointed)")
    p.add_argument("--model", required=True, help=f"one of: {models}; or path/to/file.py:build or module:build")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist | mnist | digits | folder (with --root)")
    data_spec(p)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--train-samples", type=positive_int, default=None, help="use the first N training images")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    common(p)
    p.set_defaults(handler=cmd_train)

    p = subparsers.add_parser("quantize", help="TQT quantization of a float checkpoint: static or retrain")
    p.add_argument("--float", required=True, help="float checkpoint from `edgetrain train`")
    p.add_argument("--model", help="zoo model name, checked against the float checkpoint")
    p.add_argument("--data", default=None, help="dataset (default: the one the float model was trained on)")
    data_spec(p)
    p.add_argument("--mode", choices=("static", "retrain"), default="static")
    p.add_argument("--weight-bits", type=int, choices=(8, 4), default=8)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--first-last-weight-bits", type=int, choices=(8, 4), default=8)
    p.add_argument(
        "--depthwise-weight-bits",
        type=int,
        choices=(8, 4),
        default=None,
        help="depthwise convs (default: --weight-bits)",
    )
    p.add_argument(
        "--layer-weight-bits",
        type=layer_bits,
        action="append",
        metavar="PATTERN=BITS",
        help="weight bits of the layers whose module path matches PATTERN (fnmatch; as --table prints them), "
        "e.g. 'blocks.0.*=8'; repeatable; overrides the other weight-bit flags",
    )
    p.add_argument("--rounding", default="half_even", choices=[r.value for r in Rounding])
    p.add_argument("--weight-calibration", default=None, choices=CALIBRATION_METHODS, help="default: max / 3sd")
    p.add_argument(
        "--calibration", default="auto", choices=CALIBRATION_METHODS, help="activation thresholds (default auto)"
    )
    p.add_argument("--allow-float", action="store_true", help="leave unsupported ops in float")
    p.add_argument("--calib", type=positive_int, default=512, help="calibration images")
    p.add_argument("--epochs", type=positive_int, default=1, help="retraining epochs")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--weight-lr", type=positive_float, default=1e-4)
    p.add_argument(
        "--bn-statistics",
        default="float",
        choices=BN_STATISTICS,
        help="where retraining's BN-statistics phase (before BN is frozen) takes the batch mean/variance: "
        "float = a second, float convolution (the TQT / Jacob et al. definition; default), quantized = the "
        "layer's own quantized-weight convolution (one conv instead of two; other numerics, opt-in)",
    )
    p.add_argument(
        "--distill",
        default="none",
        choices=DISTILL,
        help="retrain without labels: match the float model's logits (KL) or features (cosine); default none "
        "(the labels' cross-entropy)",
    )
    p.add_argument("--distill-temperature", type=positive_float, default=1.0, help="softmax temperature (logits)")
    p.add_argument(
        "--distill-label-weight",
        type=float,
        default=0.0,
        help="logits: weight a of the labels' cross-entropy beside (1 - a) x distillation (default 0: labels unused)",
    )
    p.add_argument("--train-samples", type=positive_int, default=None)
    p.add_argument("--table", action="store_true", help="print every quantizer")
    p.add_argument(
        "--analyze",
        nargs="?",
        const="quantize-analysis.png",
        metavar="PNG",
        help="per-quantizer SQNR and clipping, per-layer float recovery; plot to PNG (default quantize-analysis.png)",
    )
    p.add_argument("--device", default="cpu", choices=DEVICES, help="retraining device (torchrun: one per rank)")
    p.add_argument("--out", required=True)
    common(p)
    p.set_defaults(handler=cmd_quantize)

    p = subparsers.add_parser("export", help="integer program (manifest + safetensors) or ONNX QDQ")
    p.add_argument("--checkpoint", required=True, help="quantized checkpoint from `edgetrain quantize`")
    p.add_argument("--format", choices=("integer", "onnx"), default="integer")
    p.add_argument("--out", required=True, help="directory (integer) or .onnx file")
    p.add_argument("--calib", type=positive_int, default=512, help="training images run to observe MAC widths")
    p.set_defaults(handler=cmd_export)

    p = subparsers.add_parser("eval", help="float, fake-quant, integer and ONNX top-1 side by side")
    p.add_argument("--checkpoint", help="quantized checkpoint")
    p.add_argument("--float", help="float checkpoint")
    p.add_argument(
        "--program", "--integer", dest="integer", help="integer program folder (alone: its top-1 on its own data)"
    )
    p.add_argument("--onnx", help="ONNX file")
    p.add_argument("--data", default=None, help="dataset (default: the one the model file records)")
    data_spec(p)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--samples", type=positive_int, default=None, help="first N images of the split")
    common(p)
    p.set_defaults(handler=cmd_eval)
