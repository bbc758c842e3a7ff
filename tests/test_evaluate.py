"""``vitflow evaluate``: test-set accuracy (the same as ONNX Runtime run directly on the same images), per-class
accuracy, the confusion-matrix figure, throughput and provider; with --log-to-mlflow a new run linked to the
registered model version, and the version tagged evaluated_accuracy."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import load
from pipeline.inference import evaluate_onnx
from pipeline.train import to_pixels

from ._consume import QUICK_TRAIN, mlflow_store, quick_model_config, register_onnx, train_and_export

SUBSET = 2000
NAME = "vit-mnist-eval-test"


@pytest.fixture(scope="module")
def registered(mnist, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    onnx_path = train_and_export(mnist, tmp / "vit.onnx", quick_model_config(), QUICK_TRAIN, images=4000)
    with mlflow_store(tmp) as uri:
        version = register_onnx(uri, tmp / "artifacts", onnx_path, NAME, to_pixels(mnist.test_images[:4]).numpy(),
                                experiment="training")
    return {"uri": uri, "onnx": onnx_path, "version": version, "tmp": tmp}


def evaluate_main(args: list[str], capsys) -> tuple[int, str, str]:
    from flows.cli import main

    capsys.readouterr()
    try:
        code = main(["evaluate", *args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_evaluate_registered_model_and_log_to_mlflow(registered, data_root, capsys, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    figure = tmp_path / "cm.png"
    with mlflow_store(registered["tmp"]):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
        code, out, err = evaluate_main(["--model", f"models:/{NAME}@champion", "--test-subset", str(SUBSET),
                                        "--log-to-mlflow", "--figure", str(figure)], capsys)
    assert code == 0, err

    # the same images through ONNX Runtime directly give the same accuracy
    data = load(DataConfig(root=str(data_root), test_subset=SUBSET, download=False))
    direct = evaluate_onnx(registered["onnx"], data.test_images.numpy(), data.test_labels.numpy())
    printed = float(re.search(r"^Accuracy:\s+([\d.]+)%", out, re.M).group(1)) / 100
    assert printed == pytest.approx(direct["test_accuracy"], abs=5e-5)
    assert f"({int(round(direct['test_accuracy'] * SUBSET)):,} / {SUBSET:,})" in out
    assert f"Model:       models:/{NAME}@champion  ({NAME} v{registered['version']})" in out
    assert re.search(r"^Provider:\s+CPUExecutionProvider$", out, re.M)
    assert re.search(r"^Throughput:\s+[\d,]+ images/s \(batches of 1024\)$", out, re.M)
    per_class = re.findall(r"^(\d)\s+(\d+)\s+(\d+)\s+([\d.]+)%$", out, re.M)
    assert [int(row[0]) for row in per_class] == list(range(10))
    labels, predictions = data.test_labels.numpy(), direct["predictions"]
    for digit, images, correct, accuracy in per_class:
        mask = labels == int(digit)
        assert int(images) == mask.sum() and int(correct) == (predictions[mask] == int(digit)).sum()
    with Image.open(figure) as png:
        assert png.format == "PNG" and png.width >= 800

    client = MlflowClient(tracking_uri=registered["uri"])
    mv = client.get_model_version(NAME, registered["version"])
    assert float(mv.tags["evaluated_accuracy"]) == pytest.approx(direct["test_accuracy"], abs=1e-6)
    run = client.get_run(mv.tags["evaluation_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "training"  # next to the model's own run
    tags = run.data.tags
    assert (tags["model_name"], tags["model_version"]) == (NAME, registered["version"])
    assert tags["model_uri"] == f"models:/{NAME}@champion" and tags["vitflow.role"] == "evaluation"
    assert tags["onnxruntime_provider"] == "CPUExecutionProvider"
    assert tags["data_md5.t10k-images-idx3-ubyte"] == "2646ac647ad5339dbf082846283269ea"
    metrics = run.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(direct["test_accuracy"])
    assert {f"class_{d}_accuracy" for d in range(10)} <= set(metrics) and metrics["images_per_second"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "evaluation.json" in artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/confusion_matrix.png"]
    report = json.load(open(client.download_artifacts(run.info.run_id, "evaluation.json", str(tmp_path))))
    assert np.trace(np.array(report["confusion"])) == int(round(direct["test_accuracy"] * SUBSET))
    # the metrics are linked to the logged model behind the version (MLflow 3: its source is models:/m-<id>)
    model_id = mv.source.removeprefix("models:/")
    linked = {m.key: m.value for m in client.get_logged_model(model_id).metrics or []}
    assert linked["test_accuracy"] == pytest.approx(direct["test_accuracy"])


def test_evaluate_plain_file_logs_to_evaluations_experiment(registered, capsys, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_store(tmp_path):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        code, out, err = evaluate_main(["--model", str(registered["onnx"]), "--test-subset", "500",
                                        "--log-to-mlflow"], capsys)
    assert code == 0, err
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("vitflow-evaluations")
    assert exp.artifact_location.startswith("file://") and "mlruns" not in exp.artifact_location
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["model_path"] == str(registered["onnx"])
    assert "model_version" not in runs[0].data.tags


def test_evaluate_without_data_is_a_clear_usage_error(registered, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VITFLOW_DATA_DIR", str(tmp_path / "no-mnist"))
    code, out, err = evaluate_main(["--model", str(registered["onnx"]), "--no-download"], capsys)
    assert code == 2 and err.startswith("vitflow: MNIST not found") and err.count("\n") == 1


@pytest.mark.parametrize("args, fragment", [
    (["--test-subset", "5"], "5: the test set has 10,000 images, and a stratified subset needs one of each of the 10"),
    (["--test-subset", "20000"], "20000: the test set has 10,000 images"),
    (["--figure", "{tmp}/no-such-folder/cm.png"], "folder {tmp}/no-such-folder does not exist"),
    (["--figure", "{tmp}/cm.xyz"], "unknown image format .xyz; use one of"),
])
def test_evaluate_usage_errors_come_before_the_evaluation(registered, capsys, tmp_path, args, fragment):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = evaluate_main(["--model", str(registered["onnx"]), *args], capsys)
    assert code == 2 and fragment.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err
    assert out == "" and list(tmp_path.iterdir()) == []  # nothing evaluated, nothing written
