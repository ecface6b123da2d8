"""Interchange with HF PEFT's adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

HF PEFT's files hold one method (one ``peft_type``). Each method with a file format registers a
:class:`Format` from its own package (``peftc/methods/<keyword>/hf.py``): how to write its records as config
fields and tensors, how to load them back, and which spec an HF PEFT config stands for. This module is what
they share: the registry, saving and loading a directory, and the checks of config fields."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peftc.interop.adapter_file import read_tensors
from peftc.errors import AdapterError, read_json
from peftc.fsutil import save_tensors, write_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION", "seq2seq-lm": "SEQ_2_SEQ_LM",
              "classifier": None}      # HF PEFT has no image-classification task: a plain PeftModel
#: adapter_config fields peftc does not implement; a file that sets them is refused, not half-loaded, unless
#: its format reads the field itself (:attr:`Format.reads`: LORA's target_parameters)
UNSUPPORTED = {"use_dora": False, "modules_to_save": None, "target_parameters": None,
               "layer_replication": None, "trainable_token_indices": None}


@dataclass(frozen=True)
class Format:
    """One method's HF PEFT file format. ``save(model, records) -> (config fields, tensors)``;
    ``load(model, records, config, tensors, path)`` copies the tensors in (shapes checked);
    ``spec_text(config, sites) -> str`` is the peftc spec the config describes; ``check(config, path)``
    refuses a config whose fields this format reads but cannot use (an AdapterError naming the field);
    ``reads`` names the :data:`UNSUPPORTED` fields it implements."""
    method: str
    peft_type: str
    save: Callable
    load: Callable
    spec_text: Callable
    check: Callable | None = None
    reads: tuple[str, ...] = ()


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.method] = fmt
    return fmt


def formats() -> dict[str, Format]:
    """Every registered format: those :mod:`peftc.methods` registers, which :mod:`peftc.compiler.compiled`
    (and so ``import peftc``) imports."""
    return FORMATS


def adapter_records(model) -> list:
    """The records that carry trained state (a quantized base, for one, carries none)."""
    return [r for r in model.records if r.parameters(model.graph_module)]


def format_for(model) -> Format:
    """The HF PEFT format that holds this model's adapters, or an AdapterError saying why none does."""
    methods = sorted({r.method for r in adapter_records(model)})
    if not methods:
        raise AdapterError("the model has no adapters to save")
    if len(methods) > 1:
        raise AdapterError(f"HF PEFT's adapter files hold one method; this model has {', '.join(methods)}")
    fmt = formats().get(methods[0])
    if fmt is None:
        raise AdapterError(f"HF PEFT has no adapter file format for '{methods[0]}'")
    return fmt


def task_type(model) -> str | None:
    """HF PEFT's task type for the model's kind. None (a plain PeftModel) for a model whose first input is not
    token ids: HF PEFT's seq2seq model passes ``input_ids`` to Whisper, which takes ``input_features``."""
    return TASK_TYPES[model.kind] if model.signature.names[0] == "input_ids" else None


def save_hf_peft(model, directory: str | Path) -> Path:
    """Write the adapters of a compiled model in HF PEFT's format."""
    fmt = format_for(model)
    fields, tensors = fmt.save(model, adapter_records(model))
    config = {"peft_type": fmt.peft_type, "task_type": task_type(model),
              "base_model_name_or_path": model.model_ref, "inference_mode": True, **fields}
    directory = Path(directory)
    save_tensors(directory / WEIGHTS, {k: v.detach().contiguous() for k, v in tensors.items()},
                 metadata={"format": "pt"})
    write_json(directory / CONFIG, config)
    return directory


def read_adapter(directory: str | Path) -> tuple[dict, Format]:
    """The config of an HF PEFT adapter directory and the format it is in, every field that format reads
    checked. The one validation of a directory's config: ``load_hf_peft`` and :func:`load_adapter_weights`
    (``CompiledModel.load_adapter``, ``peftc export``) both read through it."""
    config = read_config(directory)
    path = Path(directory) / CONFIG
    fmt = _format_of(config, path)
    if fmt.check is not None:
        fmt.check(config, path)
    return config, fmt


def load_adapter_weights(model, directory: str | Path) -> None:
    """Copy the weights of an HF PEFT adapter directory into the matching sites of ``model``."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{path} does not exist")
    config, fmt = read_adapter(directory)
    records = [r for r in adapter_records(model) if r.method == fmt.method]
    if not records:
        raise AdapterError(f"{path} holds a {fmt.peft_type} adapter; the compiled model has no "
                           f"'{fmt.method}' statement")
    fmt.load(model, records, config, read_tensors(path), path)


def _format_of(config: dict, path: Path) -> Format:
    by_type = {f.peft_type: f for f in formats().values()}
    fmt = by_type.get(config.get("peft_type"))
    if fmt is None:
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; peftc reads "
                           f"{', '.join(sorted(by_type))}")
    return fmt


def check_keys(path, tensors: dict, expected) -> None:
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise AdapterError(f"{path} does not fit the compiled model: "
                           f"unexpected keys {unknown[:3]}{'...' if len(unknown) > 3 else ''}, "
                           f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}")


def read_config(directory: str | Path) -> dict:
    """``adapter_config.json`` as a dict; the fields every format shares checked (see :func:`read_adapter`
    for the rest)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise AdapterError(f"{path} does not exist: not an HF PEFT adapter directory")
    config = read_json(path, AdapterError)
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(config).__name__}")
    fmt = next((f for f in formats().values() if f.peft_type == config.get("peft_type")), None)
    for field, default in UNSUPPORTED.items():
        if fmt is not None and field in fmt.reads:
            continue
        if config.get(field, default) not in (default, [], {}):
            raise AdapterError(f"{path}: '{field}' = {config[field]!r} is not supported by peftc")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias = {config['bias']!r} is not supported (only 'none')")
    return config


# ── checks of config fields: each names the file, the field and the value ──────────────────────────────
def _refuse(path, key: str, value, what: str):
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise AdapterError(f"{path}: '{key}' = {shown} is not {what}")


REQUIRED = object()


def check_int(config: dict, key: str, path, default=None, minimum: int = 1) -> None:
    """``config[key]`` is an integer >= ``minimum``; a missing key reads as ``default`` (None: the field is
    optional, :data:`REQUIRED`: it must be there)."""
    value = config.get(key, default)
    if value is REQUIRED:
        raise AdapterError(f"{path}: '{key}' is missing")
    if value is None and default is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _refuse(path, key, value, "a positive integer" if minimum == 1 else f"an integer >= {minimum}")


def is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= 3.4028234663852886e38)


def check_number(config: dict, key: str, path, default, low: float) -> None:
    """A finite float32 number above ``low``."""
    value = config.get(key, default)
    if not is_number(value) or value <= low:
        _refuse(path, key, value, f"a finite number > {low:g}")


def check_bool(config: dict, key: str, path) -> None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        _refuse(path, key, value, "true or false")


def _regex(path, key: str, text: str) -> None:
    try:
        re.compile(text)
    except re.error as exc:
        raise AdapterError(f"{path}: '{key}' has an invalid regular expression {text[:80]!r}: {exc}") from None
    except RecursionError:
        raise AdapterError(f"{path}: '{key}' has a regular expression nested too deeply: {text[:80]!r}...") from None


def check_modules(config: dict, key: str, path) -> None:
    """None, a regular expression (matched against whole module paths), or a list of module names."""
    value = config.get(key)
    if value is None:
        return
    if isinstance(value, str):
        _regex(path, key, value)
    elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _refuse(path, key, value, "a list of module names or a regular expression")


def check_parameters(config: dict, key: str, path) -> None:
    """None or a list of parameter names (HF PEFT's target_parameters: a string is refused there too)."""
    value = config.get(key)
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
        _refuse(path, key, value, "a list of parameter names")


def check_patterns(config: dict, key: str, path, value_ok, what: str) -> None:
    """A {regular expression: value} dict such as ``rank_pattern``."""
    value = config.get(key)
    if value is None:
        return
    if not isinstance(value, dict):
        _refuse(path, key, value, "an object of {regex: value}")
    for pattern, item in value.items():
        _regex(path, key, pattern)
        if not value_ok(item):
            raise AdapterError(f"{path}: '{key}' gives {pattern[:80]!r} the value {item!r}, which is not {what}")


def check_layers(config: dict, key: str, path) -> None:
    value = config.get(key)
    items = [value] if isinstance(value, int) else value
    if value is not None and (not isinstance(items, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items)):
        _refuse(path, key, value, "a layer index or a list of layer indices")


def check_probability(config: dict, key: str, path, default) -> None:
    """A number in [0, 1), such as a dropout."""
    value = config.get(key, default)
    if not is_number(value) or not 0 <= value < 1:
        _refuse(path, key, value, "a probability in [0, 1)")


# ── which modules a config adapts ──────────────────────────────────────────────────────────────────────
def _names(modules, path: str) -> bool:
    """Whether ``modules`` (a regular expression matched against the whole path, or a list of names each
    matching the path or its last dotted parts) names the module at ``path``."""
    if isinstance(modules, str):
        return re.fullmatch(modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in modules or ())


def targets_module(config: dict, path: str) -> bool:
    """HF PEFT's own rule for whether ``target_modules`` (less ``exclude_modules``) names the module at
    ``path``."""
    excluded = config.get("exclude_modules")
    return _names(config.get("target_modules"), path) and not (excluded and _names(excluded, path))
