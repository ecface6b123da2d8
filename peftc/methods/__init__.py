"""One package per spec keyword: its syntax (``options.py``: targets, options and their help), its rewrite
pass with the record of what it inserted (``rewrite.py``) and, where HF PEFT has a file format for it,
that format (``hf.py``, on the shared machinery of :mod:`peftc.interop.hf_peft`).

:data:`METHODS` is the one list of the syntax declarations, which the parser, its messages and the
language reference read; it imports no pass, so the parser loads without the compiler.
:mod:`peftc.methods.passes` is the one list of the passes and formats."""
from __future__ import annotations

from peftc.lang.options import MethodSpec
from peftc.methods.adapter.options import METHOD as ADAPTER
from peftc.methods.bitfit.options import METHOD as BITFIT
from peftc.methods.full.options import METHOD as FULL
from peftc.methods.ia3.options import METHOD as IA3
from peftc.methods.lora.options import METHOD as LORA
from peftc.methods.prefix.options import METHOD as PREFIX
from peftc.methods.prompt.options import METHOD as PROMPT
from peftc.methods.quant.options import METHOD as QUANT

#: every method by keyword, in the order ``peftc methods`` and docs/language.md list them
METHODS: dict[str, MethodSpec] = {m.keyword: m for m in (LORA, QUANT, PREFIX, PROMPT, ADAPTER, IA3, BITFIT, FULL)}
