"""Interchange with HF PEFT's adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

HF PEFT's files hold one method (one ``peft_type``). Each method with a file format registers a
:class:`Format` (LoRA here; the others in ``peftc/hf_*.py``): how to write its records as config fields
and tensors, how to load them back, and which spec an HF PEFT config stands for."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from peftc.interop.adapter_file import read_tensors
from peftc.errors import AdapterError, PassError, read_json
from peftc.fsutil import save_tensors, write_json

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


@dataclass(frozen=True)
class Format:
    """One method's HF PEFT file format. ``save(model, records) -> (config fields, tensors)``;
    ``load(model, records, config, tensors, path)`` copies the tensors in (shapes checked);
    ``spec_text(config, sites) -> str`` is the peftc spec the config describes; ``check(config, path)``
    refuses a config whose fields this format reads but cannot use (an AdapterError naming the field)."""
    method: str
    peft_type: str
    save: Callable
    load: Callable
    spec_text: Callable
    check: Callable | None = None


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.method] = fmt
    return fmt


def formats() -> dict[str, Format]:
    """Every registered format: LoRA's (below) and those :mod:`peftc.methods` registers."""
    import peftc.methods  # noqa: F401  (the methods' formats import this module: deferred)
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


def save_hf_peft(model, directory: str | Path) -> Path:
    """Write the adapters of a compiled model in HF PEFT's format."""
    fmt = format_for(model)
    fields, tensors = fmt.save(model, adapter_records(model))
    config = {"peft_type": fmt.peft_type, "task_type": TASK_TYPES[model.kind],
              "base_model_name_or_path": model.model_ref, "inference_mode": True, **fields}
    directory = Path(directory)
    save_tensors(directory / WEIGHTS, {k: v.detach().contiguous() for k, v in tensors.items()},
                 metadata={"format": "pt"})
    write_json(directory / CONFIG, config)
    return directory


def read_adapter(directory: str | Path) -> tuple[dict, Format]:
    """The config of an HF PEFT adapter directory and the format it is in, every field that format reads
    checked. The one validation of a directory's config: :func:`load_hf_peft` and :func:`load_adapter_weights`
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


def load_hf_peft(model, directory: str | Path):
    """Compile ``model`` (a transformers model or a reference) with the adapter an HF PEFT directory
    describes, and load its weights. Returns a CompiledModel."""
    from peftc.compiler.compiled import compile_prepared, prepare
    config, _ = read_adapter(directory)
    fmt = _format_of(config, Path(directory) / CONFIG)
    prepared = prepare(model)
    text = fmt.spec_text(config, prepared.sites)
    compiled = compile_prepared(prepared, text, filename=f"<spec from {Path(directory) / CONFIG}>")
    load_adapter_weights(compiled, directory)
    return compiled


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


@dataclass
class ModuleLora:
    """All LoRAs of one module as the single dense LoRA HF PEFT's files hold: A (rank×in), B (out×rank)
    and the rank and alpha that give ``scale`` under the file's ``use_rslora``. One LoRA on a whole module
    is written as it is; slices of a fused projection, or several statements on one module, become
    A = [A_1; A_2; ...] and a block-structured B = [B_1·s_1/s, B_2·s_2/s, ...] with s the first scale."""
    path: str
    records: list
    rank: int
    alpha: float

    @classmethod
    def of(cls, path: str, records: list, use_rslora: bool) -> "ModuleLora":
        if len(records) == 1 and records[0].roles is None:
            record = records[0]
            if record.rslora == use_rslora:
                return cls(path, records, record.r, record.alpha)
            root = math.sqrt(record.r)   # the statement disagrees with the flag: same scale, other alpha
            return cls(path, records, record.r, record.alpha * root if record.rslora else record.alpha / root)
        rank = sum(r.hf_rank for r in records)
        scale = records[0].scale
        return cls(path, records, rank, scale * (math.sqrt(rank) if use_rslora else rank))

    def tensors(self, gm) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.records[0].scale
        pairs = [r.factors(gm) for r in self.records]
        a = torch.cat([a for a, _ in pairs], 0)
        b = torch.cat([b * (r.scale / scale) if r.scale != scale else b
                       for r, (_, b) in zip(self.records, pairs)], 1)
        return a.contiguous(), b.contiguous()

    def load(self, gm, a: torch.Tensor, b: torch.Tensor, file_scale: float) -> None:
        row = 0
        for record in self.records:
            rank = record.hf_rank
            part_b = b[:, row:row + rank]
            if record.scale != file_scale:
                part_b = part_b * (file_scale / record.scale)
            record.load_factors(gm, a[row:row + rank], part_b)
            row += rank


def module_loras(model, use_rslora: bool) -> list[ModuleLora]:
    groups: dict[str, list] = {}
    for record in model.records:
        if record.method == "lora":
            groups.setdefault(record.site.path, []).append(record)
    return [ModuleLora.of(path, records, use_rslora) for path, records in groups.items()]


def _save_lora(model, records) -> tuple[dict, dict]:
    first = records[0]
    modules = module_loras(model, first.rslora)
    base = modules[0]
    fields = {
        "r": base.rank, "lora_alpha": base.alpha, "lora_dropout": first.dropout, "use_rslora": first.rslora,
        "target_modules": sorted(m.path for m in modules),
        "rank_pattern": {re.escape(m.path): m.rank for m in modules if m.rank != base.rank},
        "alpha_pattern": {re.escape(m.path): m.alpha for m in modules if m.alpha != base.alpha},
        "bias": "none", "fan_in_fan_out": any(r.site.kind == "conv1d" for r in records),
        "init_lora_weights": INIT_LORA_WEIGHTS[first.init], "modules_to_save": None,
    }
    tensors = {}
    for module in modules:
        a, b = module.tensors(model.graph_module)
        tensors[_key(module.path, "lora_A")] = a
        tensors[_key(module.path, "lora_B")] = b
    return fields, tensors


def read_config(directory: str | Path) -> dict:
    """``adapter_config.json`` as a dict; the fields every format shares checked (see :func:`read_adapter`
    for the rest)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise AdapterError(f"{path} does not exist: not an HF PEFT adapter directory")
    config = read_json(path, AdapterError)
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for field, default in UNSUPPORTED.items():
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


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= 3.4028234663852886e38)


def check_number(config: dict, key: str, path, default, low: float) -> None:
    """A finite float32 number above ``low``."""
    value = config.get(key, default)
    if not _is_number(value) or value <= low:
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


def _check_lora(config: dict, path) -> None:
    check_int(config, "r", path, 8)
    check_number(config, "lora_alpha", path, 8, 0)
    dropout = config.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        _refuse(path, "lora_dropout", dropout, "a probability in [0, 1)")
    check_bool(config, "use_rslora", path)
    check_bool(config, "fan_in_fan_out", path)
    check_modules(config, "target_modules", path)
    check_modules(config, "exclude_modules", path)
    check_layers(config, "layers_to_transform", path)
    check_patterns(config, "rank_pattern", path,
                   lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
    check_patterns(config, "alpha_pattern", path, lambda v: _is_number(v) and v > 0, "a finite number > 0")


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


def _load_lora(model, records, config: dict, tensors: dict, path) -> None:
    """LoRA weights into the matching sites, keeping the function the file describes (its scale is read
    from its config)."""
    groups: dict[str, list] = {}
    for record in records:
        groups.setdefault(record.site.path, []).append(record)
    modules = [ModuleLora.of(p, rs, bool(config.get("use_rslora"))) for p, rs in groups.items()]
    check_keys(path, tensors, {_key(m.path, n) for m in modules for n in ("lora_A", "lora_B")})
    scales = []                    # every module is checked before any is loaded
    for module in modules:
        a, b = tensors[_key(module.path, "lora_A")], tensors[_key(module.path, "lora_B")]
        site = module.records[0].site
        want_a, want_b = (module.rank, site.in_features), (site.out_features, module.rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterError(f"{path}: the LoRA of {module.path} has A {tuple(a.shape)} and B "
                               f"{tuple(b.shape)}; the compiled model expects A {want_a} and B {want_b}")
        rank = _pattern(config.get("rank_pattern") or {}, module.path, config.get("r", 8))
        alpha = _pattern(config.get("alpha_pattern") or {}, module.path, config.get("lora_alpha", 8))
        if rank != a.shape[0]:     # the file's own config must describe its own tensors, as HF PEFT requires
            raise AdapterError(f"{Path(path).with_name(CONFIG)}: the LoRA of {module.path} has rank {rank} "
                               f"by 'r'/'rank_pattern', but {path} holds rank-{a.shape[0]} factors "
                               f"(A {tuple(a.shape)}, B {tuple(b.shape)})")
        scales.append(alpha / (math.sqrt(rank) if config.get("use_rslora") else rank))
    for module, file_scale in zip(modules, scales):
        a, b = tensors[_key(module.path, "lora_A")], tensors[_key(module.path, "lora_B")]
        try:
            module.load(model.graph_module, a, b, file_scale)
        except PassError as exc:
            raise AdapterError(f"{path}: {exc}") from exc


register_format(Format("lora", "LORA", _save_lora, _load_lora, spec_text_for, _check_lora))
