"""Interchange with HF PEFT's adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .errors import AdapterError
from .fsutil import load_tensors, save_tensors, write_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
#: lora's init= option as HF PEFT's init_lora_weights
INIT_LORA_WEIGHTS = {"zero": True, "gaussian": "gaussian", "random": False}
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION"}
#: adapter_config fields peftc does not implement; a file that sets them is refused, not half-loaded
UNSUPPORTED = {"use_dora": False, "modules_to_save": None, "target_parameters": None,
               "layer_replication": None, "trainable_token_indices": None}


def _key(path: str, name: str) -> str:
    return f"{KEY_PREFIX}{path}.{name}.weight"


def _hf_alpha(record, use_rslora: bool) -> float:
    """The lora_alpha that gives ``record``'s scale under HF PEFT's single ``use_rslora`` flag: a site whose
    statement disagrees with the flag gets its alpha rescaled by sqrt(r), which yields the same scale."""
    if record.rslora == use_rslora:
        return record.alpha
    root = math.sqrt(record.r)
    return record.alpha * root if record.rslora else record.alpha / root


def save_hf_peft(model, directory: str | Path) -> Path:
    """Write the LoRA adapters of a compiled model in HF PEFT's format."""
    records = model.records
    if not records:
        raise AdapterError("the model has no adapters to save")
    others = sorted({r.method for r in records if r.method != "lora"})
    if others:
        raise AdapterError(f"HF PEFT's adapter format holds one method; this model also has {', '.join(others)}")
    first = records[0]
    rank_pattern = {re.escape(r.site.path): r.r for r in records if r.r != first.r}
    alpha_pattern = {re.escape(r.site.path): _hf_alpha(r, first.rslora) for r in records
                     if _hf_alpha(r, first.rslora) != first.alpha}
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES[model.kind],
        "base_model_name_or_path": model.model_ref, "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": first.dropout, "use_rslora": first.rslora,
        "target_modules": sorted({r.site.path for r in records}),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none",
        "fan_in_fan_out": any(r.site.kind == "conv1d" for r in records),
        "init_lora_weights": INIT_LORA_WEIGHTS[first.init], "inference_mode": True, "modules_to_save": None,
    }
    tensors = {}
    for record in records:
        for name, param in record.parameters(model.graph_module).items():
            tensors[_key(record.site.path, name)] = param
    directory = Path(directory)
    save_tensors(directory / WEIGHTS, tensors, metadata={"format": "pt"})
    write_json(directory / CONFIG, config)
    return directory


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise AdapterError(f"{path} does not exist: not an HF PEFT adapter directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from exc
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported yet (LORA is)")
    for field, default in UNSUPPORTED.items():
        if config.get(field, default) not in (default, [], {}):
            raise AdapterError(f"{path}: '{field}' = {config[field]!r} is not supported by peftc")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias = {config['bias']!r} is not supported (only 'none')")
    return config


def _targets(config: dict, path: str) -> bool:
    """HF PEFT's own rule for whether ``target_modules`` names the module at ``path``."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        hit = re.fullmatch(targets, path) is not None
    else:
        hit = any(path == t or path.endswith("." + t) for t in targets or ())
    excluded = config.get("exclude_modules")
    if excluded:
        if isinstance(excluded, str):
            hit = hit and re.fullmatch(excluded, path) is None
        else:
            hit = hit and not any(path == t or path.endswith("." + t) for t in excluded)
    return hit


def _pattern(patterns: dict, path: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def spec_text_for(config: dict, sites) -> str:
    """A peftc spec that selects exactly the modules HF PEFT would adapt, one statement per (r, alpha)."""
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    groups: dict[tuple, list[str]] = {}
    for site in sites.linears:
        if not _targets(config, site.path):
            continue
        if layers is not None and site.layer not in layers:
            continue
        r = _pattern(config.get("rank_pattern") or {}, site.path, config.get("r", 8))
        alpha = _pattern(config.get("alpha_pattern") or {}, site.path, config.get("lora_alpha", 8))
        groups.setdefault((r, alpha), []).append(site.path)
    if not groups:
        raise AdapterError(f"the adapter's target_modules {config.get('target_modules')!r} match no linear "
                           f"of the model; it has {sites.summary()}")
    rslora = "true" if config.get("use_rslora") else "false"
    dropout = float(config.get("lora_dropout", 0.0))
    lines = []
    for (r, alpha), paths in groups.items():
        quoted = ", ".join(json.dumps(p) for p in paths)
        lines.append(f"lora {quoted} r={int(r)} alpha={float(alpha)} dropout={dropout} rslora={rslora}")
    return "\n".join(lines) + "\n"


def load_adapter_weights(model, directory: str | Path) -> None:
    """Copy LoRA weights from an HF PEFT adapter directory into the matching sites of ``model``."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{path} does not exist")
    tensors = load_tensors(path)
    expected = {}
    for record in model.records:
        if record.method != "lora":
            continue
        for name, param in record.parameters(model.graph_module).items():
            expected[_key(record.site.path, name)] = param
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise AdapterError(f"{path} does not fit the compiled model: "
                           f"unexpected keys {unknown[:3]}{'...' if len(unknown) > 3 else ''}, "
                           f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for key, param in expected.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(param.shape):
            raise AdapterError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects "
                               f"{tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))


def load_hf_peft(model, directory: str | Path):
    """Compile ``model`` (a transformers model or a reference) with the LoRA an HF PEFT adapter
    directory describes, and load its weights. Returns a CompiledModel."""
    from .compiled import compile_prepared, prepare
    config = read_config(directory)
    prepared = prepare(model)
    text = spec_text_for(config, prepared.sites)
    compiled = compile_prepared(prepared, text, filename=f"<spec from {Path(directory) / CONFIG}>")
    load_adapter_weights(compiled, directory)
    return compiled
