"""HF PEFT's LORA files: ``lora_A`` (rank×in) and ``lora_B`` (out×rank) per module, with ``r``/``lora_alpha``
and the per-module ``rank_pattern``/``alpha_pattern`` giving each module's scale (alpha/r, or alpha/sqrt(r)
under ``use_rslora``). peftc writes one dense LoRA per module (:class:`ModuleLora`) and reads a config back
as the spec that selects exactly the modules HF PEFT would adapt (:func:`spec_text_for`).

Stacked expert weights are HF PEFT's ``target_parameters`` (its ParamWrapper): named by the parameter's path
(``model.layers.0.mlp.experts.gate_up_proj``), which is also what rank_pattern and alpha_pattern match, with
``lora_A`` (experts·r)×in and ``lora_B`` out×(r·experts) (:mod:`peftc.methods.lora.experts`). HF PEFT wraps
the adapted parameters of one module in nested wrappers, the first registered innermost, so their tensors
are keyed by the module's path with one ``.base_layer`` per adapted parameter registered after it
(``mlp.experts.base_layer.lora_A.weight`` for gate_up_proj beside ``mlp.experts.lora_A.weight`` for
down_proj). A target_parameters entry naming a linear's ``weight`` is a LoRA on that linear: how peftc
writes a router (``model.layers.0.mlp.gate.weight``; transformers 5's routers are not nn.Linear modules, and
for Mixtral and Qwen3-MoE HF PEFT rewrites a target_modules entry ending in ``.gate`` into ``gate.weight``,
which is every layer's router)."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from peftc.errors import AdapterError, PassError
from peftc.interop.hf_peft import (CONFIG, KEY_PREFIX, Format, check_bool, check_int, check_keys, check_layers,
                                   check_modules, check_number, check_parameters, check_patterns,
                                   check_probability, is_number, register_format, targets_module)

#: lora's init= option as HF PEFT's init_lora_weights
INIT_LORA_WEIGHTS = {"zero": True, "gaussian": "gaussian", "random": False}


def _key(path: str, name: str) -> str:
    return f"{KEY_PREFIX}{path}.{name}.weight"


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
            rank = record.parameters(gm)["lora_A"].shape[0]      # its rows of A (and columns of B) in the file
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


def _parameter(site) -> str | None:
    """The target_parameters entry peftc writes for a site: a stacked expert weight's path, a router's
    ``weight``; None for a linear written in target_modules."""
    if site.kind == "experts":
        return site.path
    return f"{site.path}.weight" if site.role == "router" else None


def _hf_key(module: ModuleLora) -> str:
    """What HF PEFT matches rank_pattern and alpha_pattern against: the parameter's path, or the module's."""
    return _parameter(module.records[0].site) or module.path


def _prefixes(gm, sites) -> dict[str, str]:
    """The module path HF PEFT's state dict keys each site's LoRA by: a linear's own path; for stacked expert
    weights, their module's path with one ``.base_layer`` per adapted parameter of that module registered
    after it (HF PEFT nests one wrapper per parameter, the first registered innermost)."""
    out, by_owner = {}, {}
    for site in sites:
        if site.kind == "experts":
            by_owner.setdefault(site.weight.rpartition(".")[0], []).append(site)
        else:
            out[site.path] = site.path
    for owner, group in by_owner.items():
        order = [name for name, _ in gm.get_submodule(owner).named_parameters(recurse=False)]
        group.sort(key=lambda site: order.index(site.weight.rpartition(".")[2]))
        for depth, site in enumerate(reversed(group)):
            out[site.path] = site.path.rpartition(".")[0] + ".base_layer" * depth
    return out


def _keys(model, modules: list[ModuleLora]) -> dict[str, tuple[str, str]]:
    """Each module's (lora_A key, lora_B key) in HF PEFT's state dict."""
    prefixes = _prefixes(model.graph_module, [m.records[0].site for m in modules])
    return {m.path: (_key(prefixes[m.path], "lora_A"), _key(prefixes[m.path], "lora_B")) for m in modules}


def _save(model, records) -> tuple[dict, dict]:
    first = records[0]
    modules = module_loras(model, first.rslora)
    parameters = [_hf_key(m) for m in modules if _parameter(m.records[0].site)]
    dropouts = sorted({r.dropout for r in records} - {0.0})
    if parameters and dropouts:
        raise AdapterError(f"HF PEFT's files hold one lora_dropout for every module, and its LoRA on a parameter "
                           f"({parameters[0]}) takes none; this model's lora statements use "
                           f"dropout={dropouts[0]:g}")
    base = modules[0]
    fields = {
        "r": base.rank, "lora_alpha": base.alpha, "lora_dropout": first.dropout, "use_rslora": first.rslora,
        "target_modules": sorted(m.path for m in modules if not _parameter(m.records[0].site)),
        **({"target_parameters": sorted(parameters)} if parameters else {}),
        "rank_pattern": {re.escape(_hf_key(m)): m.rank for m in modules if m.rank != base.rank},
        "alpha_pattern": {re.escape(_hf_key(m)): m.alpha for m in modules if m.alpha != base.alpha},
        "bias": "none", "fan_in_fan_out": any(r.site.kind == "conv1d" for r in records),
        "init_lora_weights": INIT_LORA_WEIGHTS[first.init], "modules_to_save": None,
    }
    tensors, keys = {}, _keys(model, modules)
    for module in modules:
        tensors[keys[module.path][0]], tensors[keys[module.path][1]] = module.tensors(model.graph_module)
    return fields, tensors


def _check(config: dict, path) -> None:
    check_int(config, "r", path, 8)
    check_number(config, "lora_alpha", path, 8, 0)
    check_probability(config, "lora_dropout", path, 0.0)
    check_bool(config, "use_rslora", path)
    check_bool(config, "fan_in_fan_out", path)
    check_modules(config, "target_modules", path)
    check_modules(config, "exclude_modules", path)
    check_parameters(config, "target_parameters", path)
    if config.get("target_parameters") and config.get("lora_dropout"):
        raise AdapterError(f"{path}: 'lora_dropout' = {config['lora_dropout']!r} with 'target_parameters', "
                           "which HF PEFT's LoRA on a parameter refuses (it has no input to drop)")
    check_layers(config, "layers_to_transform", path)
    check_patterns(config, "rank_pattern", path,
                   lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
    check_patterns(config, "alpha_pattern", path, lambda v: is_number(v) and v > 0, "a finite number > 0")


def _pattern(patterns: dict, path: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _rank_alpha(config: dict, path: str) -> tuple:
    """The (r, alpha) the config gives the module at ``path``: its pattern entry, else the defaults."""
    return (_pattern(config.get("rank_pattern") or {}, path, config.get("r", 8)),
            _pattern(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8)))


def _hf_name(config: dict, site) -> str | None:
    """The name HF PEFT gives ``site`` when the config adapts it (what rank_pattern and alpha_pattern match),
    else None: a linear in target_modules (less exclude_modules, within layers_to_transform) by its module
    path; a parameter in target_parameters (which, in HF PEFT, neither of those limits) by its own path, a
    stacked expert weight's or a linear's ``weight``."""
    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    if site.kind != "experts" and targets_module(config, site.path) and (layers is None or site.layer in layers):
        return site.path
    name = site.path if site.kind == "experts" else f"{site.path}.weight"
    if any(name == t or name.endswith("." + t) for t in config.get("target_parameters") or ()):
        return name
    return None


def spec_text_for(config: dict, sites) -> str:
    """A peftc spec that selects exactly the modules (and parameters) HF PEFT would adapt, one statement per
    (r, alpha)."""
    groups: dict[tuple, list[str]] = {}
    for site in sites.linears + sites.experts:
        name = _hf_name(config, site)
        if name is not None:
            groups.setdefault(_rank_alpha(config, name), []).append(site.path)
    if not groups:
        raise AdapterError(f"the adapter's target_modules {config.get('target_modules')!r} and target_parameters "
                           f"{config.get('target_parameters')!r} match nothing in the model; it has "
                           f"{sites.summary()}")
    rslora = "true" if config.get("use_rslora") else "false"
    dropout = float(config.get("lora_dropout", 0.0))
    lines = []
    for (r, alpha), paths in groups.items():
        quoted = ", ".join(json.dumps(p) for p in paths)
        lines.append(f"lora {quoted} r={int(r)} alpha={float(alpha)} dropout={dropout} rslora={rslora}")
    return "\n".join(lines) + "\n"


def _file_scale(module: ModuleLora, config: dict, a: torch.Tensor, b: torch.Tensor, path) -> float:
    """The scale the file's config gives ``module``, once its factors are checked to fit the compiled
    model and the config's own rank for them (r rows of A per expert, for stacked expert weights)."""
    site = module.records[0].site
    experts = max(site.experts, 1)
    want_a, want_b = (module.rank * experts, site.in_features), (site.out_features, module.rank * experts)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise AdapterError(f"{path}: the LoRA of {module.path} has A {tuple(a.shape)} and B "
                           f"{tuple(b.shape)}; the compiled model expects A {want_a} and B {want_b}")
    rank, alpha = _rank_alpha(config, _hf_name(config, site) or module.path)
    if rank * experts != a.shape[0]:     # the file's own config must describe its own tensors, as HF PEFT requires
        per = f" per expert of {experts}" if experts > 1 else ""
        raise AdapterError(f"{Path(path).with_name(CONFIG)}: the LoRA of {module.path} has rank {rank}{per} "
                           f"by 'r'/'rank_pattern', but {path} holds factors A {tuple(a.shape)}, "
                           f"B {tuple(b.shape)}")
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _load(model, records, config: dict, tensors: dict, path) -> None:
    """LoRA weights into the matching sites, keeping the function the file describes (its scale is read
    from its config)."""
    groups: dict[str, list] = {}
    for record in records:
        groups.setdefault(record.site.path, []).append(record)
    modules = [ModuleLora.of(p, rs, bool(config.get("use_rslora"))) for p, rs in groups.items()]
    keys = _keys(model, modules)
    check_keys(path, tensors, {k for pair in keys.values() for k in pair})
    factors = [(tensors[keys[m.path][0]], tensors[keys[m.path][1]]) for m in modules]
    scales = [_file_scale(m, config, a, b, path) for m, (a, b) in zip(modules, factors)]   # all checked first
    for module, (a, b), file_scale in zip(modules, factors, scales):
        try:
            module.load(model.graph_module, a, b, file_scale)
        except PassError as exc:
            raise AdapterError(f"{path}: {exc}") from exc


register_format(Format("lora", "LORA", _save, _load, spec_text_for, _check, reads=("target_parameters",)))
