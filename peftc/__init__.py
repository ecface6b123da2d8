"""peftc: a declarative graph-rewriting compiler for parameter-efficient fine-tuning."""
from .compiled import CompiledModel, compile
from .diagnostics import SpecError
from .errors import AdapterError, ExportError, ModelError, PassError, PeftcError
from .hf_peft import load_hf_peft
from .models import DEFAULT_MODEL, load_model, load_tokenizer
from .onnx_export import export_onnx
from .spec import parse, parse_file

__all__ = ["AdapterError", "CompiledModel", "DEFAULT_MODEL", "ExportError", "ModelError", "PassError",
           "PeftcError", "SpecError", "compile", "export_onnx", "load_hf_peft", "load_model",
           "load_tokenizer", "parse", "parse_file"]
__version__ = "0.1.0"
