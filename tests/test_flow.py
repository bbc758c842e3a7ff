"""End to end: the smoke preset through the real CLI -> Prefect flow -> MLflow (SQLite) -> ONNX -> registry."""

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.slow

ROLE = "tags.`vitflow.role`"


def _runs(client, experiment_id, role, extra=""):
    return client.search_runs([experiment_id], filter_string=f"{ROLE} = '{role}'{extra}", max_results=500)


def test_cli_prints_summary(smoke_runs):
    first, _ = smoke_runs
    out = first.stdout
    assert "Study 'smoke' (2 configurations x 2-fold CV" in out
    assert "<- selected" in out and "Test accuracy (ONNX Runtime, CPUExecutionProvider)" in out
    assert "Registered:      models:/vit-mnist-smoke/1 -> @champion (no champion yet)" in out
    assert "Final training:  2 epochs\n" in out  # smoke's train.epochs, no time budget
    assert "Wall time:" in out and "study run" in out
    assert "Throughput:      " in out and "images/s (CPUExecutionProvider, 500 images in batches of 1024)" in out
    assert "Model card:      model_card.md on final run" in out
    # the outcome is also the flow log's last line: what a deployment run's log (the Prefect UI, --watch) shows of it
    result = re.search(r"Flow run '[\w-]+' - result: (\S+) selected; test accuracy (\S+) \(ONNX Runtime, "
                       r"CPUExecutionProvider; PyTorch \S+\); models:/vit-mnist-smoke/1 -> @champion \(no champion "
                       r"yet\); wall time [\d.]+ s; model card: the study-summary artifact, and model_card.md "
                       r"on MLflow run \w+", first.stderr)
    assert result, first.stderr[-3000:]
    assert f"{result[1]}  <- selected" in out
    assert f"Test accuracy (ONNX Runtime, CPUExecutionProvider): {result[2]}" in out
    # the retraining's progress lines in the task's log (what the Prefect UI shows): its first and last epoch
    progress = re.findall(r"Task run 'retrain-best-\w+' - final (\S+): epoch (\d)/2, test_error (0\.\d{4}), "
                          r"train_loss \d+\.\d{4}, \d+\.\d s per epoch, (about .+ left|.+ in all)", first.stderr)
    assert [(epoch, tail.startswith("about")) for _, epoch, _, tail in progress] == [("1", True), ("2", False)], \
        first.stderr[-3000:]
    assert progress[0][0] in out  # the selected configuration's label, as the summary names it
    # folds of a second or two say nothing until they finish (their progress lines start past 30 s)
    lines = [line for line in first.stderr.splitlines() if re.search(r": epoch \d+/\d+, ", line)]
    assert len(lines) == 2 and all("Task run 'retrain-best-" in line for line in lines), lines


def test_run_tree(mlflow_client):
    exp = mlflow_client.get_experiment_by_name("vitflow-smoke")
    assert exp.artifact_location.startswith("file://") and "mlruns" not in exp.artifact_location
    studies = _runs(mlflow_client, exp.experiment_id, "study")
    assert len(studies) == 2
    study = studies[-1]  # the first run
    assert study.info.status == "FINISHED"
    tags = study.data.tags
    assert tags["data_md5.train-images-idx3-ubyte"] == "6bbc9ace898e44ae57da46a324031adb"
    assert tags["git_commit"] and tags["device"] == "cpu" and tags["version.torch"]
    assert tags["onnxruntime_provider"] == "CPUExecutionProvider"
    assert study.data.metrics["test_accuracy"] > 0

    sid = study.info.run_id
    configs = _runs(mlflow_client, exp.experiment_id, "configuration", f" and tags.mlflow.parentRunId = '{sid}'")
    assert sorted(r.info.run_name for r in configs) == ["blocks=1", "blocks=2"]
    assert {f.path for f in mlflow_client.list_artifacts(sid, "figures")} == {"figures/model_selection.png",
                                                                              "figures/fold_curves.png"}
    for cfg_run in configs:
        assert cfg_run.info.status == "FINISHED"
        assert [f.path for f in mlflow_client.list_artifacts(cfg_run.info.run_id, "figures")] == [
            "figures/fold_curves.png"]
        assert {"val_error_mean", "val_error_std", "train_error_mean", "rank"} <= set(cfg_run.data.metrics)
        folds = mlflow_client.search_runs([exp.experiment_id],
                                          f"tags.mlflow.parentRunId = '{cfg_run.info.run_id}'")
        assert sorted(r.info.run_name for r in folds) == ["fold 1/2", "fold 2/2"]
        for fold in folds:
            assert fold.info.status == "FINISHED"
            history = mlflow_client.get_metric_history(fold.info.run_id, "val_error")
            assert [m.step for m in history] == [1, 2]  # one point per epoch
            assert {"train_loss", "train_error", "val_loss"} <= set(fold.data.metrics)
    selected = [r for r in configs if r.data.tags["selected"] == "true"]
    assert len(selected) == 1 and selected[0].data.metrics["rank"] == 1

    finals = _runs(mlflow_client, exp.experiment_id, "final", f" and tags.mlflow.parentRunId = '{sid}'")
    assert len(finals) == 1
    final = finals[0]
    assert final.info.status == "FINISHED"
    assert final.data.tags["configuration"] == selected[0].info.run_name
    assert [m.step for m in mlflow_client.get_metric_history(final.info.run_id, "test_error")] == [1, 2]
    figures = {f.path for f in mlflow_client.list_artifacts(final.info.run_id, "figures")}
    assert figures == {"figures/model_selection.png", "figures/learning_curves.png", "figures/confusion_matrix.png",
                       "figures/misclassified.png", "figures/attention.png"}
    assert "model_card.md" in {f.path for f in mlflow_client.list_artifacts(final.info.run_id)}
    assert final.data.metrics["parity_max_abs_diff"] <= 1e-4
    # ONNX Runtime accuracy equals PyTorch's on the same weights
    assert final.data.metrics["test_accuracy"] == pytest.approx(final.data.metrics["torch_test_accuracy"], abs=0.0021)


def test_figures_are_real_pngs(mlflow_client, tmp_path):
    exp = mlflow_client.get_experiment_by_name("vitflow-smoke")
    final = _runs(mlflow_client, exp.experiment_id, "final")[0]
    local = mlflow_client.download_artifacts(final.info.run_id, "figures", str(tmp_path))
    from PIL import Image

    for name in ("model_selection.png", "learning_curves.png", "confusion_matrix.png", "misclassified.png",
                 "attention.png"):
        with Image.open(f"{local}/{name}") as image:
            assert image.format == "PNG" and image.width >= 500 and image.height >= 300


def test_model_card_is_the_version_description(mlflow_client, smoke_runs, tmp_path):
    """Each registered version's description is the model card logged on its final run, with the numbers the
    terminal summary printed."""
    for version, result in zip(("1", "2"), smoke_runs):
        mv = mlflow_client.get_model_version("vit-mnist-smoke", version)
        card = mv.description
        assert card.startswith(f"# Model card: vit-mnist-smoke version {version}\n")
        final_run = mv.tags["final_run_id"]
        path = mlflow_client.download_artifacts(final_run, "model_card.md", str(tmp_path / version))
        assert open(path, encoding="utf-8").read() == card
        assert "`train-images-idx3-ubyte` | `6bbc9ace898e44ae57da46a324031adb`" in card
        accuracy = next(l for l in result.stdout.splitlines() if l.startswith("Test accuracy (ONNX Runtime"))
        assert accuracy.split(": ", 1)[1].split()[0] in card  # e.g. 81.40%
        assert f"{100 * float(mv.tags['test_accuracy']):.2f}%" in card
        rows = [re.split(r"\s{2,}", l.replace("<- selected", "").strip()) for l in result.stdout.splitlines()
                if l[:1].isdigit() and "blocks=" in l]
        assert len(rows) == 2
        for rank, label, params, val_error, train_error in rows:  # the terminal's cells, in the card's CV table
            line = next(l for l in card.splitlines() if l.startswith(f"| {rank} | ") and label in l)
            assert f"| {params} | {val_error} | {train_error} |" in line


def test_registered_model_and_aliases(mlflow_client, smoke_runs, session_env):
    import mlflow.pyfunc

    mlflow.set_tracking_uri(session_env["MLFLOW_TRACKING_URI"])

    versions = mlflow_client.search_model_versions("name = 'vit-mnist-smoke'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    champion = mlflow_client.get_model_version_by_alias("vit-mnist-smoke", "champion")
    v1 = mlflow_client.get_model_version("vit-mnist-smoke", "1")
    v2 = mlflow_client.get_model_version("vit-mnist-smoke", "2")
    assert v1.tags["decision"] == "champion" and v1.tags["decision_reason"] == "no champion yet"
    acc1, acc2 = float(v1.tags["test_accuracy"]), float(v2.tags["test_accuracy"])
    if acc2 > acc1:
        assert str(champion.version) == "2" and v2.tags["decision"] == "champion"
    else:
        assert str(champion.version) == "1" and v2.tags["decision"] == "challenger"
        assert str(mlflow_client.get_model_version_by_alias("vit-mnist-smoke", "challenger").version) == "2"
        assert "does not beat champion v1" in v2.tags["decision_reason"]
    # The registered ONNX model loads through the registry and predicts like the exported file.
    model = mlflow.pyfunc.load_model("models:/vit-mnist-smoke@champion")
    batch = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    out = model.predict(batch)
    assert out["logits"].shape == (3, 10)
    # its requirements are stated (not inferred): pinned to what this environment runs
    import mlflow as mlflow_pkg
    import onnx

    for uri in ("models:/vit-mnist-smoke/1", f"runs:/{v1.tags['final_run_id']}/model-int8"):
        pins = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
        assert f"mlflow=={mlflow_pkg.__version__}" in pins and f"onnx=={onnx.__version__}" in pins, pins
        assert any(p.startswith("onnxruntime==") for p in pins) and any(p.startswith("numpy==") for p in pins)


def test_exported_file_is_self_contained(smoke_runs):
    first, _ = smoke_runs
    line = next(l for l in first.stdout.splitlines() if l.startswith("ONNX model:"))
    path = line.split(":", 1)[1].strip()
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]


def test_missing_data_fails_clearly_before_training(session_env, tmp_path):
    from .conftest import run_cli

    env = dict(session_env, VITFLOW_DATA_DIR=str(tmp_path / "nothing-here"))
    result = run_cli(["run", "--config", "smoke", "--set", "data.download=false"], env, timeout=300)
    assert result.returncode == 2
    ours = [line for line in result.stderr.splitlines() if line.startswith("vitflow:")]
    assert len(ours) == 1, result.stderr[-3000:]
    assert ours[0].startswith("vitflow: MNIST not found") and "nothing-here/MNIST/raw" in ours[0]
    # Prefect's log keeps the message but not a 60-line traceback above the line that says what to do
    assert "Traceback" not in result.stderr and "Encountered exception during execution" in result.stderr


def test_diverging_study_fails_cleanly(session_env, tmp_path):
    """NaN loss: the fold run ends FAILED with the cause, the study fails, no run is left RUNNING."""
    from mlflow.tracking import MlflowClient

    from .conftest import run_cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(session_env, MLFLOW_TRACKING_URI=uri)
    result = run_cli(["run", "--config", "smoke", "--set", "train.lr=1e30", "--set", "tracking.experiment=diverge"],
                     env, timeout=300)
    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines() if line.startswith("vitflow:")]
    assert len(ours) == 1 and "training loss is nan" in ours[0].lower(), result.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("diverge")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    study = [r for r in runs if r.data.tags.get("vitflow.role") == "study"][0]
    assert study.info.status == "FAILED" and "train.lr=1e+30" in study.data.tags["error"]
    failed_folds = [r for r in runs if r.data.tags.get("vitflow.role") == "fold" and r.info.status == "FAILED"]
    assert failed_folds and "lower the learning rate" in failed_folds[0].data.tags["error"]
    assert not [r for r in runs if r.data.tags.get("vitflow.role") == "final"]  # nothing was retrained


def test_batched_folds_through_the_flow_match_one_task_per_fold(session_env, mlflow_client):
    """cv.batch_folds=true (what auto does on CUDA) trains each configuration's folds as one stacked model in one task:
    the same fold runs, with the same per-epoch metrics as the first smoke run's one task per fold."""
    from .conftest import run_cli

    out = run_cli(["run", "--config", "smoke", "--set", "cv.batch_folds=true", "--set", "export.quantize=false",
                   "--set", "tracking.experiment=vitflow-smoke-batched",
                   "--set", "tracking.registered_model=vit-mnist-smoke-batched"], session_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "2 configurations (folds batched) at once" in out.stdout + out.stderr

    def fold_metrics(experiment: str) -> dict:
        exp = mlflow_client.get_experiment_by_name(experiment)
        study = _runs(mlflow_client, exp.experiment_id, "study")[-1]  # the first study of the experiment
        folds = _runs(mlflow_client, exp.experiment_id, "fold", f" and tags.study_run_id = '{study.info.run_id}'")
        return {(f.data.tags["configuration"], f.data.tags["fold_index"]): f for f in folds}

    batched, sequential = fold_metrics("vitflow-smoke-batched"), fold_metrics("vitflow-smoke")
    assert sorted(batched) == sorted(sequential) and len(batched) == 4
    for key, run in batched.items():
        assert run.info.status == "FINISHED" and run.data.tags["batched_folds"] == "2"
        for metric in ("train_loss", "val_loss", "val_error"):
            got = [m.value for m in mlflow_client.get_metric_history(run.info.run_id, metric)]
            want = [m.value for m in mlflow_client.get_metric_history(sequential[key].info.run_id, metric)]
            assert got == pytest.approx(want, abs=1e-4), (key, metric)


def test_compiled_training_through_the_flow_matches_eager(session_env, mlflow_client):
    """train.compile with fold tasks in threads: torch.compile is not thread-safe, so the folds run one at a time
    (two compiling at once failed); the compiled folds' metrics equal the first (eager) smoke run's."""
    from .conftest import run_cli

    out = run_cli(["run", "--config", "smoke", "--set", "train.compile=default", "--set", "export.quantize=false",
                   "--set", "tracking.experiment=vitflow-smoke-compiled",
                   "--set", "tracking.registered_model=vit-mnist-smoke-compiled"], session_env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "fold tasks run one at a time (torch.compile is not thread-safe)" in log
    assert "1 folds at once" in log

    def fold_metrics(experiment: str) -> dict:
        exp = mlflow_client.get_experiment_by_name(experiment)
        study = _runs(mlflow_client, exp.experiment_id, "study")[-1]
        folds = _runs(mlflow_client, exp.experiment_id, "fold", f" and tags.study_run_id = '{study.info.run_id}'")
        return {(f.data.tags["configuration"], f.data.tags["fold_index"]): f.data.metrics for f in folds}

    compiled, eager = fold_metrics("vitflow-smoke-compiled"), fold_metrics("vitflow-smoke")
    assert sorted(compiled) == sorted(eager) and len(compiled) == 4
    for key, metrics in compiled.items():
        assert metrics["val_error"] == pytest.approx(eager[key]["val_error"], abs=0.01), key
        assert metrics["train_loss"] == pytest.approx(eager[key]["train_loss"], rel=1e-3), key


def test_weight_average_through_the_flow_is_what_is_exported(session_env, mlflow_client):
    """train.ema_decay: every fold and the final run log the trained weights' figures beside the average's
    (*_raw); the ONNX file holds the average: its test loss is the final test_loss, not test_loss_raw."""
    import torch
    import torch.nn.functional as F

    from pipeline.config import load_config
    from pipeline.data import load
    from pipeline.inference import OnnxClassifier
    from pipeline.train import to_pixels

    from .conftest import run_cli

    out = run_cli(["run", "--config", "smoke", "--set", "train.ema_decay=0.9", "--set", "cv.epochs=1",
                   "--set", "export.quantize=false", "--set", "tracking.experiment=vitflow-smoke-ema",
                   "--set", "tracking.registered_model=vit-mnist-smoke-ema"], session_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    exp = mlflow_client.get_experiment_by_name("vitflow-smoke-ema")
    folds = _runs(mlflow_client, exp.experiment_id, "fold")
    assert len(folds) == 4 and all({"val_error_raw", "val_loss_raw"} <= set(f.data.metrics) for f in folds)
    final = _runs(mlflow_client, exp.experiment_id, "final")[0]
    assert final.data.params["train.ema_decay"] == "0.9"
    epochs = int(final.data.params["train.epochs"])
    assert len(mlflow_client.get_metric_history(final.info.run_id, "test_loss_raw")) == epochs
    metrics = final.data.metrics
    assert abs(metrics["test_loss"] - metrics["test_loss_raw"]) > 1e-3

    path = next(line for line in out.stdout.splitlines() if line.startswith("ONNX model:")).split(":", 1)[1].strip()
    data = load(load_config("smoke").data)
    logits = torch.from_numpy(OnnxClassifier(path, device="cpu").logits(to_pixels(data.test_images).numpy(), 1024))
    loss = F.cross_entropy(logits, data.test_labels).item()
    assert loss == pytest.approx(metrics["test_loss"], abs=1e-4)
    assert metrics["test_accuracy"] == pytest.approx(1 - metrics["test_error"], abs=1e-6)


def test_a_spent_time_budget_shortens_the_retraining_only(session_env, mlflow_client):
    """time_budget.flow_s: the retraining gets what is left of the flow's budget. Here the 1 s budget is spent
    before the retraining starts, so it trains the 2 epochs that measure its pace and stops, with the cosine
    fitted to those 2 (its learning rate at min_lr at the end); the CV is unchanged and the flow completes."""
    from .conftest import run_cli

    out = run_cli(["run", "--config", "smoke", "--set", "train.epochs=4", "--set", "cv.epochs=1",
                   "--set", "train.schedule=cosine", "--set", "train.min_lr=0.0001",
                   "--set", "time_budget.flow_s=1", "--set", "time_budget.reserve_s=0.5",
                   "--set", "export.quantize=false", "--set", "tracking.experiment=vitflow-smoke-budget",
                   "--set", "tracking.registered_model=vit-mnist-smoke-budget"], session_env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "Final training:  2 of train.epochs=4 epochs (time budget: flow 1 s, 0.5 s kept after the training)" in log
    assert "2 of 4 epochs fit the time limit of -" in log  # the retraining's own line, with its (spent) limit
    assert "it trains only the 2 epochs that measure its pace. Raise time_budget.flow_s" in log

    exp = mlflow_client.get_experiment_by_name("vitflow-smoke-budget")
    final = _runs(mlflow_client, exp.experiment_id, "final")[0]
    assert final.info.status == "FINISHED"
    assert final.data.params["epochs_planned"] == "2" and final.data.params["train.epochs"] == "4"
    assert float(final.data.params["time_limit_s"]) < 0
    assert [m.step for m in mlflow_client.get_metric_history(final.info.run_id, "test_error")] == [1, 2]
    assert final.data.metrics["lr"] == pytest.approx(1e-4)
    folds = _runs(mlflow_client, exp.experiment_id, "fold")
    assert len(folds) == 4 and all(len(mlflow_client.get_metric_history(f.info.run_id, "val_error")) == 1
                                   for f in folds)
    card = Path(mlflow_client.download_artifacts(final.info.run_id, "model_card.md")).read_text()
    assert "Final training: 2 of train.epochs=4 epochs" in card and "set by the time budget" in card


def test_reused_folds_belong_to_the_configuration_that_asks_for_them(session_env, mlflow_client):
    """A grid in another order, with another key, reuses the smoke studies' folds from the result store: each fold
    is filed under the configuration whose key it was trained under, not under its position in the grid of the
    study that trained it (that put one configuration's errors on another and selected the wrong model). A grid
    over train.seed trains each point with its own seed: the smoke runs with train.seed=0 and =1 are its points."""
    from .conftest import run_cli

    out = run_cli(["run", "--config", "smoke", "--set", "cv.grid.model.depth=[2,1]",
                   "--set", "cv.grid.train.seed=[1,0]", "--set", "export.quantize=false",
                   "--set", "tracking.experiment=vitflow-smoke-regrid",
                   "--set", "tracking.registered_model=vit-mnist-smoke-regrid"], session_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]

    def configurations(experiment: str) -> dict:
        exp = mlflow_client.get_experiment_by_name(experiment)
        runs = _runs(mlflow_client, exp.experiment_id, "configuration", " and attributes.status = 'FINISHED'")
        return {(int(r.data.params["model.depth"]), int(r.data.params["train.seed"])): r for r in runs}

    smoke = configurations("vitflow-smoke")  # the smoke_runs fixture's studies, train.seed=0 and train.seed=1
    regrid_exp = mlflow_client.get_experiment_by_name("vitflow-smoke-regrid")
    study = _runs(mlflow_client, regrid_exp.experiment_id, "study")[0]
    assert study.data.metrics["folds_reused"] == 8 and study.data.metrics["folds_trained"] == 0
    regrid = configurations("vitflow-smoke-regrid")
    assert sorted(regrid) == sorted(smoke) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for key, run in regrid.items():
        for metric in ("val_error_mean", "val_error_std", "train_loss_mean"):
            assert run.data.metrics[metric] == smoke[key].data.metrics[metric], (key, metric)
    seed0, seed1 = smoke[(2, 0)].data.metrics["val_error_mean"], smoke[(2, 1)].data.metrics["val_error_mean"]
    assert seed0 != seed1  # the two seeds trained differently: a grid over seeds is not one study counted twice
    best = min(regrid, key=lambda k: (regrid[k].data.metrics["val_error_mean"], k[0]))
    selected = [k for k, r in regrid.items() if r.data.tags["selected"] == "true"]
    assert selected == [best]
    final = _runs(mlflow_client, regrid_exp.experiment_id, "final")[0]
    assert final.data.params["model.depth"] == str(best[0]) and final.data.params["train.seed"] == str(best[1])
    folds = _runs(mlflow_client, regrid_exp.experiment_id, "fold")
    by_run = {r.info.run_id: r for r in regrid.values()}
    for fold in folds:  # each replayed fold run sits under its own configuration and says which seed trained it
        parent = by_run[fold.data.tags["mlflow.parentRunId"]]
        assert fold.data.tags["configuration"] == parent.data.tags["configuration"]
        seed = int(parent.data.params["train.seed"])
        assert fold.data.params["seed"] == str(seed + 1000 * (int(fold.data.params["fold_index"]) + 1))
