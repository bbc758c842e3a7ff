"""The ONNX Runtime-specific rewrite (bench/inference.py's "ORT fused"): one com.microsoft.Attention per block,
the same logits as the exported file and as PyTorch, on real test images."""

import numpy as np
import onnx
import pytest
import torch

from pipeline.export import export_onnx
from pipeline.inference import OnnxClassifier
from pipeline.model import build_model
from pipeline.ort_optimize import FusionError, fuse_attention, optimize_for_onnxruntime
from pipeline.train import to_pixels

from ._consume import seed_model_config


def test_fused_attention_matches_export_and_pytorch(mnist, tmp_path):
    cfg = seed_model_config()
    model = build_model(cfg, seed=0).eval()
    exported = tmp_path / "vit.onnx"
    export_onnx(model, exported, to_pixels(mnist.test_images[:64]))
    fused = optimize_for_onnxruntime(exported, tmp_path / "vit.ort.onnx", cfg.heads, cfg.dim)
    ops = [n.op_type for n in onnx.load(str(fused)).graph.node]
    assert ops.count("Attention") == cfg.depth and "Softmax" not in ops and "SkipLayerNormalization" in ops
    pixels = to_pixels(mnist.test_images[:300]).numpy()
    with torch.inference_mode():
        expected = model(torch.from_numpy(pixels)).numpy()
    got = OnnxClassifier(fused, device="cpu").logits(pixels)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(got, OnnxClassifier(exported, device="cpu").logits(pixels), atol=1e-5)
    assert OnnxClassifier(fused).logits(pixels[:1]).shape == (1, 10)  # dynamic batch kept


def test_graph_without_attention_metadata_is_refused():
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    with pytest.raises(FusionError, match="no attention subgraphs"):
        fuse_attention(onnx.helper.make_model(graph), heads=2)


@pytest.mark.parametrize("threads,chunk", [(1, 64), (2, 64), (3, 7)])
def test_chunked_cpu_classifier_gives_the_one_call_logits(mnist, tmp_path, threads, chunk):
    """OnnxClassifier on CPU runs big batches as cache-sized chunks on several one-thread calls: same logits, same
    order, for batch sizes around the chunk boundaries."""
    model = build_model(seed_model_config(), seed=0).eval()
    exported = tmp_path / "vit.onnx"
    export_onnx(model, exported, to_pixels(mnist.test_images[:64]))
    pixels = to_pixels(mnist.test_images[:301]).numpy()
    one_call = OnnxClassifier(exported, device="cpu", cpu_chunk=10_000).logits(pixels)
    clf = OnnxClassifier(exported, device="cpu", threads=threads, cpu_chunk=chunk)
    assert clf.workers == threads and clf.provider == "CPUExecutionProvider"
    for n in (0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk * threads + 3, 301):
        got = clf.logits(pixels[:n], batch_size=256)
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, one_call[:n], atol=1e-5)
    clf.close()


def test_dynamically_quantized_models_run_whole_batches(mnist, tmp_path):
    """int8 dynamic quantization scales activations per call: chunking would change the logits, so it is off."""
    from pipeline.quantize import quantize_int8

    model = build_model(seed_model_config(), seed=0).eval()
    exported = tmp_path / "vit.onnx"
    export_onnx(model, exported, to_pixels(mnist.test_images[:64]))
    int8 = quantize_int8(exported)
    assert OnnxClassifier(exported, device="cpu").chunked and not OnnxClassifier(int8, device="cpu").chunked
    pixels = to_pixels(mnist.test_images[:200]).numpy()
    whole = OnnxClassifier(int8, device="cpu", cpu_chunk=10_000, threads=1).logits(pixels)
    np.testing.assert_array_equal(OnnxClassifier(int8, device="cpu", threads=2, cpu_chunk=16).logits(pixels), whole)
