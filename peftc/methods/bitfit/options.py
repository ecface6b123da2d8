"""The ``bitfit`` statement's syntax: its targets and options, with their help text."""
from peftc.lang.options import EXCLUDE, LAYERS, MethodSpec

METHOD = MethodSpec("bitfit", "train the biases of the selected linears; no targets: every bias", (
    LAYERS, EXCLUDE), targets="optional")
