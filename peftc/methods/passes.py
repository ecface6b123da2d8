"""Every method's rewrite pass and HF PEFT file format, registered by importing this module (which
:mod:`peftc.compiler.compiled` does, and so ``import peftc``). :data:`PASSES` is the one list of the
passes: the pass manager orders them by their phase, never by a directory walk."""
from __future__ import annotations

from peftc.methods.adapter.rewrite import AdapterPass
from peftc.methods.bitfit.rewrite import BitfitPass
from peftc.methods.full.rewrite import FullPass
from peftc.methods.ia3 import hf as _ia3_format  # noqa: F401  (registers HF PEFT's IA3 format)
from peftc.methods.ia3.rewrite import Ia3Pass
from peftc.methods.lora import hf as _lora_format  # noqa: F401  (registers HF PEFT's LORA format)
from peftc.methods.lora.rewrite import LoraPass
from peftc.methods.prefix.rewrite import PrefixPass
from peftc.methods.prompt import hf as _prompt_formats  # noqa: F401  (PREFIX_TUNING and PROMPT_TUNING)
from peftc.methods.prompt.rewrite import PromptPass
from peftc.methods.quant.rewrite import QuantPass

PASSES = (QuantPass, LoraPass, Ia3Pass, BitfitPass, FullPass, AdapterPass, PrefixPass, PromptPass)
