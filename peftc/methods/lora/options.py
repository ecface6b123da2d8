"""The ``lora`` statement's syntax: its targets and options, with their help text."""
from peftc.lang.options import ATTN, EXCLUDE, LAYERS, MethodSpec, OptionSpec

METHOD = MethodSpec("lora", "low-rank update y = W x + s·B(A(dropout(x))), s = alpha/r (HF PEFT LoraConfig)", (
    OptionSpec("r", "int", 8, "rank of the update", min=1),
    OptionSpec("alpha", "float", 8.0, "scale numerator: the update is scaled by alpha/r, or "
               "alpha/sqrt(r) with rslora; 8 like HF PEFT's lora_alpha, not tied to r", min=0, min_open=True),
    OptionSpec("dropout", "float", 0.0, "dropout probability on the adapter's input (lora_dropout)",
               min=0, max=1, max_open=True),
    OptionSpec("rslora", "bool", False, "rank-stabilised scale alpha/sqrt(r) (use_rslora)"),
    OptionSpec("init", "name", "zero", "zero: A Kaiming-uniform and B zero (init_lora_weights=True); "
               "gaussian: A normal(0, 1/r) and B zero (init_lora_weights=\"gaussian\"); random: A and B "
               "both Kaiming-uniform, so a fresh adapter already changes the model (init_lora_weights="
               "False, for checking merge and export before training)",
               choices=("zero", "gaussian", "random")),
    LAYERS, ATTN, EXCLUDE), targets="required")
