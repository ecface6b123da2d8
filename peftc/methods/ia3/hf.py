"""HF PEFT's IA3 files: ``ia3_l`` per module, (out, 1) for an output scale, (1, in) for a feedforward
(input) scale; ``feedforward_modules`` names the input-scaled modules."""
from __future__ import annotations

import json
import re

import torch

from peftc.errors import AdapterError
from peftc.interop.hf_peft import (KEY_PREFIX, Format, check_bool, check_keys, check_modules, register_format,
                                   targets_module)


def _key(path: str) -> str:
    return f"{KEY_PREFIX}{path}.ia3_l"


def _groups(records) -> dict[str, list]:
    groups: dict[str, list] = {}
    for record in records:
        groups.setdefault(record.site.path, []).append(record)
    return groups


def _save(model, records) -> tuple[dict, dict]:
    gm = model.graph_module
    tensors = {}
    for path, group in _groups(records).items():
        full = group[0].full(gm)
        for record in group[1:]:
            full = full * record.full(gm)
        tensors[_key(path)] = full.reshape(1, -1) if group[0].feedforward else full.reshape(-1, 1)
    fields = {"target_modules": sorted(_groups(records)),
              "feedforward_modules": sorted({r.site.path for r in records if r.feedforward}),
              "fan_in_fan_out": any(r.site.kind == "conv1d" for r in records),
              "init_ia3_weights": True, "modules_to_save": None}
    return fields, tensors


def _load(model, records, config: dict, tensors: dict, path) -> None:
    gm = model.graph_module
    groups = _groups(records)
    check_keys(path, tensors, {_key(p) for p in groups})
    for module_path, group in groups.items():
        value = tensors[_key(module_path)]
        feedforward = group[0].feedforward
        site = group[0].site
        want = (1, site.in_features) if feedforward else (site.out_features, 1)
        if tuple(value.shape) != want:
            raise AdapterError(f"{path}: the IA3 scale of {module_path} has shape {tuple(value.shape)}; the "
                               f"compiled model expects {want}")
        full = value.flatten()
        if len(group) == 1:
            group[0].load_full(gm, full)
            continue
        covered = torch.zeros_like(full, dtype=torch.bool)
        for record in group:
            weights = gm.get_submodule(record.module)
            inside = weights.perm < weights.ia3_l.numel()
            covered |= inside
            with torch.no_grad():
                weights.ia3_l[weights.perm[inside]] = full[inside].to(weights.ia3_l.dtype)
        if not torch.equal(full[~covered], torch.ones_like(full[~covered])):
            raise AdapterError(f"{path}: the IA3 scales of {module_path} are not 1 outside the slices "
                               "this spec adapts")


def _is_feedforward(config: dict, module_path: str) -> bool:
    modules = config.get("feedforward_modules") or ()
    if isinstance(modules, str):
        return re.fullmatch(modules, module_path) is not None
    return any(module_path == m or module_path.endswith("." + m) for m in modules)


def _spec_text(config: dict, sites) -> str:
    paths = []
    for site in sites.linears:
        if not targets_module(config, site.path):
            continue
        if _is_feedforward(config, site.path) != (site.role == "down"):
            raise AdapterError(f"the adapter scales the {'input' if site.role != 'down' else 'output'} of "
                               f"{site.path}; peftc's ia3 scales the input of down projections and the output "
                               "of every other linear, as HF PEFT's defaults do")
        paths.append(site.path)
    if not paths:
        raise AdapterError(f"the adapter's target_modules {config.get('target_modules')!r} match no linear "
                           f"of the model; it has {sites.summary()}")
    return "ia3 " + ", ".join(json.dumps(p) for p in paths) + "\n"


def _check(config: dict, path) -> None:
    check_modules(config, "target_modules", path)
    check_modules(config, "exclude_modules", path)
    check_modules(config, "feedforward_modules", path)
    check_bool(config, "fan_in_fan_out", path)


register_format(Format("ia3", "IA3", _save, _load, _spec_text, _check))
