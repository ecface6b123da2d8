"""The ``adapter`` statement's syntax: its targets and options, with their help text."""
from peftc.lang.options import LAYERS, MethodSpec, OptionSpec

METHOD = MethodSpec("adapter", "bottleneck adapters: after=attn,ffn is Houlsby, after=ffn alone Pfeiffer", (
    OptionSpec("after", "names", ("attn", "ffn"), "sublayers whose output gets an adapter",
               choices=("attn", "ffn")),
    OptionSpec("bottleneck", "int", 64, "hidden size of the adapter", min=1),
    OptionSpec("act", "name", "relu", "activation between the down and up projections",
               choices=("relu", "gelu", "silu", "tanh")),
    OptionSpec("parallel", "bool", False, "add the adapter beside the sublayer instead of after it"),
    OptionSpec("scale", "float", 1.0, "factor on the adapter's output"),
    LAYERS), targets="none")
