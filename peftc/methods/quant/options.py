"""The ``quant`` statement's syntax: its targets and options, with their help text."""
from peftc.lang.options import EXCLUDE, LAYERS, MethodSpec, OptionSpec

METHOD = MethodSpec("quant", "quantize the frozen base linears: NF4 (QLoRA) or int8", (
    OptionSpec("block", "int", 64, "weights per absmax block (nf4): a power of two from 16 to 4096 "
               "(bitsandbytes takes 32..4096; ONNX Runtime's MatMulBnb4, which runs the nf4 export, "
               "16..256)",
               choices=tuple(2 ** e for e in range(4, 13))),
    OptionSpec("double_quant", "bool", True, "store the absmax constants in 8 bits per block of 256 (nf4)"),
    LAYERS, EXCLUDE), targets="optional", default_targets=("base",),
    leading=OptionSpec("scheme", "name", None, "nf4: 4-bit NormalFloat with per-block absmax; "
                       "int8: 8-bit with per-row absmax", choices=("nf4", "int8"), required=True),
    roles=("base",))
