"""``peftc.compile`` and :class:`CompiledModel`, the trainable rewritten model."""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.graph.analysis import ModelSites, analyze
from peftc.graph.capture import capture, copy_graph_module
from peftc.graph.signature import TEXT, Signature
from peftc.compiler.memory import WeightBytes
from peftc.models import build_model, checkpoint_dir, load_model
from peftc.weights import Checkpoint, materialize, meta_constants, meta_tensors, transient_buffers_unmapped
import peftc.methods.passes  # noqa: F401  (registers every method's pass and HF PEFT format)
from peftc.compiler.passmanager import META_KEY, CompileContext, PassManager
from peftc.errors import AdapterError, ModelError
from peftc.interop.adapter_file import FILE, load_adapter, save_adapter
from peftc.interop.hf_peft import CONFIG, WEIGHTS, format_for, load_adapter_weights, save_hf_peft
from peftc.lang.spec import Spec, parse, parse_file

aten = torch.ops.aten


def compile(model: nn.Module | str, spec: Spec | str | Path, *, filename: str | None = None,
            seed: int | None = None, dtype: str = "auto", autocast_adapter_dtype: bool = True) -> "CompiledModel":
    """Capture ``model`` (a transformers model, or a model reference loaded in ``dtype``) and rewrite it
    with ``spec`` (a parsed Spec, spec text, or a path to a spec file). With ``seed``, the inserted weights
    are initialised from that seed (torch's global generator is left as it was); without, from torch's
    global generator, as HF PEFT does. On a bfloat16/float16 model the inserted weights are float32 unless
    ``autocast_adapter_dtype`` is False (HF PEFT's argument of the same name and meaning)."""
    return compile_prepared(prepare(model, dtype), spec, filename=filename, seed=seed,
                            autocast_adapter_dtype=autocast_adapter_dtype)


@dataclass
class Prepared:
    """A captured and analysed model, ready for one compile."""
    captured: object
    sites: ModelSites
    ref: str
    timings: dict[str, float]
    dtype: torch.dtype              # of the model's floating-point weights
    #: a streamed model's checkpoint: the graph's base weights are on the meta device until the compile reads them
    checkpoint: Checkpoint | None = None


def prepare(model: nn.Module | str, dtype: str = "auto", *, weights: bool = True) -> Prepared:
    """Capture and analyse ``model``: a model, or a reference built from its config with its parameters on
    the meta device. A Hugging Face directory (and a GGUF file, converted to one) is then streamed: the
    compile reads each weight from its safetensors into its final form (:mod:`peftc.weights`); with
    ``weights=False`` nothing is read (a dry run). A built-in, or a checkpoint whose tensor names transformers
    converts while loading, is loaded whole in ``dtype`` instead. The timings name the capture ``capture``,
    or ``capture_cached`` when it was a copy of an earlier capture of the same model object."""
    ref = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or type(model).__name__
    timings: dict[str, float] = {}
    checkpoint, built = None, False
    if isinstance(model, str):
        start = time.perf_counter()
        directory = checkpoint_dir(ref) if weights else None
        built = bool(directory) or not weights
        model = build_model(ref, dtype) if built else load_model(ref, dtype)
        checkpoint = Checkpoint(directory) if directory else None
        timings["load"] = time.perf_counter() - start
    try:
        captured = capture(model)
    except ModelError:
        if not built:
            raise
        captured = None                # ViT's pixels meet its meta weights in a cat: capture it with values
    sites = _analyze_built(captured, model, checkpoint) if built and captured is not None else None
    if built and sites is None:        # the graph needs values the meta device has not: capture it with them
        model = load_model(ref, dtype) if weights else build_model(ref, dtype, meta=False)
        checkpoint, captured = None, capture(model)
    timings["capture_cached" if captured.cached else "capture"] = captured.seconds
    start = time.perf_counter()
    sites = sites or analyze(captured.gm)
    timings["analysis"] = time.perf_counter() - start
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return Prepared(captured, sites, ref, timings, dtype, checkpoint)


def _analyze_built(captured, model, checkpoint: Checkpoint | None) -> ModelSites | None:
    """The analysis of a model built with its parameters on the meta device, or None when that graph cannot
    stand for the model: constants it computed from a weight's device (no values on meta), checkpoint names
    the model does not use (transformers maps them while loading), or a slice probe that the random
    stand-ins for the weights cannot run (an op with no kernel for what the meta graph computes)."""
    if meta_constants(captured.gm, model):
        return None
    if checkpoint is not None and not all(checkpoint.has(name) for name, _ in meta_tensors(captured.gm)):
        return None
    try:
        return analyze(captured.gm)
    except (RuntimeError, NotImplementedError):
        return None


def compile_prepared(prepared: Prepared, spec: Spec | str | Path, *, filename: str | None = None,
                     seed: int | None = None, autocast_adapter_dtype: bool = True) -> "CompiledModel":
    if isinstance(spec, Path):
        spec = parse_file(spec)
    elif isinstance(spec, str):
        spec = parse(spec, filename)
    captured = prepared.captured
    ctx = CompileContext(gm=captured.gm, sites=prepared.sites, spec=spec, kind=captured.kind,
                         model_ref=prepared.ref, config=captured.config,
                         autocast_adapter_dtype=autocast_adapter_dtype, checkpoint=prepared.checkpoint)
    start = time.perf_counter()
    streamed = transient_buffers_unmapped() if prepared.checkpoint is not None else contextlib.nullcontext()
    with streamed:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            gm = PassManager(ctx).run()
        timings = dict(prepared.timings, passes=time.perf_counter() - start)
        if prepared.checkpoint is not None:
            start = time.perf_counter()
            materialize(gm, prepared.checkpoint)        # what the passes did not read (quantized weights are in)
            prepared.checkpoint.close()
            timings["weights"] = time.perf_counter() - start
    model = CompiledModel(gm, spec=spec, sites=prepared.sites, records=ctx.records, kind=captured.kind,
                          config=captured.config, model_ref=prepared.ref, timings=timings,
                          signature=captured.signature)
    model.base_program = captured.base
    model.base_dtype, model.autocast_adapter_dtype = prepared.dtype, autocast_adapter_dtype
    return model


def op_histogram(gm: GraphModule) -> Counter:
    """Counts of call_function targets, the measure "the merged graph equals the base graph" uses."""
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


class CompiledModel(nn.Module):
    """A rewritten model: call it with ``input_ids`` (and optionally ``attention_mask``) for logits, or
    for the last hidden state of an encoder. Only the inserted parameters require gradients."""

    def __init__(self, gm: GraphModule, *, spec: Spec, sites: ModelSites, records: list, kind: str,
                 config, model_ref: str, timings: dict[str, float] | None = None,
                 signature: Signature | None = None):
        super().__init__()
        self.graph_module = gm
        self.spec = spec
        self.sites = sites
        self.records = records
        self.kind = kind
        self.config = config
        self.model_ref = model_ref
        self.timings = dict(timings or {})
        #: what merge() folded into the weights (quantized bases come back as dequant(W))
        self.folded: list = []
        #: the capture's own program (peftc.graph.capture.BaseProgram), for an export without a second capture
        self.base_program = None
        #: the inputs it takes, in order, and what it returns (peftc.graph.signature)
        self.signature = signature or Signature(TEXT, kind, "logits" if kind != "encoder" else "last_hidden_state")
        #: the dtype the base model was loaded in, and whether inserted weights are float32 on a
        #: half-precision base (both recorded in a run directory, so it is rebuilt the same way)
        self.base_dtype = torch.float32
        self.autocast_adapter_dtype = True
        self.training = False
        self._set_dropout(False)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """``model(input_ids, attention_mask=None)`` for a text model; in general the inputs of
        :attr:`signature`, by position or by name (``pixel_values``, ``decoder_input_ids``...)."""
        return self.graph_module(*self.signature.bind(args, kwargs))

    def train(self, mode: bool = True) -> "CompiledModel":
        """Switch dropout (captured and inserted) between training and inference behaviour."""
        self.training = mode
        self._set_dropout(mode)
        return self

    def _set_dropout(self, mode: bool) -> None:
        changed = False
        for node in self.graph_module.graph.nodes:
            if node.op == "call_function" and node.target is aten.dropout.default and node.args[2] != mode:
                node.args = (node.args[0], node.args[1], mode)
                changed = True
        if changed:
            self.graph_module.recompile()

    # --- what was inserted -------------------------------------------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Inserted parameters by a stable name: ``<module path>.<name>``, with ``[roles]`` after the
        path for the slices of a fused projection (``transformer.h.0.attn.c_attn[q,v].lora_A``)."""
        out = {}
        for record in self.records:
            for name, param in record.parameters(self.graph_module).items():
                out[f"{record.key}.{name}"] = param
        return out

    def report(self) -> "Report":
        return Report.of(self)

    def dump_graph(self) -> str:
        """The rewritten graph, one node a line; inserted nodes are marked with their pass and span."""
        lines = []
        for node in self.graph_module.graph.nodes:
            tag = node.meta.get(META_KEY)
            mark = f"+ [{tag['pass']} @ {tag['span']}]" if tag else " "
            lines.append(f"{mark} {node.format_node()}")
        return "\n".join(lines) + "\n"

    # --- fold and interchange ----------------------------------------------------------------------
    def merge(self) -> "CompiledModel":
        """A copy with every foldable adapter folded into the base weights (checked for NaN/inf first). It
        shares every base weight no adapter changed with this model; a folded weight is a new tensor."""
        gm = copy_graph_module(self.graph_module)
        kept, folded = [], []
        # records fold in the order the passes ran: a quantized base (phase quantize) turns back into the
        # float linear dequant(W) before the LoRA on it (rank 60) is added to that weight
        for record in self.records:
            if not record.foldable:          # e.g. a prefix stays a graph op, an adapter a branch
                kept.append(record)
                continue
            record.fold(gm)
            folded.append(record)
        if self.base_dtype != torch.float32:     # dequant(W) (+ what folded onto it) was computed in float32
            for name in (n for record in folded for n in record.folded_weights()):
                owner, _, attr = name.rpartition(".")
                module = gm.get_submodule(owner)
                module.register_parameter(attr, nn.Parameter(getattr(module, attr).detach().to(self.base_dtype),
                                                             requires_grad=False))
        gm.graph.lint()
        gm.recompile()
        merged = CompiledModel(gm, spec=self.spec, sites=self.sites, records=kept, kind=self.kind,
                               config=self.config, model_ref=self.model_ref, signature=self.signature)
        merged.folded = folded
        merged.base_program = self.base_program
        merged.base_dtype, merged.autocast_adapter_dtype = self.base_dtype, self.autocast_adapter_dtype
        merged.train(self.training)
        return merged

    def save_hf_peft(self, directory: str | Path) -> Path:
        return save_hf_peft(self, directory)

    def save_adapter(self, directory: str | Path) -> list[str]:
        """Write peftc's adapter file (any methods) and, when one HF PEFT format holds every adapter,
        HF PEFT's files too. Returns the names of the files written."""
        save_adapter(self, directory)
        try:   # a format may refuse this model's adapters (a prefix on some layers only) before writing
            format_for(self)
            save_hf_peft(self, directory)
        except AdapterError:
            return [FILE]
        return [FILE, CONFIG, WEIGHTS]

    def load_adapter(self, directory: str | Path) -> "CompiledModel":
        """Load adapter weights written by ``save_adapter`` (peftc's file, or else HF PEFT's files)."""
        if (Path(directory) / FILE).is_file():
            load_adapter(self, directory)
        else:
            load_adapter_weights(self, directory)
        return self


@dataclass
class Report:
    statements: list[tuple[str, int, int]]              # (statement text, sites, trainable)
    layers: dict[str, list[int]]                         # layer label -> trainable per statement
    trainable: int
    total: int
    timings: dict[str, float] = field(default_factory=dict)
    #: bytes of the base weights by precision, and of the adapters
    memory: WeightBytes | None = None

    @classmethod
    def of(cls, model: CompiledModel) -> "Report":
        n = len(model.spec.statements)
        per_statement = [[0, 0] for _ in range(n)]
        layers: dict[str, list[int]] = {}
        for record in model.records:
            count = sum(p.numel() for p in record.parameters(model.graph_module).values())
            per_statement[record.statement][0] += 1
            per_statement[record.statement][1] += count
            label = "-" if record.layer is None else str(record.layer)
            layers.setdefault(label, [0] * n)[record.statement] += count
        params = list(model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        rows = [(str(s), sites, count) for s, (sites, count) in zip(model.spec.statements, per_statement)]
        ordered = dict(sorted(layers.items(), key=lambda kv: (kv[0] == "-", int(kv[0]) if kv[0] != "-" else 0)))
        memory = WeightBytes.of(model.graph_module)
        # quantized weights are buffers; "all params" counts them, as HF PEFT counts its 4-bit weights
        total = sum(p.numel() for p in params) + memory.quantized_weights
        return cls(rows, ordered, trainable, total, dict(model.timings), memory)

    def to_dict(self) -> dict:
        return {"statements": [{"statement": s, "sites": n, "trainable": c} for s, n, c in self.statements],
                "layers": self.layers, "trainable": self.trainable, "total": self.total,
                "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
                **({"memory": self.memory.to_dict()} if self.memory else {})}

    def __str__(self) -> str:
        width = max([len("statement")] + [len(s) for s, _, _ in self.statements])
        lines = [f"{'#':>2}  {'statement':<{width}}  {'sites':>5}  {'trainable':>11}"]
        for i, (text, sites, count) in enumerate(self.statements, 1):
            lines.append(f"{i:>2}  {text:<{width}}  {sites:>5}  {count:>11,}")
        if self.layers:
            heads = "".join(f"  {'#' + str(i):>9}" for i in range(1, len(self.statements) + 1))
            lines += ["", f"{'layer':>5}{heads}  {'total':>9}"]
            for label, counts in self.layers.items():
                cells = "".join(f"  {c:>9,}" for c in counts)
                lines.append(f"{label:>5}{cells}  {sum(counts):>9,}")
        if self.memory:
            lines += [""] + self.memory.lines()
        lines += ["", f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                      f"trainable%: {100 * self.trainable / max(self.total, 1):.4f}"]
        return "\n".join(lines)
