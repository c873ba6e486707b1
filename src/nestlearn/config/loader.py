"""Build a :class:`RunConfig` from defaults, a named config and ``section.key=value`` overrides.

Resolution order: dataclass defaults < named config (YAML in ``configs/``) < overrides. Every key
and every value is checked before any work starts; an unknown key names the valid ones, a wrong
type names the expected one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from nestlearn.config.schema import SECTIONS, ModelConfig, RunConfig
from nestlearn.errors import ConfigError
from nestlearn.utils.shipped import shipped_dirs


def config_dirs() -> list[Path]:
    """Folders searched for named configs: the installed copy, then a source checkout's."""
    return shipped_dirs("configs")


def named_configs() -> list[str]:
    """Names of the configs shipped with nestlearn (``configs/*.yaml``)."""
    return sorted({p.stem for d in config_dirs() for p in d.glob("*.yaml")})


def find_config(name_or_path: str) -> Path:
    """Resolve a named config (``tiny``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    for d in config_dirs():
        candidate = d / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no config named {_quote(name_or_path)}; named configs: {', '.join(named_configs())} "
        "(or give a path to a .yaml file)"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the file") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def read_named(name_or_path: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A named config's mapping with its ``base:`` chain resolved (the base first, then this
    file's keys on top). When this file changes ``model.name``, the base's model keys that the new
    architecture does not have are dropped (``n_kv_heads`` of a Transformer base, say); the shared
    ones (``d_model``, ``n_layers``, ...) are inherited."""
    path = find_config(name_or_path)
    if str(path.resolve()) in _chain:
        cycle = " -> ".join([*_chain, str(path.resolve())])
        raise ConfigError(f"config 'base:' chain loops: {cycle}; remove one of the bases")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be the name of a config, got {base!r}")
    parent = read_named(base, (*_chain, str(path.resolve())))
    parent.pop("name", None)
    child_model = data.get("model") or {}
    parent_model = parent.get("model") or {}
    if isinstance(child_model, Mapping) and isinstance(parent_model, Mapping):
        name = child_model.get("name")
        if name is not None and name != parent_model.get("name", ModelConfig().name):
            fields = {f.name for f in dataclasses.fields(model_config_class(str(name)))}
            parent["model"] = {k: v for k, v in parent_model.items() if k in fields}
    return _merge(parent, data)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["train.steps=10", "model.d_model=64"]`` -> ``{"train": {"steps": 10}, ...}``.

    Values are parsed as YAML scalars (``true``, ``null``, ``1e-3``, ``[a, b]``); the schema
    decides the final type.
    """
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {_quote(item)} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        if len(parts) == 1:
            if parts[0] != "name":
                raise ConfigError(
                    f"override {_quote(item)} needs a section: one of {', '.join(SECTIONS)} "
                    f"(e.g. train.{parts[0] if parts[0].isprintable() else 'steps'}=...)"
                )
            nested["name"] = value
            continue
        if len(parts) != 2:
            raise ConfigError(f"override {_quote(item)}: keys are section.key, got {_quote(key)}")
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def _quote(text: str) -> str:
    """``'text'`` as typed, or its escaped ``repr`` when it holds a line break or another
    character that would not show (errors are one line)."""
    return f"'{text}'" if text.isprintable() else repr(text)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _unknown(kind: str, key: str, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown {kind} {_quote(key)}{hint}; valid: {', '.join(valid)}")


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint, converting the lossless cases (int->float, '1e-3')."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(where, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {hint}, got {value!r}")
    if origin is list:
        # ``model.cms_chunk_sizes=[8,32]`` arrives as a YAML list; each entry is checked.
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list like [1, 2], got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = int(value.replace("_", ""))
        if number is not None:
            if not -(2**63) <= number < 2**63:  # torch and numpy take 64-bit integers
                raise ConfigError(f"{where}: {number} is out of range (a 64-bit integer)")
            return number
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):  # no setting means nan or inf (0 means "off")
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(f"{where}: unsupported field type {hint}")
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{where}: expected {name}, got {value!r} ({type(value).__name__})")


def build_section(section: str, cls: type, values: Mapping[str, Any]) -> Any:
    """Instantiate a section dataclass from a mapping, checking keys and types."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"section '{section}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown(f"key in [{section}]", f"{key}", names)
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def model_config_class(name: str) -> type[ModelConfig]:
    # Imported here: models import the config schema, not the other way round.
    from nestlearn.models.registry import model_config_class as lookup

    return lookup(name)


def from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Validate a nested mapping and build the :class:`RunConfig` it describes."""
    valid_top = ["name", *SECTIONS]
    for key in data:
        if key not in valid_top:
            raise _unknown("section", key, valid_top)
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = data.get(section) or {}
        if section == "model":
            if not isinstance(values, Mapping):
                raise ConfigError(f"section 'model' must be a mapping, got {values!r}")
            cls = model_config_class(str(values.get("name", ModelConfig().name)))
        sections[section] = build_section(section, cls, values)
    name = _coerce("name", data.get("name", RunConfig().name), str)
    cfg = RunConfig(name=name, **sections)
    validate(cfg)
    return cfg


def load_config(
    name_or_path: str | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> RunConfig:
    """Defaults < named config < overrides, validated. ``None`` means defaults only."""
    data: dict[str, Any] = {}
    if name_or_path:
        data = read_named(name_or_path)
        data.setdefault("name", Path(name_or_path).stem)
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return from_dict(_merge(data, extra))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (readable by :func:`load_config`)."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    from nestlearn.utils.io import atomic_write_text

    atomic_write_text(Path(path), text)


def replace(cfg: RunConfig, overrides: Iterable[str] | Mapping[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with overrides applied and re-validated."""
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return from_dict(_merge(to_dict(cfg), extra))


# Every integer of a model config is a size or a count (widths, layers, heads, tokens; 0 means
# "default" or "off"). Sizes that shape tensors are at most _MAX_SIZE, so that products of two
# of them cannot overflow; chunk lengths only count tokens and may be "longer than any sequence".
_MAX_SIZE = 2**24
_CHUNK_LENGTHS = {"chunk_size", "other_chunk_size", "cms_chunk_sizes"}


def _validate_model_sizes(model: ModelConfig) -> None:
    """No model size is negative or (but chunk lengths) above ``_MAX_SIZE``; the shared floats
    are checked too. The architecture checks its own stricter ranges when it is built."""
    hints = typing.get_type_hints(type(model))
    for f in dataclasses.fields(model):
        if hints[f.name] not in (int, list[int]):
            continue
        value = getattr(model, f.name)
        values = value if hints[f.name] == list[int] else [value]
        if any(v < 0 for v in values):
            raise ConfigError(f"model.{f.name}={value} must be >= 0")
        if f.name not in _CHUNK_LENGTHS and any(v > _MAX_SIZE for v in values):
            raise ConfigError(f"model.{f.name}={value} is too large (at most {_MAX_SIZE:,})")
    if not model.norm_eps > 0:
        raise ConfigError(f"model.norm_eps={model.norm_eps} must be > 0")
    if model.init_std < 0:
        raise ConfigError(f"model.init_std={model.init_std} must be >= 0")


_CHOICES = {
    ("data", "tokenizer"): ("bpe", "byte"),
    ("optim", "name"): (
        "adamw",
        "adam_memory",
        "momentum",
        "preconditioned",
        "delta_momentum",
        "dmgd",
        "muon",
        "dgd",
        "m3",
    ),
    ("optim", "schedule"): ("cosine", "constant"),
    ("train", "precision"): ("auto", "fp32", "bf16", "fp16"),
    ("train", "compile_mode"): (
        "default",
        "reduce-overhead",
        "max-autotune",
        "max-autotune-no-cudagraphs",
    ),
    ("train", "parallel"): ("auto", "none", "ddp", "fsdp"),
}

_POSITIVE = {
    ("model", "d_model"),
    ("model", "n_layers"),
    ("model", "max_seq_len"),
    ("train", "steps"),
    ("train", "batch_size"),
    ("train", "seq_len"),
    ("train", "grad_accum"),
    ("train", "log_every"),
    ("train", "keep_last"),
    ("eval", "batch_size"),
}


def validate(cfg: RunConfig) -> None:
    """Range and choice checks that types alone cannot express."""
    _validate_model_sizes(cfg.model)
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}={value!r}; choose one of {', '.join(choices)}")
    for section, key in _POSITIVE:
        value = getattr(getattr(cfg, section), key)
        if value <= 0:
            raise ConfigError(f"{section}.{key}={value} must be > 0")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0")
    for beta in ("beta1", "beta2"):
        value = getattr(cfg.optim, beta)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"optim.{beta}={value} must be in [0, 1)")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be in [0, 1]")
    # Deep optimizers' settings (their classes check the same ranges at construction).
    ranges = {
        "eps": (cfg.optim.eps > 0, "> 0"),
        "weight_decay": (cfg.optim.weight_decay >= 0, ">= 0"),
        "matrix_lr": (cfg.optim.matrix_lr >= 0, ">= 0 (0 = the optimizer's default)"),
        "momentum": (0.0 <= cfg.optim.momentum < 1.0, "in [0, 1)"),
        "ns_steps": (cfg.optim.ns_steps >= 1, ">= 1"),
        "delta_gamma": (0.0 <= cfg.optim.delta_gamma <= 1.0, "in [0, 1]"),
        "dmgd_depth": (cfg.optim.dmgd_depth >= 1, ">= 1"),
        "dmgd_hidden": (cfg.optim.dmgd_hidden >= 0, ">= 0 (0 = the smaller side of the matrix)"),
        "m3_frequency": (cfg.optim.m3_frequency >= 1, ">= 1"),
        "m3_alpha": (cfg.optim.m3_alpha >= 0, ">= 0"),
        "m3_beta1": (0.0 < cfg.optim.m3_beta1 <= 1.0, "in (0, 1]"),
        "m3_beta2": (0.0 < cfg.optim.m3_beta2 <= 1.0, "in (0, 1]"),
        "m3_beta3": (0.0 < cfg.optim.m3_beta3 <= 1.0, "in (0, 1]"),
    }
    for key, (ok, expected) in ranges.items():
        if not ok:
            raise ConfigError(f"optim.{key}={getattr(cfg.optim, key)} must be {expected}")
    choices = {
        "preconditioner": ("identity", "diagonal", "kronecker"),
        "dmgd_objective": ("dot", "l2"),
        "dmgd_form": ("ours", "paper"),
    }
    for key, valid in choices.items():
        if getattr(cfg.optim, key) not in valid:
            raise ConfigError(
                f"optim.{key}={getattr(cfg.optim, key)!r}; choose one of {', '.join(valid)}"
            )
    if cfg.optim.dmgd_form == "paper" and cfg.optim.dmgd_objective != "dot":
        raise ConfigError(
            "optim.dmgd_form=paper has the paper's dot objective only; set "
            "optim.dmgd_objective=dot (or optim.dmgd_form=ours for the l2 objective)"
        )
    if cfg.data.tokenizer == "bpe" and cfg.data.vocab_size < 260:
        raise ConfigError(
            f"data.vocab_size={cfg.data.vocab_size} is too small for BPE "
            "(>= 260: 256 bytes + special tokens); use data.tokenizer=byte for bytes only"
        )
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len="
            f"{cfg.model.max_seq_len}; lower train.seq_len or raise model.max_seq_len"
        )
    if cfg.eval.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"eval.seq_len={cfg.eval.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    if not 0.0 < cfg.sample.top_p <= 1.0:
        raise ConfigError(f"sample.top_p={cfg.sample.top_p} must be in (0, 1]")
    if cfg.sample.temperature < 0:
        raise ConfigError(f"sample.temperature={cfg.sample.temperature} must be >= 0")
    for key in ("max_new_tokens", "top_k"):
        if getattr(cfg.sample, key) < 0:
            raise ConfigError(f"sample.{key}={getattr(cfg.sample, key)} must be >= 0")
