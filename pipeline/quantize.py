"""int8 variant of the ONNX model (ONNX Runtime dynamic quantization) and its comparison with the fp32 model:
test accuracy, file size and CPU throughput.

Dynamic quantization stores the MatMul/Gemm weights as int8 and quantizes activations on the fly (uint8, per
tensor) just before each integer matmul. Only those op types are quantized (OP_TYPES): left to its default,
quantize_dynamic also turns the convolutional stem's Conv nodes (model.stem: conv / conv-pool) into ConvInteger,
which ONNX Runtime's CPU provider runs ~3.5x slower than the fp32 Conv it replaces. The strong preset's 1.03M-
parameter conv-pool model on the 2-core dev VM (ONNX Runtime 1.31, one thread, batches of 1024; ORT's profiler):
ConvInteger 0.57 s against Conv 0.16 s per 1024 images, int8 throughput 580 -> 750 images/s, int8 file 1293 ->
1372 KiB (the stem's convolution weights stay fp32). The seed preset (linear patch embedding, no Conv) gets the
same int8 file either way. On an H200 machine's CPU the int8 step of the strong flow took 67.6 s with ConvInteger
and one thread (pipeline.inference.OnnxClassifier now gives an int8 call every thread).

The exporter's graph needs one preparation: its value_info carries the shapes of initializers, which go stale when
the quantizer rewrites Gemm as a MatMul with a transposed weight, and ONNX shape inference then stops with "Inferred
shape and existing shape differ"; value_info is only a cache, so it is dropped and recomputed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.inference import OnnxClassifier

WEIGHT_TYPES = ("qint8", "quint8")
OP_TYPES = ("MatMul", "Gemm")  # the weights quantized; Conv stays fp32 (ConvInteger is slow on CPU, see above)


class QuantizationError(RuntimeError):
    """ONNX Runtime could not quantize the model, or cannot run the quantized one."""


def int8_path_for(fp32_path: str | os.PathLike) -> Path:
    """models/x/<id>.onnx -> models/x/<id>.int8.onnx"""
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}.int8.onnx")


def quantize_int8(fp32_path: str | os.PathLike, int8_path: str | os.PathLike | None = None, *,
                  per_channel: bool = False, weight_type: str = "qint8",
                  op_types: Sequence[str] = OP_TYPES) -> Path:
    """Dynamically quantize the ``op_types`` nodes (default OP_TYPES: MatMul and Gemm) of an fp32 ONNX file to int8
    weights; returns the int8 file's path (default: next to the fp32 file, ``<stem>.int8.onnx``). The file
    appears only once ONNX Runtime has loaded it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type {weight_type!r}: choose one of {', '.join(WEIGHT_TYPES)}")
    fp32_path = Path(fp32_path)
    int8_path = Path(int8_path) if int8_path is not None else int8_path_for(fp32_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vitflow-quant-") as tmp:
        prepared, out = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            proto = onnx.load(str(fp32_path))
        except Exception as exc:
            raise QuantizationError(f"{fp32_path} is not a readable ONNX model: {type(exc).__name__}: "
                                    f"{exc}") from exc
        del proto.graph.value_info[:]  # a shape cache, stale once Gemm becomes MatMul(x, W^T); recomputed
        onnx.save(proto, str(prepared))
        quant_logger = logging.getLogger()
        level = quant_logger.level
        quant_logger.setLevel(max(level, logging.ERROR))  # the quantizer warns "consider pre-processing" on root
        try:
            quantize_dynamic(str(prepared), str(out), op_types_to_quantize=list(op_types), per_channel=per_channel,
                             weight_type=QuantType.QInt8 if weight_type == "qint8" else QuantType.QUInt8)
        except Exception as exc:
            raise QuantizationError(f"ONNX Runtime could not quantize {fp32_path}: {type(exc).__name__}: "
                                    f"{exc}") from exc
        finally:
            quant_logger.setLevel(level)
        try:
            OnnxClassifier(out, device="cpu")
        except Exception as exc:
            raise QuantizationError(f"ONNX Runtime cannot load the int8 model of {fp32_path}: {exc}") from exc
        staged = int8_path.with_name(f".{int8_path.name}.tmp")
        shutil.copyfile(out, staged)
        os.replace(staged, int8_path)  # atomic: readers see no file or the complete one
    return int8_path


def throughput(clf: OnnxClassifier, pixels: np.ndarray, batch_size: int = 1024, repeats: int = 3) -> float:
    """Images per second over ``pixels`` in batches of ``batch_size``: the best of ``repeats`` passes after a
    warm-up batch (the best pass is the least disturbed by other work on the machine)."""
    clf.logits(pixels[:batch_size], batch_size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        clf.logits(pixels, batch_size)
        best = min(best, time.perf_counter() - start)
    return len(pixels) / best if best > 0 else float("inf")


def compare(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, images: np.ndarray, labels: np.ndarray,
            batch_size: int = 1024, threads: int | None = None, repeats: int = 3,
            timing_images: int | None = 4096) -> dict[str, Any]:
    """fp32 vs int8 on the same test images, both on CPU with the same thread count: accuracy, the drop
    (fp32 - int8, in accuracy points), how often they agree, file sizes (KiB) and throughput (images/s).

    Accuracy and agreement are over all ``images``; throughput is the best of ``repeats`` passes over the first
    ``timing_images`` of them (None: all). 4096 images are four full batches of 1024, enough for a steady rate,
    at 40% of the cost of timing all 10,000 test images three times per model.

    ``images``: uint8 (N, 28, 28) / (N, 1, 28, 28) or float pixels in [0, 1]."""
    pixels = np.asarray(images)
    pixels = pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else pixels.astype(np.float32)
    pixels = np.ascontiguousarray(pixels.reshape(len(pixels), 1, 28, 28))
    labels = np.asarray(labels)
    out: dict[str, Any] = {}
    predictions = {}
    for name, path in (("fp32", Path(fp32_path)), ("int8", Path(int8_path))):
        clf = OnnxClassifier(path, device="cpu", threads=threads)
        predictions[name] = clf.predict(pixels, batch_size)
        out[f"{name}_test_accuracy"] = float((predictions[name] == labels).mean())
        out[f"{name}_size_kb"] = path.stat().st_size / 1024
        out[f"{name}_images_per_second"] = throughput(clf, pixels[:timing_images], batch_size, repeats)
    out["int8_accuracy_drop"] = out["fp32_test_accuracy"] - out["int8_test_accuracy"]
    out["int8_agreement"] = float((predictions["fp32"] == predictions["int8"]).mean())
    out["int8_speedup"] = out["int8_images_per_second"] / out["fp32_images_per_second"]
    out["test_images"] = len(labels)
    out["timing_images"] = len(pixels[:timing_images])
    out["provider"] = "CPUExecutionProvider"
    return out
