"""Helpers for the tests of the model's consumers (predict, evaluate, REST serving, int8): train a real model on
a real MNIST subset, export it, register it in a throw-away MLflow store."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.config import ModelConfig, TrainConfig, load_config


def seed_model_config(**changes) -> ModelConfig:
    """The seed preset's model (patch 4, sinusoid base 100, [-1, 1] inputs), 3 blocks and MLP 16 as selected,
    with ``changes``."""
    return load_config("seed").model.model_copy(update={"depth": 3, "mlp_hidden": 16, **changes})


def quick_model_config() -> ModelConfig:
    """The seed preset's model made wider (width 32, 4 heads, MLP 64, 2 blocks): the seed's width-8 model needs
    the full data set and several epochs to learn (about 60% after 2 epochs on 10k images), this one reaches
    about 75% in one epoch on 4k images (2 s) and 90% in two epochs on 10k."""
    return seed_model_config(dim=32, heads=4, mlp_hidden=64, depth=2)


QUICK_TRAIN = TrainConfig(epochs=1, batch_size=32, lr=0.003, device="cpu")


_TRAINED: dict[str, bytes] = {}  # one training per configuration per test session, shared by the test modules


def train_and_export(mnist, path: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, images: int) -> Path:
    """fit() on a stratified subset of ``images`` real training images, export to ``path`` (parity-checked).
    The same configuration asked for again in this test session gets a copy of the same file."""
    import json

    from pipeline.data import stratified_subset
    from pipeline.export import export_onnx
    from pipeline.train import fit, to_pixels

    key = json.dumps([model_cfg.model_dump(mode="json"), train_cfg.model_dump(mode="json"), images], sort_keys=True)
    path = Path(path)
    if key not in _TRAINED:
        idx = stratified_subset(mnist.train_labels, images, 0)
        result = fit(model_cfg, train_cfg, mnist.train_images[idx], mnist.train_labels[idx], seed=0, progress=False)
        export_onnx(result.model, path, to_pixels(mnist.test_images[:64]))
        _TRAINED[key] = path.read_bytes()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_TRAINED[key])
    return path


@contextmanager
def mlflow_store(tmp: Path):
    """A throw-away SQLite tracking store with its artifacts under ``tmp``; the global tracking URI (and the
    environment variable mlflow.set_tracking_uri sets) is restored afterwards."""
    import mlflow
    from mlflow.tracking import _tracking_service

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    saved_env, saved_uri = os.environ.get("MLFLOW_TRACKING_URI"), _tracking_service.utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def register_onnx(uri: str, artifacts: Path, onnx_path: Path, name: str, sample: np.ndarray,
                  experiment: str = "consumers", alias: str | None = "champion") -> str:
    """Log ``onnx_path`` with mlflow.onnx.log_model (CPU provider, signature, input example) into a run of
    ``experiment`` (artifacts under ``artifacts``), register it as ``name``; returns the version."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from pipeline.inference import OnnxClassifier

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment,
                                                                        artifact_location=artifacts.as_uri())
    signature = infer_signature(sample, OnnxClassifier(onnx_path, device="cpu").logits(sample))
    with mlflow.start_run(experiment_id=exp_id, run_name="train"):
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", registered_model_name=name,
                                     signature=signature, input_example=sample[:2], save_as_external_data=False,
                                     onnx_execution_providers=["CPUExecutionProvider"])
    version = str(info.registered_model_version)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
