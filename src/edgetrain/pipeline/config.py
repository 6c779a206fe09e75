"""The pipeline configuration: one TOML (or YAML) file, one typed section per stage.

Every key has a documented default, so a config only names what it changes. Unknown sections or
keys are errors that list the valid ones (with a close match when there is one). A config is
validated whole before any stage runs (:func:`validate_config`: every number range-checked, every
rule, scenario, drift and dataset name known, all problems reported together), and
:func:`preflight` checks what needs the data and the model: it builds the model and traces it
through the quantization graph pass (every op supported), before anything is trained or deleted.

```toml
[model]
name = "mnistnet"                 # a zoo model, or: import = "my_package.nets:build" (a callable -> nn.Module)
[data]
dataset = "fashion-mnist"         # fashion-mnist | mnist | digits | folder (then root = "path")
[pretrain]
epochs = 2
[quantize]
weight_bits = 8
[adapt]
scenario = "shift"
rules = ["lowrank", "sgd", "bias-only"]
samples = 3000
[output]
dir = "runs/my-run"
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgetrain.data import Dataset

SUPPORTED_WEIGHT_BITS = (4, 8)  # the graph pass and the integer program are tested at INT8 and INT4
DRIFTS = ("", "analog", "digital")


@dataclass
class ModelSection:
    name: str = "mnistnet"  # a zoo model (edgetrain.models.MODELS)
    import_path: str = ""  # or "package.module:callable" / "path/to/file.py:callable" returning an nn.Module


@dataclass
class DataSection:
    dataset: str = "fashion-mnist"  # fashion-mnist | mnist | digits | folder
    root: str = ""  # folder for dataset = "folder" (or another location of the IDX files)
    train_samples: int = 0  # 0: the whole training split
    test_samples: int = 0  # 0: the whole test split
    seed: int = 0
    image_size: int = 0  # square input side after resize + centre crop (0: as stored)
    resize: int = 0  # shorter side before the centre crop (0: image_size)
    color: str = ""  # "gray" | "rgb" | "" (rgb when the training images have colour)
    mean: list[float] = field(default_factory=list)  # per-channel normalisation x' = (x - mean) / std
    std: list[float] = field(default_factory=list)


@dataclass
class PretrainSection:
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 128


@dataclass
class QuantizeSection:
    weight_bits: int = 8
    act_bits: int = 8
    first_last_weight_bits: int = 8
    depthwise_weight_bits: int = 0  # depthwise convs' weight bits (0: weight_bits)
    layer_weight_bits: dict[str, int] = field(default_factory=dict)  # {"module.path or fnmatch pattern": bits}
    calibration_samples: int = 512
    retrain_epochs: int = 1  # 0 skips TQT retraining (static quantization only)
    retrain_samples: int = 0  # 0: the whole training split
    batch_size: int = 64
    weight_lr: float = 1e-4
    threshold_lr: float = 1e-2
    bn_statistics: str = "float"  # retraining's BN-statistics phase: float conv (TQT definition) | quantized (one conv)
    distill: str = "none"  # retraining's loss: none (the labels) | logits | features (the float model's outputs)
    calibration: str = "auto"  # activation thresholds: auto (least quantization error) | kl_j | max | 3sd | ...
    weight_calibration: str = ""  # "": max (static) / 3sd (retrain)
    allow_float: bool = False  # leave ops the quantizer does not cover in float
    rounding: str = "half_even"  # half_even | half_away | floor


@dataclass
class ExportSection:
    onnx: bool = True
    verify_samples: int = 0  # 0: the whole test split must match bit for bit


@dataclass
class AdaptSection:
    scenario: str = "shift"
    drift: str = "digital"  # "", "analog" or "digital": drift added on top of the scenario
    rules: list[str] = field(default_factory=lambda: ["lowrank", "sgd", "bias-only"])
    samples: int = 3000
    shift_block: int = 750  # samples per distribution-shift block
    rank: int = 4
    lr: float = 0.003  # LowRank on a TQT-quantized mnistnet: 0.01 (the LRT paper's, for its net) overshoots
    seed: int = 0
    test_samples: int = 1000  # test images scored at each test point (4 per stream, and at the end)


@dataclass
class OutputSection:
    dir: str = "runs/demo"


@dataclass
class PipelineConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    quantize: QuantizeSection = field(default_factory=QuantizeSection)
    export: ExportSection = field(default_factory=ExportSection)
    adapt: AdaptSection = field(default_factory=AdaptSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as TOML (what the report prints to reproduce the run)."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)


def toml_value(value: Any) -> str:
    """A config value in TOML: JSON's spelling of strings, numbers, booleans and lists; tables inline."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and how to fix it."""


KEY_ALIASES = {"import": "import_path"}
NUMBER_LIST_KEYS = ("mean", "std")


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list and key in NUMBER_LIST_KEYS:
        numbers = isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if not numbers:
            raise ConfigError(f"[{section}] {key} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if expected is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()
        ):
            raise ConfigError(f'[{section}] {key} must be a table of "pattern" = integer, got {value!r}')
        return dict(value)
    if expected is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"[{section}] {key} must be a list of strings, got {value!r}")
        return value
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"[{section}] {key} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def config_from_dict(raw: dict[str, Any]) -> PipelineConfig:
    """Validate a parsed config (sections of keys) against :class:`PipelineConfig`."""
    config = PipelineConfig()
    sections = {f.name: f for f in fields(PipelineConfig)}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(
                f"unknown section [{section}]{_suggest(section, list(sections))}; valid sections: {', '.join(sections)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        target = getattr(config, section)
        valid = [f.name for f in fields(target)]
        for key, value in values.items():
            name = KEY_ALIASES.get(key, key)
            if name not in valid:
                raise ConfigError(
                    f"unknown key {key!r} in [{section}]{_suggest(key, valid)}; valid keys: {', '.join(valid)}"
                )
            setattr(target, name, _coerce(section, key, value, getattr(target, name)))
    return config


def _range_problems(config: PipelineConfig) -> list[str]:
    """Every out-of-range number of the config, as ``[section] key must be ..., got ...``."""
    problems: list[str] = []

    def need(section: str, key: str, ok: bool, rule: str) -> None:
        if not ok:
            problems.append(f"[{section}] {key} must be {rule}, got {getattr(getattr(config, section), key)!r}")

    def positive_number(section: str, key: str) -> None:
        value = getattr(getattr(config, section), key)
        need(section, key, math.isfinite(value) and value > 0, "a number > 0")

    data, pretrain, quant, adapt = config.data, config.pretrain, config.quantize, config.adapt
    for key in ("train_samples", "test_samples", "seed"):
        need("data", key, getattr(data, key) >= 0, ">= 0 (0: all)" if key != "seed" else ">= 0")
    need("pretrain", "epochs", pretrain.epochs >= 1, ">= 1")
    need("pretrain", "batch_size", pretrain.batch_size >= 1, ">= 1")
    positive_number("pretrain", "lr")
    bits = " or ".join(map(str, SUPPORTED_WEIGHT_BITS))
    need("quantize", "weight_bits", quant.weight_bits in SUPPORTED_WEIGHT_BITS, bits)
    need("quantize", "first_last_weight_bits", quant.first_last_weight_bits in SUPPORTED_WEIGHT_BITS, bits)
    need(
        "quantize", "depthwise_weight_bits", quant.depthwise_weight_bits in (0, *SUPPORTED_WEIGHT_BITS), f"0 or {bits}"
    )
    need(
        "quantize",
        "layer_weight_bits",
        all(v in SUPPORTED_WEIGHT_BITS for v in quant.layer_weight_bits.values()),
        f"a table of pattern = {bits}",
    )
    need("quantize", "act_bits", 2 <= quant.act_bits <= 16, "2 to 16")
    need("quantize", "calibration_samples", quant.calibration_samples >= 1, ">= 1")
    need("quantize", "retrain_epochs", quant.retrain_epochs >= 0, ">= 0 (0: static quantization only)")
    need("quantize", "retrain_samples", quant.retrain_samples >= 0, ">= 0 (0: all)")
    need("quantize", "batch_size", quant.batch_size >= 1, ">= 1")
    positive_number("quantize", "weight_lr")
    positive_number("quantize", "threshold_lr")
    need("export", "verify_samples", config.export.verify_samples >= 0, ">= 0 (0: the whole test split)")
    need("adapt", "samples", adapt.samples >= 1, ">= 1")
    need("adapt", "shift_block", adapt.shift_block >= 1, ">= 1")
    need("adapt", "rank", adapt.rank >= 1, ">= 1")
    need("adapt", "seed", adapt.seed >= 0, ">= 0")
    need("adapt", "test_samples", adapt.test_samples >= 1, ">= 1")
    positive_number("adapt", "lr")
    need("output", "dir", bool(config.output.dir.strip()), "a folder path")
    return problems


def _name_problems(config: PipelineConfig, rule_options_in_range: bool = True) -> list[str]:
    """Unknown model, dataset, scenario, drift or rule names (each with the valid ones), and the rules'
    own option checks when the ``[adapt]`` numbers passed the range checks (no problem reported twice)."""
    from edgetrain.adapt import rules
    from edgetrain.adapt.scenarios import SCENARIOS
    from edgetrain.data.datasets import DATASETS
    from edgetrain.data.images import COLORS
    from edgetrain.models import MODELS
    from edgetrain.tqt import CALIBRATION_METHODS
    from edgetrain.tqt.retrain import BN_STATISTICS, DISTILL

    problems: list[str] = []

    def known(section: str, key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
        if value not in choices:
            shown = ", ".join(repr(c) if c == "" else c for c in choices)
            problems.append(f"[{section}] {key} = {value!r} is unknown{_suggest(value, list(choices))}; valid: {shown}")

    model = config.model
    if model.import_path:
        module, _, attribute = model.import_path.partition(":")
        if not module or not attribute:
            problems.append(
                f"[model] import = {model.import_path!r} must look like 'package.module:callable' "
                "or 'path/to/file.py:callable'"
            )
    else:
        known("model", "name", model.name, sorted(MODELS))
    known("data", "dataset", config.data.dataset, DATASETS)
    known("data", "color", config.data.color, COLORS)
    known("quantize", "calibration", config.quantize.calibration, CALIBRATION_METHODS)
    known("quantize", "weight_calibration", config.quantize.weight_calibration, ("", *CALIBRATION_METHODS))
    known("quantize", "bn_statistics", config.quantize.bn_statistics, BN_STATISTICS)
    known("quantize", "distill", config.quantize.distill, DISTILL)
    if config.data.dataset == "folder" and not config.data.root:
        problems.append('[data] dataset = "folder" needs root = "<folder with the image files>"')
    adapt = config.adapt
    if not adapt.rules:
        return problems  # no adaptation stage: its settings are unused
    known("adapt", "scenario", adapt.scenario, SCENARIOS)
    known("adapt", "drift", adapt.drift, DRIFTS)
    if len(set(adapt.rules)) != len(adapt.rules):
        problems.append(f"[adapt] rules lists a rule twice: {adapt.rules}")
    for rule in adapt.rules:
        if rule not in rules.RULES:
            known("adapt", "rules", rule, list(rules.RULES))
        elif rule_options_in_range and hasattr(rules, "parse_rule_options"):
            try:
                rules.parse_rule_options(rule, rule_options(config, rule))
            except (TypeError, ValueError) as err:
                problems.append(f"[adapt] rule {rule!r}: {err}")
    return problems


def rule_options(config: PipelineConfig, rule: str) -> dict[str, Any]:
    """The ``[adapt]`` settings that rule ``rule`` takes (``lr`` for every learning rule, ``rank`` for lowrank)."""
    from edgetrain.adapt import rules

    offered = {"lr": config.adapt.lr, "rank": config.adapt.rank}
    accepted = {f.name for f in dataclasses.fields(rules.RULE_OPTIONS[rule])} if hasattr(rules, "RULE_OPTIONS") else {}
    return {key: value for key, value in offered.items() if key in accepted}


def validate_config(config: PipelineConfig) -> PipelineConfig:
    """Check the whole config (ranges and names) and raise one ConfigError listing every problem."""
    ranges = _range_problems(config)
    problems = ranges + _name_problems(config, not any(p.startswith("[adapt]") for p in ranges))
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise ConfigError(f"config has {count}: " + "; ".join(problems))
    return config


def preflight(config: PipelineConfig, train: Dataset) -> None:
    """What the config will do, checked before the first stage: the data is usable, the model builds
    for it and traces through the quantization graph pass with every op supported (or
    ``allow_float``), and, with ``[adapt] rules``, its integer program becomes the adapting device.

    Cheap: one graph rewrite of the untrained model on one zero image and one export of its
    (uncalibrated) integer program; no calibration or training."""
    import torch

    from edgetrain.graph import build_quantized_model
    from edgetrain.graph.quantize import UnsupportedOpError
    from edgetrain.pipeline.models import build_model, quant_settings

    if len(train) == 0:
        raise ConfigError(f"the training split of {config.data.dataset!r} holds 0 images; check [data]")
    model = build_model(config.model, train)
    settings = quant_settings(config.quantize)
    example = torch.zeros(1, *train.images.shape[1:])
    try:
        qmodel = build_quantized_model(model.eval(), example, settings, "static")
    except UnsupportedOpError as err:
        first = " ".join(line.strip() for line in str(err).splitlines())
        raise ConfigError(f"[model] cannot be quantized: {first}") from err
    except Exception as err:  # a model that does not trace or does not accept the data's shape
        raise ConfigError(
            f"[model] does not run on {config.data.dataset} images of shape {list(train.images.shape[1:])} "
            f"({type(err).__name__}: {err})"
        ) from err
    if config.adapt.rules:
        from edgetrain.adapt import DeviceNet
        from edgetrain.export import to_integer

        try:
            with contextlib.redirect_stderr(io.StringIO()):  # torch.fx's shape pass prints tracebacks itself
                DeviceNet.from_program(to_integer(qmodel.eval()))
        except Exception as err:  # an op the integer program or the device cannot run
            first = " ".join(line.strip() for line in str(err).splitlines())
            raise ConfigError(
                f"[adapt] the model cannot be adapted on the device ({type(err).__name__}: {first}); "
                "set [adapt] rules = [] to stop after the export"
            ) from err


def load_config(path: str | Path) -> PipelineConfig:
    """Read a ``.toml`` (or ``.yaml``/``.yml`` when PyYAML is installed) pipeline config."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("YAML configs need PyYAML (pip install pyyaml), or use TOML") from None
            raw = yaml.safe_load(text) or {}
        else:
            raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a table of sections")
    return validate_config(config_from_dict(raw))
