"""Evaluate a deployed model on the MNIST test set (accuracy, per-class accuracy, confusion matrix, throughput,
provider) and record the evaluation in MLflow, linked to the registered model version it evaluated."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline import plots
from pipeline.inference import ModelSource, OnnxClassifier

ROLE = "vitflow.role"
EVALUATIONS_EXPERIMENT = "vitflow-evaluations"


def evaluate_classifier(clf: OnnxClassifier, images: np.ndarray, labels: np.ndarray,
                        batch_size: int = 1024, classes: int = 10) -> dict[str, Any]:
    """Accuracy overall and per class, the confusion counts, and throughput (one timed pass over all images in
    batches of ``batch_size`` after a warm-up batch) on the provider that actually ran.

    ``images``: uint8 (N, 28, 28) / (N, 1, 28, 28), or float pixels in [0, 1]."""
    pixels = np.asarray(images)
    pixels = pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else pixels.astype(np.float32)
    pixels = np.ascontiguousarray(pixels.reshape(len(pixels), 1, 28, 28))
    labels = np.asarray(labels).astype(np.int64)
    clf.logits(pixels[:batch_size], batch_size)  # warm-up: allocation, and kernel choice on CUDA
    start = time.perf_counter()
    logits = clf.logits(pixels, batch_size)
    seconds = time.perf_counter() - start
    predictions = logits.argmax(axis=1)
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    per_class = {int(d): {"images": int(counts[d].sum()), "correct": int(counts[d, d]),
                          "accuracy": float(counts[d, d] / counts[d].sum()) if counts[d].sum() else float("nan")}
                 for d in range(classes)}
    correct = int(np.trace(counts))
    return {
        "test_accuracy": correct / len(labels) if len(labels) else float("nan"),
        "correct": correct,
        "test_images": len(labels),
        "per_class": per_class,
        "confusion": counts,
        "predictions": predictions,
        "labels": labels,
        "provider": clf.provider,
        "images_per_second": len(labels) / seconds if seconds > 0 else float("inf"),
        "batch_size": batch_size,
    }


def confusion_figure(result: dict[str, Any], source: ModelSource):
    return plots.confusion_matrix(result["labels"], result["predictions"],
                                  f"Test confusion matrix of {source.label} ({result['provider']})")


def log_evaluation(result: dict[str, Any], source: ModelSource, tracking_uri: str,
                   data_md5: dict[str, str] | None = None, experiment: str | None = None) -> dict[str, str]:
    """A new MLflow run holding the evaluation: metrics (test_accuracy, class_<d>_accuracy, images_per_second),
    the provider, the confusion-matrix figure and the per-class table. For a registered model the run goes to
    the experiment of the run that logged the model, is tagged with the model's name, version and URI, its
    metrics are linked to the logged model, and the version gets the tags evaluated_accuracy and
    evaluation_run_id. Returns the run id and experiment name."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import Tracker

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if experiment is None:
        experiment = EVALUATIONS_EXPERIMENT
        if source.run_id:
            try:
                experiment = client.get_experiment(client.get_run(source.run_id).info.experiment_id).name
            except Exception:  # the source run was deleted: keep the evaluation anyway
                pass
    tracker = Tracker(tracking_uri, experiment)
    tags = {ROLE: "evaluation", "model_uri": source.uri, "model_path": str(source.path) if not source.name else "",
            "onnxruntime_provider": result["provider"], "test_images": result["test_images"]}
    if source.name:
        tags.update({"model_name": source.name, "model_version": source.version,
                     "model_source_run_id": source.run_id or ""})
    tags.update({f"data_md5.{k}": v for k, v in (data_md5 or {}).items() if k.startswith("t10k")})
    run_id = tracker.start_run(f"evaluate {source.label}", tags={k: v for k, v in tags.items() if v != ""},
                               params={"batch_size": result["batch_size"], "test_images": result["test_images"]})
    try:
        now = int(time.time() * 1000)
        metrics = {"test_accuracy": result["test_accuracy"], "images_per_second": result["images_per_second"]}
        metrics.update({f"class_{d}_accuracy": row["accuracy"] for d, row in result["per_class"].items()
                        if row["images"]})
        model_id = source.model_id or None
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0, model_id=model_id) for k, v in metrics.items()],
                         synchronous=True)
        tracker.log_figure(run_id, confusion_figure(result, source), "figures/confusion_matrix.png")
        tracker.log_dict(run_id, {"test_accuracy": result["test_accuracy"], "per_class": result["per_class"],
                                  "confusion": result["confusion"].tolist(), "provider": result["provider"],
                                  "images_per_second": result["images_per_second"], "model_uri": source.uri},
                         "evaluation.json")
        if source.name:
            for key, value in {"evaluated_accuracy": f"{result['test_accuracy']:.6f}", "evaluation_run_id": run_id,
                               "evaluated_images": result["test_images"],
                               "evaluated_provider": result["provider"]}.items():
                client.set_model_version_tag(source.name, source.version, key, str(value))
        client.log_batch(run_id, tags=[RunTag("mlflow.note.content",
                                              f"Evaluation of {source.uri} on {result['test_images']} MNIST test "
                                              f"images: {100 * result['test_accuracy']:.2f}%")], synchronous=True)
    except BaseException as exc:
        tracker.close_open_runs("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end_run(run_id)
    return {"run_id": run_id, "experiment": experiment}
