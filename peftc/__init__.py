"""peftc: a declarative graph-rewriting compiler for parameter-efficient fine-tuning.

The subpackages are the compiler's phases: ``lang`` (spec text to IR), ``graph`` (capture and analysis),
``compiler`` (passes, CompiledModel), ``methods`` (one package per spec keyword), ``quant``, ``interop``
(HF PEFT files), ``export`` (ONNX), ``training`` and ``cli``."""
import sys

from peftc.compiler.compiled import CompiledModel, compile
from peftc.errors import AdapterError, ExportError, ModelError, PassError, PeftcError
from peftc.export import targets as _targets
from peftc.export.genai import export_genai
from peftc.export.gguf import export_gguf
from peftc.export.hf import export_hf
from peftc.export.onnx import export_onnx
from peftc.graph import capture as _capture
from peftc.interop.hf_load import load_hf_peft
from peftc.lang.diagnostics import SpecError
from peftc.lang.spec import parse, parse_file
from peftc.models import DEFAULT_MODEL, load_model, load_tokenizer
from peftc.quant import nf4 as _nf4

#: module paths users import from an earlier layout: peftc.nf4.quantize, peftc.deploy.export_target,
#: peftc.capture.clear_cache keep working (as attributes and as ``import peftc.nf4``)
_MOVED = {"nf4": _nf4, "deploy": _targets, "capture": _capture}
for _name, _module in _MOVED.items():
    sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module

__all__ = ["AdapterError", "CompiledModel", "DEFAULT_MODEL", "ExportError", "ModelError", "PassError",
           "PeftcError", "SpecError", "compile", "export_genai", "export_gguf", "export_hf", "export_onnx", "load_hf_peft", "load_model",
           "load_tokenizer", "parse", "parse_file"]
__version__ = "0.1.0"
