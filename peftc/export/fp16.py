"""fp16 weights in an ONNX file: each large float32 initializer is stored as float16 and cast back to
float32 where it is read. The file is about half the size; ONNX Runtime folds the casts when it loads the
model and computes in float32, so the CPU provider needs no float16 kernels."""
from __future__ import annotations

from pathlib import Path

import numpy as np

#: initializers with fewer elements (shapes, small constants) stay float32
MIN_ELEMENTS = 1024


def weights_to_fp16(path: str | Path) -> int:
    """Rewrite ``path`` in place; returns how many initializers were converted."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    model = onnx.load(str(path))
    graph = model.graph
    casts, kept, converted = [], [], 0
    for init in graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        if init.data_type != TensorProto.FLOAT or size < MIN_ELEMENTS:
            kept.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + ".fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=f"cast_{init.name}_to_fp32"))
        converted += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.save(model, str(path))
    return converted
