"""Several adapters on one compiled base: :class:`AdapterBank` and its torch engine.

``AdapterBank.load(model, {name: run directory})`` captures the base once and compiles each directory's spec
(what ``peftc compile --out`` or ``peftc train`` wrote) on a copy of that capture, which reads the same base
tensors; it loads the adapter's weights, reads its effect (:func:`peftc.serve.stack.read_effect`) and drops
the compiled model. The serving graph is the base graph with one stacked branch per adapted site and a
``task_ids`` input (:func:`peftc.serve.stack.stack_effects`), made a KV-cache decoder step
(:func:`peftc.export.kvcache.cache_decoder`, ``task_ids`` an extra input over the batch). A soft prompt's or
a prefix's keys and values are a row's starting cache (:meth:`TorchEngine.start`), so rows of different
prompt and prefix lengths share a batch left-padded, their positions counted from the mask.

The engines implement :class:`peftc.serve.engine.Engine`; :meth:`AdapterBank.forward` runs whole sequences
through the same step, and ``export_onnx`` writes it for ONNX Runtime (:mod:`peftc.serve.bank_onnx`)."""
from __future__ import annotations

import dataclasses
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from peftc.compiler.compiled import CompiledModel, Prepared, compile_prepared, prepare
from peftc.compiler.passmanager import CompileContext
from peftc.errors import PeftcError
from peftc.export.kvcache import CacheDecoder, ExtraInput, cache_decoder
from peftc.heap import release_freed_memory
from peftc.graph.capture import copy_graph_module
from peftc.lang.spec import parse_file
from peftc.models import load_model
from peftc.rundir import manifest_dtype, read_manifest
from peftc.serve.bank_onnx import export_bank
from peftc.serve.engine import BASE
from peftc.serve.rows import RowCaches, join_starts
from peftc.serve.stack import Effect, read_effect, stack_effects

TASK_IDS = ExtraInput("task_ids", torch.int64, ("batch",))


class TorchEngine(RowCaches):
    """The bank's decoder step in torch (:class:`peftc.serve.engine.Engine`)."""

    def __init__(self, bank: "AdapterBank"):
        super().__init__(bank.names, bank.pasts, bank.decoder.layout.heads, bank.decoder.layout.max_length)
        self.decoder = bank.decoder
        self.dtype = bank.dtype

    def __call__(self, ids, mask, past, task_ids):
        tensors = [torch.from_numpy(np.ascontiguousarray(p)).to(self.dtype) for p in past]
        with torch.no_grad():
            out = self.decoder(torch.from_numpy(np.ascontiguousarray(ids, np.int64)),
                               torch.from_numpy(np.ascontiguousarray(mask, np.int64)), *tensors,
                               torch.from_numpy(np.ascontiguousarray(task_ids, np.int64)))
        return out[0].float().numpy(), [t.float().numpy() for t in out[1:]]


class AdapterBank:
    """Adapters (LoRA, IA3, soft prompts, prefixes, any mix in one spec) stacked on one base; see the module
    doc. ``names`` has ``__base__`` first; a row's task id is its name's index."""

    def __init__(self, decoder: CacheDecoder, names: list[str], pasts: dict[str, list[np.ndarray]],
                 model_ref: str, dtype: torch.dtype, directories: dict[str, Path]):
        self.decoder = decoder
        self.names = names
        self.pasts = pasts
        self.model_ref = model_ref
        self.dtype = dtype
        self.directories = directories
        self.active = BASE
        self._engine = TorchEngine(self)

    @classmethod
    def load(cls, model: nn.Module | str | None, adapters: dict[str, str | Path], dtype: str = "auto") -> "AdapterBank":
        """Load ``adapters`` ({name: run directory}) onto ``model`` (a transformers model, a model reference,
        or None for the one the directories' manifests name). ``dtype`` ``auto`` is the manifests' (they must
        agree), else it loads the reference in that dtype. Each adapter's compile is garbage once its effect is
        read, and what it freed goes back to the system before the next (:func:`release_freed_memory`): with
        SmolLM2-135M, 8 adapters took 15 MiB more resident memory than 1 for 12.3 MiB of extra adapters, and
        44 MiB while the heap kept it."""
        runs = _read_runs(adapters)
        refs = {ref for _, _, ref in runs.values()}
        if model is None and len(refs) > 1:
            raise PeftcError(f"the adapters were made on different models ({', '.join(sorted(refs))}); "
                             "a bank holds adapters of one base")
        if isinstance(model, str) or model is None:
            ref = model or (refs.pop() if refs else None)
            if ref is None:
                raise PeftcError("an adapter bank needs a model, or at least one adapter directory naming one")
            model = load_model(ref, dtype if dtype != "auto" else _agreed_dtype(runs))
        prepared = prepare(model)
        if prepared.captured.kind != "causal-lm":
            raise PeftcError(f"an adapter bank serves a causal LM; {prepared.ref} is {prepared.captured.kind}")
        effects = {}
        for name, (directory, manifest, _) in runs.items():
            effects[name] = _effect(prepared, directory, manifest)
            release_freed_memory()
        serving = serving_model(prepared, list(effects.values()), list(effects))
        decoder = cache_decoder(serving, [TASK_IDS])
        pasts = {name: [t[None].numpy() for pair in e.past for t in pair] for name, e in effects.items() if e.past}
        bank = cls(decoder, [BASE, *effects], pasts, prepared.ref, prepared.dtype,
                   {name: run[0] for name, run in runs.items()})
        del effects, serving, prepared
        release_freed_memory()
        return bank

    # --- running it --------------------------------------------------------------------------------
    def torch_engine(self) -> TorchEngine:
        return self._engine

    def use(self, name: str) -> "AdapterBank":
        """Make ``name`` the adapter of every row when a call names none."""
        if name not in self.names:
            _unknown(name, self.names)
        self.active = name
        return self

    def forward(self, input_ids, attention_mask=None, adapter_names: list[str] | None = None) -> torch.Tensor:
        """Logits (B, S, V) of whole sequences (no cache kept), each row with its adapter (the active one
        when ``adapter_names`` is None): the decoder step from each row's starting cache."""
        ids = np.asarray(input_ids, np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        names = list(adapter_names) if adapter_names is not None else [self.active] * ids.shape[0]
        if len(names) != ids.shape[0]:
            raise PeftcError(f"{len(names)} adapter names for a batch of {ids.shape[0]} rows")
        for name in names:
            if name not in self.names:
                _unknown(name, self.names)
        past, start = join_starts(self._engine, names)
        logits, _ = self._engine(ids, np.concatenate([start, mask], 1), past, self._engine.task_ids(names))
        return torch.from_numpy(logits)

    __call__ = forward

    def export_onnx(self, directory: str | Path):
        """Write the bank's decoder for ONNX Runtime (:func:`peftc.serve.bank_onnx.export_bank`)."""
        return export_bank(self, directory)


def _unknown(name: str, names: list[str]):
    raise PeftcError(f"unknown adapter {name!r}; this bank serves {', '.join(names)}")


def _read_runs(adapters: dict[str, str | Path]) -> dict[str, tuple[Path, dict, str]]:
    runs = {}
    for name, directory in adapters.items():
        if not isinstance(name, str) or not name or name == BASE:
            raise PeftcError(f"{directory}: an adapter needs a name other than {BASE!r} (got {name!r})")
        runs[name] = read_manifest(Namespace(dir=directory, model=None))
    return runs


def _agreed_dtype(runs) -> str:
    dtypes = {manifest_dtype(manifest) for _, manifest, _ in runs.values()} or {"fp32"}
    if len(dtypes) > 1:
        raise PeftcError(f"the adapters were made on bases loaded in {', '.join(sorted(dtypes))}; pass dtype=")
    return dtypes.pop()


def _fresh(prepared: Prepared) -> Prepared:
    """The capture for one more compile: a copy of its graph module reading the same base tensors."""
    captured = dataclasses.replace(prepared.captured, gm=copy_graph_module(prepared.captured.gm))
    return dataclasses.replace(prepared, captured=captured, timings=dict(prepared.timings))


def _effect(prepared: Prepared, directory: Path, manifest: dict) -> Effect:
    """One adapter's effect: its spec compiled on a copy of the capture, its weights loaded, read, dropped."""
    model = compile_prepared(_fresh(prepared), parse_file(directory / manifest["spec"]),
                             autocast_adapter_dtype=manifest.get("autocast_adapter_dtype", True))
    model.load_adapter(directory)
    return read_effect(model, directory)


def serving_model(prepared: Prepared, effects: list[Effect], names: list[str]) -> CompiledModel:
    """The base graph (an empty spec compiled on a copy of the capture) taking ``task_ids`` (batch,) after
    ``input_ids`` and ``attention_mask``, with every effect stacked in (task 0 is the base)."""
    model = compile_prepared(_fresh(prepared), "")
    gm, graph = model.graph_module, model.graph_module.graph
    mask = [n for n in graph.nodes if n.op == "placeholder"][1]
    with graph.inserting_after(mask):
        task_ids = graph.placeholder(TASK_IDS.name)
    graph._codegen = torch.fx.graph.CodeGen()          # positional inputs: the capture's spec has two
    ctx = CompileContext(gm=gm, sites=model.sites, spec=model.spec, kind=model.kind, model_ref=model.model_ref,
                         config=model.config)
    stack_effects(ctx, effects, task_ids, names)
    graph.lint()
    gm.recompile()
    return model
