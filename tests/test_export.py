import onnx
import pytest
import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.export import ExportError, export_onnx
from pipeline.inference import OnnxClassifier, evaluate_onnx
from pipeline.train import evaluate, fit, to_pixels


@pytest.fixture(scope="module")
def trained(mnist):
    return fit(ModelConfig(depth=2), TrainConfig(epochs=1, device="cpu"), mnist.train_images[:2000],
               mnist.train_labels[:2000], seed=0, progress=False).model


def test_export_parity_and_dynamic_batch(trained, mnist, tmp_path):
    path = tmp_path / "vit.onnx"
    figures = export_onnx(trained, path, to_pixels(mnist.test_images[:256]))
    assert figures["parity_max_abs_diff"] <= 1e-4
    onnx.checker.check_model(str(path))
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    clf = OnnxClassifier(path)
    assert clf.provider == "CPUExecutionProvider"
    for n in (1, 7, 300):
        assert clf.logits(to_pixels(mnist.test_images[:n]).numpy()).shape == (n, 10)


def test_onnx_accuracy_equals_pytorch(trained, mnist, tmp_path):
    path = tmp_path / "vit.onnx"
    export_onnx(trained, path, to_pixels(mnist.test_images[:64]))
    _, torch_error = evaluate(trained, mnist.test_images, mnist.test_labels)
    report = evaluate_onnx(path, mnist.test_images.numpy(), mnist.test_labels.numpy())
    assert report["test_accuracy"] == pytest.approx(1 - torch_error, abs=1e-4)
    with torch.inference_mode():
        torch_pred = trained(to_pixels(mnist.test_images[:2000])).argmax(1).numpy()
    assert (report["predictions"][:2000] == torch_pred).mean() >= 0.9995


def test_failed_parity_leaves_no_file(trained, mnist, tmp_path):
    path = tmp_path / "vit.onnx"
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(trained, path, to_pixels(mnist.test_images[:64]), atol=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_exports_temporary_file_is_removed_by_the_next_export(trained, mnist, tmp_path):
    """SIGKILL mid-export leaves the temporary file (no finally runs): the next export into the folder removes such
    files once they are an hour old; a younger one may belong to an export running now, and stays."""
    import os
    import time

    old, young = tmp_path / ".vit-killed.onnx.tmp", tmp_path / ".vit-running.onnx.tmp"
    other = tmp_path / ".other-killed.onnx.tmp"  # another model's: not this export's to judge
    for f in (old, young, other):
        f.write_bytes(b"")
    for f in (old, other):
        os.utime(f, (time.time() - 7200, time.time() - 7200))
    export_onnx(trained, tmp_path / "vit.onnx", to_pixels(mnist.test_images[:8]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, other.name, "vit.onnx"])


def test_mean_pool_exports_with_parity(mnist, tmp_path):
    """model.pool=mean: the head reads the mean of the patch tokens; the ONNX file gives PyTorch's logits."""
    from pipeline.model import build_model

    model = build_model(ModelConfig(dim=16, depth=2, pool="mean", pos_embedding="learned"), seed=0).eval()
    path = tmp_path / "mean.onnx"
    figures = export_onnx(model, path, to_pixels(mnist.test_images[:64]))
    assert figures["parity_max_abs_diff"] <= 1e-4
    pixels = to_pixels(mnist.test_images[:32])
    with torch.inference_mode():
        expected = model(pixels).numpy()
    got = OnnxClassifier(path, device="cpu").logits(pixels.numpy())
    assert abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("stem, pools", [("conv", 0), ("conv-pool", 2)])
def test_conv_stem_exports_with_parity_and_quantizes(mnist, tmp_path, stem, pools):
    """model.stem=conv / conv-pool: the stem's convolutions (and max-pools) are ONNX Conv (MaxPool) nodes; parity
    holds and the int8 file loads."""
    from pipeline.model import build_model
    from pipeline.quantize import quantize_int8

    model = build_model(ModelConfig(dim=16, depth=1, stem=stem, stem_channels=8), seed=0).eval()
    path = tmp_path / "conv.onnx"
    figures = export_onnx(model, path, to_pixels(mnist.test_images[:64]))
    assert figures["parity_max_abs_diff"] <= 1e-4
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert (ops.count("Conv"), ops.count("MaxPool")) == (3, pools)
    pixels = to_pixels(mnist.test_images[:32])
    with torch.inference_mode():
        expected = model(pixels).numpy()
    int8 = OnnxClassifier(quantize_int8(path), device="cpu").logits(pixels.numpy())
    assert int8.shape == (32, 10) and abs(int8 - expected).max() < 0.5 * abs(expected).max()
