"""Export to ONNX with dynamic batch and sequence axes, check it, run it in ONNX Runtime, compare."""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import operator
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from peftc.compiler.compiled import CompiledModel
from peftc.graph.capture import deepcopy_quietly, example_inputs, max_positions
from peftc.graph.signature import TEXT, Signature, signature_of
from peftc.errors import ExportError
from peftc.fsutil import atomic_path
from peftc.heap import LOAD_MMAP_THRESHOLD, M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD, glibc
from peftc.export.aten_ops import lower, uncovered
from peftc.export.fusions import fuse
from peftc.export.lowerings import onnx_blockers, translation_table
from peftc.export.precision import STORED, float32_compute, fold_weight_casts, keeps_weight_casts


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float | None
    op_counts: Counter
    provider: str | None
    seconds: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0
    #: the largest |output| torch gave on the verification inputs, to read the difference against
    reference_absmax: float | None = None
    #: "direct" (the captured graph translated node by node) or "decomposed" (torch.onnx's full route)
    route: str = ""

    def __str__(self) -> str:
        diff = "not verified" if self.max_abs_diff is None else f"{self.max_abs_diff:.3g}"
        if self.max_abs_diff is not None and self.reference_absmax:
            diff += f" (outputs up to {self.reference_absmax:.3g} in magnitude)"
        return (f"wrote {self.path} ({self.size_bytes / 2**20:.1f} MiB, {sum(self.op_counts.values())} nodes); "
                f"ONNX Runtime ({self.provider}) vs torch max abs diff: {diff}")


def providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def load_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime session of a decoder held in memory, on :func:`providers`.

    It runs without ONNX Runtime's CPU memory arena: with it, loading SmolLM2-135M's decoder took 220 to
    300 MiB more resident memory, depending on the run, and decoding was no faster. Under glibc the mmap
    threshold is fixed while it loads: glibc raises the threshold when a large block is freed (ONNX Runtime
    frees its parsed copy of the file), so the weights that followed came from the heap, which keeps what it
    frees; SmolLM2's 8-adapter bank peaked at 1378 MiB in one process of four and at 1076 MiB in the others,
    and at 1036 MiB in four of four with the threshold fixed (``bench/serve.py``'s memory processes). After
    loading, a 32 MiB threshold keeps a step's buffers on the heap, reused: at glibc's 128 KiB each step
    mapped them anew, and a batch-8 int4 step took 65 ms instead of 45."""
    import onnxruntime as ort
    libc = glibc()
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=providers())
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)
    return session


def onnx_op_counts(path: str | Path) -> Counter:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


def signature(module) -> Signature:
    """The inputs ``module`` takes: a CompiledModel's or a wrapped transformers model's signature, else text."""
    return getattr(module, "signature", None) or Signature(TEXT, "causal-lm", "logits")


def _verify_inputs(module) -> tuple[torch.Tensor, ...]:
    """Inputs of a shape the capture did not use, in the module's signature order: text is 3 rows of 11
    tokens below the vocabulary (at most 1000), the first row padded on the left by 3."""
    config = getattr(module, "config", None)
    vocab = getattr(config, "vocab_size", 32) or 32
    sig = signature(module)
    if sig.names == TEXT:
        ids, mask = example_inputs(batch=3, seq=11, vocab=min(vocab, 1000), seed=1)
        inputs = (ids, mask)
    else:
        inputs = sig.examples(config, batch=3, seq=11, seed=1)
    mask = _mask_of(sig, inputs)
    if mask is not None:
        mask[0, :3] = 0          # a padded row, so the mask path is exercised too
    return inputs


def _mask_of(sig: Signature, inputs: tuple) -> torch.Tensor | None:
    return inputs[sig.names.index("attention_mask")] if "attention_mask" in sig.names else None


def export_onnx(module: torch.nn.Module, path: str | Path, *, verify: bool = True,
                external_data: bool | None = None, weights: str = "fp32",
                check: Callable[[ExportResult], str | None] | None = None) -> ExportResult:
    """Export ``module`` (a CompiledModel, merged or not, or any module taking input_ids and
    attention_mask) to ``path``. Runs onnx.checker and, with ``verify``, ONNX Runtime against torch.
    The file computes in float32 and stores its weights as ``weights`` ("fp32" or "fp16"), whatever dtype
    ``module`` holds them in (see :mod:`peftc.export.precision`); it is verified against ``module`` computing
    the same way. ``check(result)`` may refuse a verified result by returning the reason (a tolerance, say).

    The file is written, checked and verified under a temporary name beside ``path`` (its external data,
    if any, under a temporary name too, which the temporary model names) and only a file that passed is
    renamed to ``path``; a failure leaves whatever was at ``path`` (and ``path.data``) as it was, and the
    :class:`ExportError` says so. With external data, the verified data file is renamed to ``NAME.data``
    just before the model to ``NAME``, so between those two renames the pair is briefly mismatched."""
    import onnx
    path = Path(path)
    if weights not in STORED:
        raise ExportError(f"{path}: weights are stored as {' or '.join(STORED)}, not '{weights}'")
    module = float32_compute(tensor_output(module), STORED[weights])
    seconds: dict[str, float] = {}
    program, route = _to_onnx(module, path, seconds)
    start = time.perf_counter()
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    use_external = size > 1 << 30 if external_data is None else external_data
    data_name = path.name + ".data"
    existed = path.exists()

    def refused(reason: str) -> ExportError:
        kept = f"the previous {path} was left as it was" if existed else f"nothing was written to {path}"
        return ExportError(f"{path}: {reason}; {kept}")
    with atomic_path(path) as tmp:
        tmp_data = tmp.with_name(tmp.name + ".data")      # where the exporter puts tmp's external data
        try:
            program.save(str(tmp), external_data=use_external)
            onnx.checker.check_model(str(tmp))
            seconds["save"] = time.perf_counter() - start
            total = tmp.stat().st_size + (tmp_data.stat().st_size if use_external else 0)
            result = ExportResult(path=path, max_abs_diff=None, op_counts=onnx_op_counts(tmp), provider=None,
                                  seconds=seconds, size_bytes=total, route=route)
            if verify:
                start = time.perf_counter()
                try:
                    result.max_abs_diff, result.provider, result.reference_absmax = verify_onnx(module, tmp)
                except Exception as exc:
                    message = str(exc).replace(str(tmp), str(path))
                    raise refused(f"the ONNX Runtime check failed ({message})") from exc
                seconds["verify"] = time.perf_counter() - start
                reason = check(result) if check is not None else None
                if reason:
                    raise refused(f"the ONNX Runtime check failed: {reason}")
            if use_external:
                _rename_external(tmp, tmp_data, path.parent / data_name, data_name)
        finally:
            tmp_data.unlink(missing_ok=True)
    return result


def _to_onnx(module: torch.nn.Module, path: Path, seconds: dict[str, float]):
    """(the ONNX program, the route taken) for ``module`` in eval mode (its mode restored after): its
    capture reused or made with dynamic batch and sequence axes, then converted. The times go in
    ``seconds``; a graph ONNX cannot hold, or any failure, is an ExportError."""
    config = getattr(module, "config", None)
    sig = signature(module)
    inputs = sig.examples(config)
    graph_module = getattr(module, "graph_module", None)
    blockers = onnx_blockers(graph_module) if graph_module is not None else []
    if blockers:
        raise ExportError(f"cannot export {path}: {blockers[0]}" + (f" (and {len(blockers) - 1} more)"
                                                                     if len(blockers) > 1 else ""))
    was_training = module.training
    module.eval()
    try:
        start = time.perf_counter()
        ep = _reuse_capture(module)
        if ep is None:
            with torch.no_grad():
                ep = _capture(module, inputs, sig.dynamic(_max_sequence(module, config)))
            seconds["capture"] = time.perf_counter() - start
        else:
            seconds["reuse_capture"] = time.perf_counter() - start
        start = time.perf_counter()
        with quiet():
            program, route = _convert(ep, inputs, list(sig.names))
        seconds["convert"] = time.perf_counter() - start
    except Exception as exc:
        raise ExportError(f"ONNX export of {type(module).__name__} failed: {exc}") from exc
    finally:
        module.train(was_training)
    return program, route


class TensorOutput(torch.nn.Module):
    """A transformers model as the export and its verification call it: ``(input_ids, attention_mask) ->``
    logits (or an encoder's last hidden state), with the KV cache off: a ``DynamicCache`` in the output is
    not something torch.export or ONNX can return."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.training = model.training
        self.signature = signature_of(model)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.signature.call(self.model, inputs)


def tensor_output(module: torch.nn.Module) -> torch.nn.Module:
    """``module``, or a transformers model wrapped in :class:`TensorOutput`."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return module
    return TensorOutput(module) if isinstance(module, PreTrainedModel) else module


def _max_sequence(module, config) -> int:
    """The longest input: the model's positions, less those a soft prompt takes (a record's ``positions``)."""
    limit = max_positions(config) if config else 8192
    return limit - sum(r.positions for r in getattr(module, "records", ()))


def _reuse_capture(module) -> torch.export.ExportedProgram | None:
    """The program torch.export gave when ``module`` was compiled, with ``module``'s weights, when its graph
    is still exactly the captured one (every adapter folded by merge); else None."""
    base = getattr(module, "base_program", None)
    gm = getattr(module, "graph_module", None)
    if base is None or gm is None or gm.code != base.code:
        return None
    program = base.program

    def current(tables: dict) -> dict | None:
        out = {}
        for name, old in tables.items():
            if not isinstance(old, torch.Tensor):
                out[name] = old
                continue
            try:
                new = operator.attrgetter(name)(gm)
            except AttributeError:
                return None
            if not isinstance(new, torch.Tensor) or new.shape != old.shape or new.dtype != old.dtype:
                return None
            out[name] = new
        return out
    state, constants = current(program.state_dict), current(program.constants)
    if state is None or constants is None:
        return None
    # the conversion rewrites the graph in place: the program keeps its own
    root, signature, calls = deepcopy_quietly((program.graph_module, program.graph_signature,
                                               program.module_call_graph))
    return torch.export.ExportedProgram(
        root=root, graph=root.graph, graph_signature=signature, state_dict=state,
        range_constraints=program.range_constraints, module_call_graph=calls, constants=constants,
        verifiers=program.verifiers)


def _capture(module, inputs: tuple, shapes: tuple):
    """torch.export with dynamic batch and sequence (``shapes``: one dict per positional input). A soft prompt
    makes the inner length ``sequence + P``, on which torch's symbolic shapes cannot prove some stride guards
    (min(16·(s+3), 32·(s+3)) = 16·(s+3), from a grouped-query ``repeat_kv``); such a capture is retried with
    those guards as runtime asserts."""
    if isinstance(module, CompiledModel):                   # forward(*args, **kwargs)
        shapes = {"args": shapes}
    elif isinstance(module, TensorOutput):                  # forward(*inputs)
        shapes = (shapes,)
    try:
        return torch.export.export(module, inputs, strict=False, dynamic_shapes=shapes)
    except torch._dynamo.exc.UserError as exc:
        if "Constraints violated" not in str(exc):
            raise
        return torch.export.export(module, inputs, strict=False, dynamic_shapes=shapes,
                                   prefer_deferred_runtime_asserts_over_guards=True)


INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAMES = ["output"]


@functools.lru_cache(maxsize=1)
def _registry():
    """torch.onnx's aten → ONNX function registry with peftc's quantized ops, and the ops it implements."""
    from torch.onnx._internal.exporter import _decomp, _registration
    registry = _registration.ONNXRegistry.from_torchlib()
    for op, function in translation_table().items():
        registry.register_op(op, function, is_complex=False)
    return registry, frozenset(_decomp.get_onnx_implemented_overloads(registry))


def _convert(ep: torch.export.ExportedProgram, args: tuple, input_names: list[str] = INPUT_NAMES,
             output_names: list[str] = OUTPUT_NAMES) -> tuple[object, str]:
    """ONNX from a captured program. ``torch.onnx.export`` first re-traces the whole graph to decompose it
    (14 s of a 43 s export of SmolLM2) and then runs onnxscript's pattern rewriter (19 s), neither of which
    changes what ONNX Runtime runs: ORT folds and fuses the graph itself when it loads it. So the few
    captured ops torch's ONNX functions do not cover are lowered here by hand (:func:`peftc.export.aten_ops.lower`), the graph
    is translated node by node, and only constants are folded. A graph with any other uncovered op takes
    torch.onnx's full route."""
    import onnxscript.optimizer
    from torch.onnx._internal.exporter import _core, _fx_passes, _ir_passes
    registry, implemented = _registry()
    lower(ep.graph_module.graph)
    gm = ep._graph_module = _fx_passes.remove_assertion_nodes(ep.graph_module)
    route = "decomposed" if uncovered(gm, implemented) else "direct"
    if route == "decomposed":
        program = torch.onnx.export(ep, args, dynamo=True, optimize=False, input_names=input_names,
                                    output_names=output_names, custom_translation_table=translation_table())
    else:
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            _fx_passes.insert_type_promotion_nodes(gm)
        program = _core._exported_program_to_onnx_program(ep, registry=registry)
        _ir_passes.rename_inputs(program.model, input_names)
        _ir_passes.rename_outputs(program.model, output_names)
    onnxscript.optimizer.fold_constants(program.model, should_fold=keeps_weight_casts)
    fold_weight_casts(program.model)
    fuse(program.model)
    return program, route


def _rename_external(model_path: Path, produced: Path, final: Path, data_name: str) -> None:
    """Point the model's external-data entries at ``data_name`` and move the (verified) data file into
    place; the model file itself is renamed into place by the caller right after."""
    import onnx
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    onnx.save(model, str(model_path))
    produced.replace(final)


def verify_onnx(module: torch.nn.Module, path: str | Path) -> tuple[float, str, float]:
    """Max abs difference between ONNX Runtime and torch on inputs of a shape not used in capture,
    over the positions the attention mask keeps; the provider used; torch's largest |output| there."""
    import onnxruntime as ort
    inputs = _verify_inputs(module)
    sig = signature(module)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        expected = module(*inputs).float().numpy()
    module.train(was_training)
    chosen = providers()
    session = ort.InferenceSession(str(path), providers=chosen)
    got = session.run(None, {name: t.numpy() for name, t in zip(sig.names, inputs)})[0]
    if got.shape != expected.shape:
        raise ExportError(f"{path}: ONNX Runtime output shape {got.shape} != torch {expected.shape}")
    real = _kept(sig, inputs, expected)     # padded positions attend to nothing: their output is undefined
    return (float(np.abs(got - expected)[real].max()), session.get_providers()[0],
            float(np.abs(expected[real]).max()))


def _kept(sig: Signature, inputs: tuple, expected: np.ndarray) -> np.ndarray:
    """Where the output is defined: a text model's positions its attention mask keeps (an encoder-decoder's
    output is per decoder token, all kept), everywhere else."""
    mask = _mask_of(sig, inputs)
    if mask is None or sig.kind not in ("causal-lm", "encoder") or "decoder_input_ids" in sig.names:
        return np.ones(expected.shape[:-1], bool)
    return mask.numpy().astype(bool)


@contextlib.contextmanager
def quiet():
    """torch.onnx prints progress lines and registration warnings; keep the user's terminal for ours."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
