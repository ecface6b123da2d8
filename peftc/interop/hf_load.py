"""``peftc.load_hf_peft``: a model compiled from an HF PEFT adapter directory. Above the compiler, which
:mod:`peftc.interop.hf_peft` (the file formats and reading and writing them) sits below."""
from __future__ import annotations

from pathlib import Path

from peftc.compiler.compiled import compile_prepared, prepare
from peftc.interop.hf_peft import CONFIG, load_adapter_weights, read_adapter


def load_hf_peft(model, directory: str | Path):
    """Compile ``model`` (a transformers model or a reference) with the adapter an HF PEFT directory
    describes, and load its weights. Returns a CompiledModel."""
    config, fmt = read_adapter(directory)
    prepared = prepare(model)
    text = fmt.spec_text(config, prepared.sites)
    compiled = compile_prepared(prepared, text, filename=f"<spec from {Path(directory) / CONFIG}>")
    load_adapter_weights(compiled, directory)
    return compiled
