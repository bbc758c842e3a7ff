"""ONNX Runtime classifier: CUDA when a GPU is present, else CPU, and always says which provider really ran.
The model is an .onnx file, a folder holding one (an MLflow model), or an MLflow URI: models:/NAME@ALIAS,
models:/NAME/VERSION or runs:/RUN_ID/PATH, downloaded from the tracking server or store."""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
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


class ModelNotFound(LookupError):
    """The model a path or URI names does not exist or holds no ONNX file; the message says where it looked."""


@dataclass
class ModelSource:
    """Where a classifier's model came from: the local .onnx file it loaded, and for a registry URI the
    registered model's name and version (an alias resolved to its version)."""

    uri: str
    path: Path
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    model_id: str | None = None
    tracking_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``NAME vN`` for a registered model; the URI for another MLflow URI (its download is temporary);
        else the file's path."""
        if self.name:
            return f"{self.name} v{self.version}"
        return self.uri if is_mlflow_uri(self.uri) else str(self.path)


def is_mlflow_uri(model: str | os.PathLike) -> bool:
    return str(model).startswith(("models:/", "runs:/"))


def _onnx_in(folder: Path, what: str) -> Path:
    """The one .onnx file under ``folder``; several are refused, not guessed among (a study's models/ folder holds
    an fp32 and an int8 file per run)."""
    found = sorted(folder.rglob("*.onnx"))
    if not found:
        raise ModelNotFound(f"{what} holds no .onnx file")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ModelNotFound(f"{what} holds {len(found)} .onnx files ({names}); name the file, or a registered "
                            f"model (models:/NAME@ALIAS)")
    return found[0]


def _run_artifact_location(client, uri: str) -> str:
    """runs:/RUN_ID/PATH as a location in the run's store: the files of the run's logged model named PATH (MLflow
    3 keeps logged models apart from the run's artifacts), else the run's artifact PATH."""
    run_id, _, path = uri.removeprefix("runs:/").strip("/").partition("/")
    run = client.get_run(run_id)
    token = None
    while path and "/" not in path:  # every page: an experiment retrained weekly has many models named "model"
        page = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"name = '{path}'", page_token=token)
        for logged in page:
            if logged.source_run_id == run_id:
                return logged.artifact_location
        if not page.token:
            break
        token = page.token
    return run.info.artifact_uri.rstrip("/") + (f"/{path}" if path else "")


def resolve_model(model: str | os.PathLike, download_dir: str | os.PathLike,
                  tracking_uri: str | None = None) -> ModelSource:
    """The local .onnx file behind ``model``: a file, a folder holding one, or an MLflow URI (downloaded into
    ``download_dir``; models:/NAME@ALIAS is resolved to its version). Raises ModelNotFound with the cause."""
    text = str(model)
    if not is_mlflow_uri(text):
        path = Path(text).expanduser()
        if path.is_dir():
            return ModelSource(uri=text, path=_onnx_in(path, f"folder {text}"))
        if not path.is_file():
            raise ModelNotFound(f"model file {text} does not exist")
        return ModelSource(uri=text, path=path)

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrackingConfig
    from pipeline.tracking import SERVED_ARTIFACTS, served_artifacts_on_disk, sqlite_path
    from pipeline.tracking import tracking_uri as default_tracking_uri

    if tracking_uri is None:
        tracking_uri = default_tracking_uri(TrackingConfig())
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():  # MLflow would create an empty store there, then not find the model
        raise ModelNotFound(f"{text} not found: there is no MLflow store at {db} ({tracking_uri}); train and "
                            f"register a model with `vitflow run`, or point MLFLOW_TRACKING_URI at the store "
                            f"that holds it")
    source = ModelSource(uri=text, path=Path(), tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if text.startswith("models:/"):
            ref = text.removeprefix("models:/").strip("/")
            if "@" in ref:
                name, alias = ref.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, _, version = ref.rpartition("/")
                if not name or not (version.isdigit() or version == "latest"):
                    raise ModelNotFound(f"{text}: expected models:/NAME@ALIAS, models:/NAME/VERSION or "
                                        f"models:/NAME/latest")
                if version == "latest":
                    versions = client.search_model_versions(f"name = '{name}'")
                    if not versions:
                        raise ModelNotFound(f"{text}: registered model {name!r} has no versions in {tracking_uri}")
                    version = str(max(int(v.version) for v in versions))
                mv = client.get_model_version(name, version)
            source.name, source.version, source.run_id = mv.name, str(mv.version), mv.run_id
            source.model_id = getattr(mv, "model_id", None) or (  # MLflow 3: the logged model behind the version
                mv.source.removeprefix("models:/") if str(mv.source).startswith("models:/m-") else None)
            # Where the version's files are, asked of this store. Not the models:/ URI itself: MLflow's models:/
            # artifact repository looks it up in the *global* registry ($MLFLOW_TRACKING_URI, else ./mlflow.db,
            # which it creates), not in ``tracking_uri``. The same holds for runs:/RUN_ID/NAME of a logged model.
            text = client.get_model_version_download_uri(mv.name, mv.version)
        else:
            text = _run_artifact_location(client, text)
        if text.startswith(SERVED_ARTIFACTS) and db is not None:  # behind mlflow/server.sh: read from its folder
            on_disk = served_artifacts_on_disk(text, tracking_uri)
            if on_disk is None:
                raise ModelNotFound(f"{source.uri}: its files are behind an MLflow server ({text}), and not in "
                                    f"{db.resolve().parent / 'artifacts'}; point MLFLOW_TRACKING_URI at that server")
            text = on_disk.as_uri()
        local = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(download_dir),
                                                    tracking_uri=tracking_uri)
    except ModelNotFound:
        raise
    except MlflowException as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFound(f"{source.uri} not found in the MLflow store {tracking_uri} ({message})") from None
    local_path = Path(local)
    source.path = local_path if local_path.is_file() else _onnx_in(local_path, source.uri)
    return source


CPU_CHUNK = 64  # images per ONNX Runtime call on CPU: a chunk's attention scores stay in the core's cache


def batch_dependent(path: str | os.PathLike) -> bool:
    """Whether the model's output for an image depends on the rest of its batch: dynamic quantization
    (DynamicQuantizeLinear, as onnxruntime.quantization.quantize_dynamic writes) takes its activation scale from
    the whole input tensor."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type.startswith("DynamicQuantize") for node in graph.node)


class OnnxClassifier:
    """Digit classifier over an ONNX model: float pixels in [0, 1], (N, 1, 28, 28) -> logits / probabilities.

    ``model``: an .onnx file, a folder holding one, or an MLflow URI (models:/NAME@ALIAS, models:/NAME/VERSION,
    runs:/...), resolved against ``tracking_uri`` (default: $MLFLOW_TRACKING_URI, else the project's store).
    ``source`` says what was loaded. On CUDA the inputs and outputs go through ONNX Runtime's IO binding.

    On CPU a large batch is cut into chunks of ``cpu_chunk`` images, run ``threads`` at a time (default: one per
    core) in one-thread ONNX Runtime calls. A tiny ViT's 1024-image call is bound by memory traffic (its attention
    scores alone are ~20 MB per block); cache-sized chunks on every core are ~1.5x faster (bench/inference.py).
    A dynamically quantized (int8) model is always run on whole batches: its activation scale is per call. ONNX
    Runtime then spreads each call over ``threads`` (default: every core) itself; before 2026-12-04 such a model
    ran on one thread, and the flow's int8 comparison of the strong preset took 67.6 s of its 5 minutes on a
    16-core GPU machine, where the fp32 model's evaluation took 3.7 s.
    """

    def __init__(self, model: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 tracking_uri: str | None = None, io_binding: bool | None = None,
                 cpu_chunk: int = CPU_CHUNK) -> None:
        providers = preferred_providers(device)
        self.cpu_chunk = cpu_chunk
        with tempfile.TemporaryDirectory(prefix="vitflow-model-") as download_dir:
            self.source = resolve_model(model, download_dir, tracking_uri)
            dynamic_quantized = batch_dependent(self.source.path)
            options = ort.SessionOptions()
            self.workers = 1
            cpu_threads = max(1, threads or os.cpu_count() or 1)
            if providers[0] == CPU and not dynamic_quantized:  # parallel over chunks, not inside one call
                self.workers = cpu_threads
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
            elif providers[0] == CPU:  # whole batches: parallel inside each call
                options.intra_op_num_threads = cpu_threads
            elif threads:
                options.intra_op_num_threads = threads
            # The session holds the model in memory: the downloaded copy can go when it is built.
            self.session = ort.InferenceSession(str(self.source.path), sess_options=options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.io_binding = self.provider == CUDA if io_binding is None else io_binding
        self._pool: ThreadPoolExecutor | None = None
        # Chunks across cores on CPU, unless chunking would change the answers (dynamic quantization).
        self.chunked = self.provider == CPU and not dynamic_quantized

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the model (first of the session's active providers)."""
        return self.session.get_providers()[0]

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return self.session.run(None, {self.input_name: chunk})[0]
        # IO binding: the input is copied to the device once, the output is allocated there and copied back
        # once, with no per-call staging by session.run.
        device = "cuda" if self.provider == CUDA else "cpu"
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(chunk, device, 0))
        binding.bind_output(self.output_name, device, 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _run_parallel(self, batch: np.ndarray) -> np.ndarray:
        """One batch on CPU: cache-sized chunks, ``workers`` at once (ONNX Runtime releases the GIL in run)."""
        size = max(1, min(self.cpu_chunk, -(-len(batch) // self.workers)))  # small batches still use every core
        if len(batch) <= size:
            return self._run(batch)
        chunks = (batch[i:i + size] for i in range(0, len(batch), size))
        if self.workers == 1:
            return np.concatenate([self._run(chunk) for chunk in chunks])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vitflow-ort")
        return np.concatenate(list(self._pool.map(self._run, chunks)))

    def logits(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        run = self._run_parallel if self.chunked else self._run
        outs = [run(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
        return np.concatenate(outs) if outs else np.empty((0, 10), np.float32)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

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
