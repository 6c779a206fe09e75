"""The pipeline configuration: one TOML (or YAML) file, one typed section per stage.

Every key has a documented default, so a config only names what it changes. Unknown sections or
keys are errors that list the valid ones (with a close match when there is one).

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

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class ModelSection:
    name: str = "mnistnet"  # a zoo model (edgetrain.models.MODELS)
    import_path: str = ""  # or "package.module:callable" returning an nn.Module (num_classes=..., optional)


@dataclass
class DataSection:
    dataset: str = "fashion-mnist"  # fashion-mnist | mnist | digits | folder
    root: str = ""  # folder for dataset = "folder" (or another location of the IDX files)
    train_samples: int = 0  # 0: the whole training split
    test_samples: int = 0  # 0: the whole test split
    seed: int = 0


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
    calibration_samples: int = 512
    retrain_epochs: int = 1  # 0 skips TQT retraining (static quantization only)
    retrain_samples: int = 0  # 0: the whole training split
    batch_size: int = 64
    weight_lr: float = 1e-4
    threshold_lr: float = 1e-2


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
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and how to fix it."""


KEY_ALIASES = {"import": "import_path"}


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
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
    return config_from_dict(raw)
