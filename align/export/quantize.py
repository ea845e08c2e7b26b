"""int8 ONNX graphs (``align export --quantize int8``): each float32 ``<modality>.onnx`` gets a
twin ``<modality>.int8.onnx`` beside it, made by onnxruntime's dynamic quantisation, with the same
inputs, the same ``embedding`` output (float32 (B, D), unit rows) and the same preprocess.json.

What is quantised, and why (measured on the demo checkpoint, onnxruntime 1.32 on an AVX2 CPU):

- ``MatMul`` with a constant weight (every linear layer of the transformers: QKV, MLP, the
  projections that the exporter writes as MatMul) becomes ``DynamicQuantizeLinear`` +
  ``MatMulInteger``: the activation is quantised to uint8 per call over its own range, the weight
  to int8 per output channel. The attention products (Q K^T, softmax V) have no constant operand
  and stay float32; so do ``Gemm`` nodes (onnxruntime has no dynamic integer Gemm).
- ``Gather`` from a constant table (the text tower's token embedding, 49408 x width: 80% of the
  demo's text graph) is stored int8 per tensor. onnxruntime dequantises it once when the session
  is built, so this saves disk and download, not memory at run time.
- ``reduce_range``: weights use 7 bits. Without VNNI (AVX2), onnxruntime's uint8 x int8 kernel sums
  pairs of products into int16 and saturates; per-channel 8-bit weights lost accuracy that way
  (minimum cosine to float32 0.971 on demo images, 0.9993 with 7 bits).
- Left in float32: ``Conv`` (the image patch embedding: a few thousand weights, and the first layer,
  where error spreads everywhere), and every node upstream of a ``Log`` (the audio front end: the
  STFT convolution and the mel filter ``MatMul``). The power spectrum spans ~10 orders of magnitude,
  and a uint8 activation grid over that range rounds all but the loudest bins to 0, which the log
  turns into the floor: quantising the mel MatMul dropped audio cosines to 0.12.
- No ``quant_pre_process``: its symbolic shape inference fails on the ``Expand`` that
  ``torch.onnx.export(dynamo=True)`` writes, and with it skipped it changed no node (the exporter
  already folds constants) and no figure.

The check (``check_int8``): the int8 graph must run in onnxruntime at batch 1 and 5 in one session
and every row's cosine with our float32 embedding must reach ``min_cosine(n)`` for its n integer
matmuls (or ``--int8-min-cosine``). It catches a broken quantisation, not a small loss: retrieval
quality is measured by benchmarks/export_parity.py and benchmarks/compress_levers.py.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

from align.errors import RunError

INT8_SUFFIX = ".int8.onnx"
QUANTIZED_OPS = ("MatMul", "Gather")
KEEP_FLOAT_BEFORE = "Log"  # nodes upstream of this op stay float32 (module docstring)
# The cosine an int8 graph must keep with float32, from a noise model. A quantised product of
# n terms carries relative noise of about sqrt(((dx / x_rms)^2 + (dw / w_rms)^2) / 12): a uint8
# activation grid over a range ~10 x its rms (dx / x_rms ~ 0.04) and a 7-bit per-channel weight
# grid over ~3 x its rms (dw / w_rms ~ 0.05), so a variance of ~4e-4 a matmul. The graph's n integer
# matmuls add theirs in quadrature (LayerNorm keeps activations O(1)), so 1 - cosine ~ n * 2e-4 on
# average. Allowed: five times that, for the tail over few output coordinates (chi^2_D / D at its
# 0.999 quantile is ~3 for D = 8) and a spread of the per-layer noise. Measured: the demo's towers
# (9 to 17 integer matmuls, bounds 0.983 to 0.991) keep >= 0.9993 on demo items; the MiniLM text
# tower (38, bound 0.962) 0.99 at full width and 0.973 cut to 8 coordinates. A broken quantisation
# falls below: the audio front end quantised 0.12 (bound 0.991), per-tensor weights on the MiniLM
# 0.85 (0.962), 8-bit weights saturating on AVX2 0.971 on demo images (0.983).
ALLOWED_PER_MATMUL = 1e-3


def min_cosine(integer_matmuls: int) -> float:
    """The smallest cosine with float32 accepted from a graph with that many integer matmuls."""
    return max(0.0, 1.0 - ALLOWED_PER_MATMUL * integer_matmuls)


METHOD = {
    "tool": "onnxruntime.quantization.quantize_dynamic",
    "weights": "int8, per output channel for MatMul, per tensor for Gather tables, 7-bit range (reduce_range)",
    "activations": "uint8, per tensor, range computed per call (dynamic)",
    "ops": list(QUANTIZED_OPS),
    "kept_float32": "Conv, Gemm, the attention products, and every node upstream of a Log (the audio front end)",
}


def int8_name(float_file: str) -> str:
    """``text.onnx`` -> ``text.int8.onnx``."""
    stem = float_file[:-len(".onnx")] if float_file.endswith(".onnx") else float_file
    return stem + INT8_SUFFIX


def nodes_before(graph: Any, op_type: str) -> List[str]:
    """Names of the ``QUANTIZED_OPS`` nodes from which an ``op_type`` node can be reached."""
    producer = {output: node for node in graph.node for output in node.output}
    stack = [node for node in graph.node if node.op_type == op_type]
    seen, found = set(), []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in QUANTIZED_OPS:
            found.append(node.name)
        stack += [producer[name] for name in node.input if name in producer]
    return sorted(found)


def quantize_graph(source: str, target: str) -> Dict[str, Any]:
    """Write the int8 twin of the float32 graph ``source`` to ``target``; {"kept_float32": [node
    names left out on purpose], "integer_matmuls": n, "bytes": size}."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(source, load_external_data=False)
    unnamed = [n for n, node in enumerate(model.graph.node) if not node.name]
    if unnamed:  # exclusion is by name; the dynamo exporter names every node, this is a guard
        raise RunError(f"{source}: nodes {unnamed[:5]} have no name; cannot choose which to keep in float32")
    kept = nodes_before(model.graph, KEEP_FLOAT_BEFORE)
    external = os.path.isfile(source + ".data")
    try:
        quantize_dynamic(source, target, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                         reduce_range=True, weight_type=QuantType.QInt8, nodes_to_exclude=kept,
                         use_external_data_format=external)
    except Exception as error:  # onnxruntime.quantization raises plain exceptions of many types
        raise RunError(f"{source}: onnxruntime could not quantise it ({type(error).__name__}: "
                       f"{str(error)[:300]})") from None
    return {"kept_float32": kept, "integer_matmuls": integer_matmuls(target), "bytes": graph_bytes(target)}


def integer_matmuls(path: str) -> int:
    """How many integer matrix products the graph at ``path`` runs."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return sum(1 for node in graph.node if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))


def graph_bytes(path: str) -> int:
    """Bytes of an ONNX graph on disk, its external ``.data`` file included."""
    data = path + ".data"
    return os.path.getsize(path) + (os.path.getsize(data) if os.path.isfile(data) else 0)


def check_int8(path: str, outputs: Sequence[Any], expected: Sequence[Any]) -> float:
    """The smallest cosine between the int8 graph's rows (``outputs``: its embedding per probe
    batch, from ``align.export.onnx.run_batches`` in one session) and ``expected``'s (unit rows).
    Compare it with ``min_cosine(integer_matmuls(path))``."""
    import numpy as np

    worst = 1.0
    for output, reference in zip(outputs, expected):
        reference = np.asarray(reference, dtype=np.float64)
        if output.shape != reference.shape or output.dtype != np.float32:
            raise RunError(f"{path}: gave {output.dtype} {output.shape}, expected float32 {reference.shape}")
        norms = np.linalg.norm(output, axis=1) * np.linalg.norm(reference, axis=1)
        worst = min(worst, float(((output * reference).sum(1) / np.maximum(norms, 1e-12)).min()))
    return worst
