"""ONNX Runtime classifier: CUDA when a GPU is present, else CPU, and always says which provider really ran."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return Path("/dev/nvidia0").exists()


def preferred_providers(device: str = "auto") -> list[str]:
    """CUDA then CPU when a GPU is present and this onnxruntime has CUDA; CPU alone otherwise. Asking for CUDA
    without a GPU only earns a loud load error before the silent fall-back, so it is not asked for."""
    if device != "cpu" and CUDA in ort.get_available_providers() and gpu_present():
        return [CUDA, CPU]
    if device == "cuda":
        raise RuntimeError("CUDA inference asked for, but no GPU or no CUDA-enabled onnxruntime is present")
    return [CPU]


class OnnxClassifier:
    """Digit classifier over an ONNX file: float pixels in [0, 1], (N, 1, 28, 28) -> logits / probabilities."""

    def __init__(self, model_path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), sess_options=options,
                                            providers=preferred_providers(device))
        self.input_name = self.session.get_inputs()[0].name

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the model (first of the session's active providers)."""
        return self.session.get_providers()[0]

    def logits(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        outs = [self.session.run(None, {self.input_name: pixels[i:i + batch_size]})[0]
                for i in range(0, len(pixels), batch_size)]
        return np.concatenate(outs) if outs else np.empty((0, 10), np.float32)

    def probabilities(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        return softmax(self.logits(pixels, batch_size))

    def predict(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        return self.logits(pixels, batch_size).argmax(axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax: logits (N, classes) -> probabilities."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def evaluate_onnx(model_path: str | os.PathLike, images_u8: np.ndarray, labels: np.ndarray,
                  batch_size: int = 1024, device: str = "auto") -> dict[str, object]:
    """Test-set accuracy with ONNX Runtime, the provider that ran, throughput (images per second over the whole
    set in batches of ``batch_size``), and per image the prediction and the class probabilities."""
    clf = OnnxClassifier(model_path, device=device)
    pixels = images_u8.astype(np.float32) / 255.0
    clf.logits(pixels[:batch_size], batch_size)  # warm-up: first run allocates and (on CUDA) picks kernels
    start = time.perf_counter()
    logits = clf.logits(pixels, batch_size)
    seconds = time.perf_counter() - start
    predictions = logits.argmax(axis=1)
    correct = predictions == labels
    return {
        "test_accuracy": float(correct.mean()),
        "test_error": float(1 - correct.mean()),
        "provider": clf.provider,
        "images_per_second": len(labels) / seconds if seconds > 0 else float("inf"),
        "batch_size": batch_size,
        "predictions": predictions,
        "probabilities": softmax(logits),
    }
