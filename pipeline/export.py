"""ONNX export: one self-contained file with a dynamic batch axis, checked by onnx.checker and gated on parity
with PyTorch. The file appears under its final name only after every check passed."""

from __future__ import annotations

import glob
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from pipeline.inference import OnnxClassifier

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


STALE_TMP_S = 3600  # an export takes seconds: a temporary file this old was left by a killed one


class ExportError(RuntimeError):
    """The exported model failed the checker or does not match PyTorch."""


def export_onnx(model: nn.Module, path: str | os.PathLike, sample_pixels: Tensor, atol: float = 1e-4,
                metadata: dict[str, str] | None = None) -> dict[str, float]:
    """Export ``model`` (input: float pixels in [0, 1], (N, C, H, W)) to ``path``; returns parity figures.

    Raises ExportError when onnx.checker rejects the file or ONNX Runtime's logits differ from PyTorch's by more
    than ``atol`` on ``sample_pixels``; nothing is left at ``path`` then.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().to("cpu")
    sample = sample_pixels.detach().to("cpu", torch.float32)
    if len(sample) < 2:
        raise ExportError("parity check needs a batch of at least 2 images")
    for stale in path.parent.glob(f".{glob.escape(path.stem)}-*.onnx.tmp"):  # an export killed mid-write (SIGKILL)
        if time.time() - stale.stat().st_mtime > STALE_TMP_S:  # a younger one may be another process's, now
            stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        torch.onnx.export(
            model, (sample[:2],), str(tmp), dynamo=True, external_data=False, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
        )
        proto = onnx.load(str(tmp))
        for key, value in {"input": "float32 pixel intensities in [0, 1], shape (N, 1, 28, 28), white digit on "
                                    "black", "output": "logits over the digits 0-9 (apply softmax for probabilities)",
                           **(metadata or {})}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx.checker rejected the exported model: {exc}") from exc
        with torch.inference_mode():
            expected = model(sample).numpy()
        got = OnnxClassifier(tmp, device="cpu").logits(sample.numpy())
        max_abs_diff = float(np.max(np.abs(expected - got)))
        if not max_abs_diff <= atol:
            raise ExportError(f"ONNX Runtime logits differ from PyTorch by {max_abs_diff:.3g} (> export.parity_atol="
                              f"{atol}) on {len(sample)} real images; the export is not faithful")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the model is meant to be shared
        os.replace(tmp, path)  # atomic: readers see the old file or the complete new one
    finally:
        tmp.unlink(missing_ok=True)
    return {"parity_max_abs_diff": max_abs_diff, "parity_images": float(len(sample)),
            "onnx_size_kb": path.stat().st_size / 1024}

