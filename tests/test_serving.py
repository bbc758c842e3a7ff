"""REST serving: the registered ONNX model behind ``mlflow models serve -m models:/NAME@champion --env-manager
local`` answers a batch of real test images exactly like ONNX Runtime run directly on the same file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.inference import OnnxClassifier
from pipeline.train import to_pixels

from ._consume import QUICK_TRAIN, free_port, mlflow_store, quick_model_config, register_onnx, train_and_export

NAME = "vit-mnist-serving-test"
HEALTH_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def registered(mnist, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    onnx_path = train_and_export(mnist, tmp / "vit.onnx", quick_model_config(), QUICK_TRAIN, images=4000)
    with mlflow_store(tmp) as uri:
        version = register_onnx(uri, tmp / "artifacts", onnx_path, NAME, to_pixels(mnist.test_images[:4]).numpy())
    return {"uri": uri, "onnx": onnx_path, "version": version, "tmp": tmp}


def _get(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


def _post_json(url: str, payload: dict, timeout: float = 30.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it was started as its own session leader: the group id is its
    PID), SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_mlflow_models_serve_matches_onnxruntime(registered, mnist):
    port = free_port()
    log = registered["tmp"] / "serve.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    # mlflow runs `uvicorn` by name: the virtual environment's bin/ must be on PATH (as when it is activated)
    env = dict(os.environ, MLFLOW_TRACKING_URI=registered["uri"],
               PATH=f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [str(mlflow_cli), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=registered["tmp"])
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        healthy = False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                healthy = _get(f"http://127.0.0.1:{port}/ping") == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                healthy = False
            if healthy:
                break
            time.sleep(0.5)
        assert healthy, f"no /ping answer within {HEALTH_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"

        batch = to_pixels(mnist.test_images[100:132]).numpy()  # 32 real test digits, (32, 1, 28, 28)
        answer = _post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": batch.tolist()})
        served = answer["predictions"]
        served = np.asarray(served["logits"] if isinstance(served, dict) else served, dtype=np.float32)
        direct = OnnxClassifier(registered["onnx"], device="cpu").logits(batch)
        assert served.shape == (32, 10)
        np.testing.assert_allclose(served, direct, atol=1e-5)
        assert (served.argmax(1) == direct.argmax(1)).all()
        # and a model that learned something in its one epoch
        assert (served.argmax(1) == mnist.test_labels[100:132].numpy()).mean() > 0.5
    finally:
        _stop(proc)
    assert proc.poll() is not None
