"""LoRA adapters that ONNX Runtime and onnxruntime-genai switch at run time on one loaded KV-cache decoder.

``export_switchable`` writes the ``--genai`` directory of an *unmerged* LoRA model: every LoRA site reads its
factors from two named graph inputs instead of weights, ``<site>.lora_A`` (in × rank) and ``<site>.lora_B``
(rank × out) (the site is the key of ``CompiledModel.adapter_parameters()``, ``[q,v]`` of a fused projection
written ``.q_v``), so that the branch is ``x @ lora_A @ lora_B``: the factors of the dense LoRA on the module,
stored as MatMul reads them, the scale alpha/r folded into ``lora_B``. Each rank is its own named axis
(``<site>.rank``), so adapters of other ranks load on the same model. Each input has an initializer of the
same name and rank 0 (ONNX's overridable initializer): with no adapter active the branch adds nothing and
the decoder is the base model's. ``OUT/adapters/<name>.onnx_adapter`` holds the run's factors in ONNX
Runtime's adapter format; ``onnxruntime.RunOptions.add_active_adapter`` and ``onnxruntime_genai.Adapters``
feed them. ``export_onnx_adapter`` writes another run's adapter for the same directory, once its sites,
input names and shapes (ranks aside) are the model's.

Verification, before anything takes its name: with each adapter active, ONNX Runtime's cached decoding gives
that adapter's merged model's logits and ``generate()``'s tokens (:func:`peftc.export.genai.verify_decoder`),
and with none active the base model's."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.fx import GraphModule

from peftc.compiler.compiled import CompiledModel
from peftc.errors import ExportError
from peftc.export.genai import (MODEL_FILE, ORIGIN_FILE, OnnxStep, _name_axes, _oracle, _tokenizer_files,
                                capture_decoder, genai_config, verify_decoder)
from peftc.export.kvcache import ExtraInput, cache_decoder
from peftc.export.onnx import _convert, quiet
from peftc.fsutil import atomic_dir, atomic_path, write_json
from peftc.graph.capture import copy_graph_module
from peftc.graph.rewrite import remove_branch
from peftc.methods.lora.rewrite import unfuse

aten = torch.ops.aten
ADAPTERS_DIR = "adapters"
SUFFIX = ".onnx_adapter"


@dataclass
class AdapterInput:
    """One site's pair of graph inputs: ``lora_A`` (in_features × rank), ``lora_B`` (rank × out_features)."""
    site: str
    in_features: int
    out_features: int

    @property
    def names(self) -> tuple[str, str]:
        return f"{self.site}.lora_A", f"{self.site}.lora_B"

    @property
    def rank_axis(self) -> str:
        return f"{self.site}.rank"


@dataclass
class SwitchableResult:
    path: Path
    adapters: list[Path]
    sites: int
    max_rel_diff: float
    checked: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        files = ", ".join(str(p) for p in self.adapters)
        return (f"wrote {files} for {self.path} ({self.sites} LoRA sites as graph inputs): with each adapter "
                f"active, and with none, ONNX Runtime's cached logits are within {self.max_rel_diff:.2g} of the "
                f"largest logit of the merged model's; {'; '.join(self.checked)}")


def site_name(record) -> str:
    """The record's key, readable as an ONNX name: ``c_attn[q,v]`` becomes ``c_attn.q_v``."""
    return record.key.replace("[", ".").replace("]", "").replace(",", "_")


def lora_records(model, where: str) -> list:
    """The model's LoRA records, refusing what cannot become adapter inputs (``where`` names the run)."""
    others = sorted({r.method for r in model.records if r.method != "lora"})
    if others:
        raise ExportError(f"{where}: only LoRA becomes switchable adapter inputs, and this run also has "
                          f"{', '.join(others)}: export it merged with --genai alone")
    records = list(model.records)
    if not records:
        raise ExportError(f"{where}: the run has no LoRA to switch")
    experts = [r.key for r in records if r.site.kind == "experts"]
    if experts:
        raise ExportError(f"{where}: the LoRA on the stacked expert weights {experts[0]} is added to the weight, "
                          "not to a linear's output, and cannot be an adapter input")
    if model.base_dtype != torch.float32:
        raise ExportError(f"{where}: switchable adapters are exported on a float32 base; this run's base is "
                          f"{model.base_dtype}")
    return records


def adapter_inputs(model, where: str) -> list[AdapterInput]:
    return [AdapterInput(site_name(r), r.site.in_features, r.site.out_features) for r in lora_records(model, where)]


def adapter_tensors(model, where: str) -> dict[str, np.ndarray]:
    """{input name: float32 array} of the model's LoRA: A transposed, and scale · B_full transposed."""
    out = {}
    for record in lora_records(model, where):
        a, b = record.factors(model.graph_module)
        names = AdapterInput(site_name(record), 0, 0).names
        out[names[0]] = np.ascontiguousarray(a.float().T.numpy())
        out[names[1]] = np.ascontiguousarray((record.scale * b.float()).T.numpy())
    return out


def _unfused(model) -> GraphModule:
    """A copy of the model's graph where each LoRA site computes its own A projection."""
    gm = copy_graph_module(model.graph_module)
    nodes = {n.name: n for n in gm.graph.nodes}
    for record in model.records:
        down = nodes[record.down]
        if down.target is aten.slice.Tensor:
            unfuse(gm, down)
    return gm


def _copy(model, gm: GraphModule) -> CompiledModel:
    gm.graph.lint()
    gm.recompile()
    return CompiledModel(gm, spec=model.spec, sites=model.sites, records=[], kind=model.kind, config=model.config,
                         model_ref=model.model_ref)


def base_of(model) -> CompiledModel:
    """The model without its LoRA branches: what the decoder computes with no adapter active."""
    gm = _unfused(model)
    for record in model.records:
        remove_branch(gm, record)
    return _copy(model, gm)


def with_inputs(model) -> CompiledModel:
    """The model's graph with each LoRA branch replaced by ``x @ lora_A @ lora_B`` on placeholders that follow
    ``attention_mask`` (the KV-cache rewrite puts the past keys and values before them)."""
    gm = _unfused(model)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    last = [n for n in graph.nodes if n.op == "placeholder"][1]
    for record in model.records:
        placeholders = []
        for name in AdapterInput(site_name(record), 0, 0).names:
            with graph.inserting_after(last):
                last = graph.placeholder(name.replace(".", "_"))
            placeholders.append(last)
        down, total = nodes[record.down], nodes[record.nodes[-1]]
        tip = total.args[0]            # the sum's first term: the linear's output (or the previous LoRA's sum)
        with graph.inserting_before(total):
            h = graph.call_function(aten.matmul.default, (down.args[0], placeholders[0]))
            up = graph.call_function(aten.matmul.default, (h, placeholders[1]))
            new_total = graph.call_function(aten.add.Tensor, (tip, up))
        total.replace_all_uses_with(new_total)
        graph.eliminate_dead_code()
        gm.delete_submodule(record.module)
    return _copy(model, gm)


def extras_of(inputs: list[AdapterInput]) -> list[ExtraInput]:
    """The factor inputs as the KV-cache decoder's extra inputs (after the cache), each rank its own axis."""
    return [ExtraInput(name, torch.float32, axes) for site in inputs
            for name, axes in zip(site.names, ((site.in_features, site.rank_axis),
                                                (site.rank_axis, site.out_features)))]


def _defaults(model, inputs: list[AdapterInput]) -> None:
    """Name the rank axes and give every factor input a rank-0 initializer of its name: the default ONNX
    Runtime reads when no adapter feeds it, which adds nothing to the linear's output."""
    import onnx_ir as ir
    graph = model.graph
    values = {v.name: v for v in graph.inputs}
    for site in inputs:
        rank = ir.SymbolicDim(site.rank_axis)
        for name, shape, empty in ((site.names[0], [site.in_features, rank], (site.in_features, 0)),
                                   (site.names[1], [rank, site.out_features], (0, site.out_features))):
            value = values[name]
            value.shape = ir.Shape(shape)
            value.const_value = ir.tensor(np.zeros(empty, np.float32), name=name)
            graph.register_initializer(value)


def write_adapter(tensors: dict[str, np.ndarray], path: str | Path) -> None:
    """ONNX Runtime's adapter file (``onnxruntime.AdapterFormat``) holding ``tensors`` by input name."""
    import onnxruntime as ort
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    adapter.export_adapter(str(path))


class AdapterStep(OnnxStep):
    """:class:`peftc.export.genai.OnnxStep` with an adapter file active on every run (none: the base model)."""

    def __init__(self, path: str | Path, adapter: str | Path | None = None):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3     # not the warning that the factor inputs have initializers
        self._bind(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
        self.run_options = ort.RunOptions()
        if adapter is not None:
            self.lora = ort.LoraAdapter()
            self.lora.Load(str(adapter))
            self.run_options.add_active_adapter(self.lora)

    def __call__(self, ids, mask, past, extras=()):
        out = self.session.run(None, dict(zip(self.inputs, [ids, mask, *past])), self.run_options)
        return out[0], out[1:]


def verify_switching(model_file: Path, runs: list[tuple[str, object, Path]], base=None,
                     where: str = "") -> tuple[float, list[str]]:
    """With each ``(name, compiled model, adapter file)`` of ``runs`` active, ONNX Runtime decodes as the
    model's merge does (:func:`peftc.export.genai.verify_decoder`); with none active, as ``base`` does (when
    given). Returns the worst difference over all of them (/ the largest logit) and what was checked."""
    cases = [(f"adapter '{name}'", model.merge(), file) for name, model, file in runs]
    if base is not None:
        cases.append(("no adapter", base, None))
    worst, checked = 0.0, []
    for label, reference, file in cases:
        try:
            diff, what = verify_decoder(AdapterStep(model_file, file), reference, cache_decoder(reference),
                                        hf_model=_oracle(reference, "fp32"))
        except ExportError as exc:
            raise ExportError(f"{where}: with {label} active, {exc}; nothing was written") from exc
        worst = max(worst, diff)
        checked.append(f"{label}: {what[-1]}" if len(what) > 2 else f"{label}: {', '.join(what)}")
    return worst, checked


def _convert_switchable(model, where: str):
    """(the ONNX program of the model's switchable decoder, its torch decoder, the sites)."""
    inputs = adapter_inputs(model, where)
    decoder = cache_decoder(with_inputs(model), extras_of(inputs))
    try:
        ep = capture_decoder(decoder)
        with quiet():
            program, _route = _convert(ep, ep.example_inputs[0], decoder.layout.input_names(),
                                       decoder.layout.output_names())
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{where}: the decoder with adapter inputs did not convert to ONNX: {exc}") from exc
    _name_axes(program.model, ep, decoder.layout)
    _defaults(program.model, inputs)
    vocab = int(ep.graph_module.graph.find_nodes(op="output")[0].args[0][0].meta["val"].shape[-1])
    return program, decoder, inputs, vocab


def export_switchable(model, path: str | Path, name: str) -> SwitchableResult:
    """Write the ``--genai`` directory ``path`` of the unmerged LoRA ``model`` with its factors as graph inputs,
    and its adapter as ``path/adapters/<name>.onnx_adapter`` (see the module doc); ``path`` is replaced only
    by a directory that passed :func:`verify_switching` for the adapter and for the base."""
    import onnx
    path = Path(path)
    start = time.perf_counter()
    program, decoder, inputs, vocab = _convert_switchable(model, str(path))
    seconds = {"convert": time.perf_counter() - start}
    tokenizer = _tokenizer_files(model.model_ref)
    with atomic_dir(path) as tmp:
        size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                   if v.const_value is not None)
        program.save(str(tmp / MODEL_FILE), external_data=size > 1 << 30)
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        file = tmp / ADAPTERS_DIR / f"{name}{SUFFIX}"
        file.parent.mkdir()
        write_adapter(adapter_tensors(model, str(path)), file)
        start = time.perf_counter()
        worst, checked = verify_switching(tmp / MODEL_FILE, [(name, model, file)], base_of(model), str(path))
        seconds["verify"] = time.perf_counter() - start
        write_json(tmp / "genai_config.json", genai_config(model.config, decoder.layout, vocab))
        write_json(tmp / ORIGIN_FILE, {"model": model.model_ref, "target": "fp32", "max_rel_diff": worst,
                                       "checked": checked, "adapter_inputs": len(inputs)})
        for source in tokenizer:
            shutil.copyfile(source, tmp / source.name)
    return SwitchableResult(path, [path / ADAPTERS_DIR / file.name], len(inputs), worst, checked, seconds)


@dataclass
class AdapterFileResult:
    path: Path
    directory: Path
    sites: int
    max_rel_diff: float
    checked: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"wrote {self.path} ({self.sites} LoRA sites) for {self.directory}: with it active, ONNX Runtime's "
                f"cached logits are within {self.max_rel_diff:.2g} of the largest logit of the merged model's; "
                f"{'; '.join(self.checked)}")


def model_inputs(model_file: Path) -> dict[str, tuple[int | None, int | None]]:
    """{factor input: (rows, columns)} of a switchable decoder, a named (rank) axis as None."""
    import onnx
    graph = onnx.load(str(model_file), load_external_data=False).graph
    return {v.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
            for v in graph.input if v.name.endswith((".lora_A", ".lora_B"))}


def check_matches(expected: dict, inputs: list[AdapterInput], where: str, model_file: Path) -> None:
    """Refuse a run whose LoRA sites are not inputs of the model, or have other shapes (the ranks may differ:
    each is a named axis). A run may adapt fewer sites: the others keep their rank-0 default."""
    if not expected:
        raise ExportError(f"{model_file} takes no adapter inputs: write it with 'peftc export RUN --genai "
                          f"{model_file.parent} --adapter-inputs'")
    sites = sorted({name.rpartition(".")[0] for name in expected})
    for site in inputs:
        a, b = site.names
        if a not in expected or b not in expected:
            raise ExportError(f"{where}: its LoRA on {site.site} is not an input of {model_file}, whose adapter "
                              f"sites are {', '.join(sites[:3])}{', ...' if len(sites) > 3 else ''} "
                              f"({len(sites)}): compile this run with the spec of the exported one")
        ours = {a: (site.in_features, None), b: (None, site.out_features)}
        for name, shape in ours.items():
            if expected[name] != shape:
                raise ExportError(f"{where}: the input {name} is {_shape(shape)} for this run and "
                                  f"{_shape(expected[name])} in {model_file}")


def _shape(shape) -> str:
    return " x ".join("rank" if d is None else str(d) for d in shape)


def export_onnx_adapter(model, path: str | Path, directory: str | Path, *, where: str = "") -> AdapterFileResult:
    """Write the LoRA of ``model`` (another run on the same base) as the ``.onnx_adapter`` file ``path`` for
    the switchable decoder in ``directory``, once its sites match the model's inputs
    (:func:`check_matches`) and ONNX Runtime with it active decodes as its merge does."""
    path, directory = Path(path), Path(directory)
    model_file = directory / MODEL_FILE
    where = where or str(path)
    if not model_file.is_file():
        raise ExportError(f"{directory} has no {MODEL_FILE}: write it with 'peftc export RUN --genai {directory} "
                          "--adapter-inputs'")
    inputs = adapter_inputs(model, where)
    check_matches(model_inputs(model_file), inputs, where, model_file)
    tensors = adapter_tensors(model, where)
    with atomic_path(path) as tmp:
        write_adapter(tensors, tmp)
        worst, checked = verify_switching(model_file, [(path.stem, model, tmp)], where=where)
    return AdapterFileResult(path, directory, len(inputs), worst, checked)
