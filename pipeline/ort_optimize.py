"""An ONNX Runtime-specific rewrite of the exported ViT for faster CPU inference (optional; the registered model
stays the portable, standard-ONNX export).

The exporter decomposes each block's attention into ~27 standard ops: the fused qkv MatMul, a 5-D Transpose that
materialises Q, K and V head by head, Slice/Squeeze, scaled MatMul, Softmax, MatMul, and a Transpose back. PyTorch
runs the same code on strided views and one fused SDPA kernel; ONNX Runtime copies. Here each block's attention
subgraph (found by the exporter's per-node ``namespace`` metadata, ``.../blocks.<i>.attn: ...``) becomes one
``com.microsoft.Attention`` node (input, the qkv weight as the exporter already stored it, (D, 3D), and bias;
``num_heads``), which does the projection, all heads and the concatenation in one kernel; then ONNX Runtime's
transformer optimizer fuses residual Add + LayerNormalization into SkipLayerNormalization. Results agree with the
exported file to ~1e-6.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

import onnx
from onnx import helper

_BLOCK_ATTN = re.compile(r"/(blocks\.\d+)\.attn: ")


class FusionError(RuntimeError):
    """The graph does not have the structure the rewrite expects (another exporter or model)."""


def _namespace(node: onnx.NodeProto) -> str:
    return next((e.value for e in node.metadata_props if e.key == "namespace"), "")


def fuse_attention(proto: onnx.ModelProto, heads: int) -> onnx.ModelProto:
    """Replace each block's exported attention subgraph by one com.microsoft.Attention node (in place)."""
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    groups: OrderedDict[str, list[onnx.NodeProto]] = OrderedDict()
    for node in graph.node:
        if match := _BLOCK_ATTN.search(_namespace(node)):
            groups.setdefault(match.group(1), []).append(node)
    if not groups:
        raise FusionError("no attention subgraphs found (no 'blocks.<i>.attn' namespace metadata on the nodes)")
    replacement: dict[int, onnx.NodeProto] = {}
    removed: set[int] = set()
    for block, nodes in groups.items():
        members = {id(n) for n in nodes}
        produced = {o for n in nodes for o in n.output}
        try:
            matmul = next(n for n in nodes if n.op_type == "MatMul" and n.input[1] in initializers)
            add = next(n for n in nodes if n.op_type == "Add" and matmul.output[0] in n.input)
            bias = next(i for i in add.input if i in initializers)
        except StopIteration:
            raise FusionError(f"{block}: no qkv projection (MatMul by a weight, Add of a bias) found") from None
        outside = {i for n in graph.node if id(n) not in members for i in n.input if i in produced}
        outside |= {o.name for o in graph.output if o.name in produced}
        if len(outside) != 1:
            raise FusionError(f"{block}: attention subgraph has {len(outside)} outputs used outside, expected 1")
        fused = helper.make_node("Attention", [matmul.input[0], matmul.input[1], bias], [outside.pop()],
                                 domain="com.microsoft", num_heads=heads, name=f"{block}.attn.fused")
        replacement[id(nodes[0])] = fused
        removed |= members
    kept = [replacement.get(id(n), n) for n in graph.node if id(n) in replacement or id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.value_info[:]  # shapes of removed tensors; ONNX Runtime infers what it needs
    used = {i for n in graph.node for i in n.input}
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto


def optimize_for_onnxruntime(src: str | os.PathLike, dst: str | os.PathLike, heads: int, hidden: int) -> Path:
    """Write an ONNX Runtime-only variant of the exported model ``src`` to ``dst``: fused attention, then
    SkipLayerNormalization/BiasGelu fusions by onnxruntime.transformers.optimizer."""
    from onnxruntime.transformers.optimizer import optimize_model

    dst = Path(dst)
    proto = fuse_attention(onnx.load(str(src)), heads)
    with tempfile.TemporaryDirectory(prefix="vitflow-ortopt-") as tmp:
        fused = Path(tmp) / "fused.onnx"
        onnx.save(proto, str(fused))
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.ERROR))
        try:
            optimized = optimize_model(str(fused), model_type="bert", num_heads=heads, hidden_size=hidden,
                                       opt_level=0)
        finally:
            root.setLevel(level)
        optimized.save_model_to_file(str(dst))
    return dst
