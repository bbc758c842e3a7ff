"""Studies started at the same moment against a new SQLite MLflow store: each process's first opening of the store
would create its schema (MLflow's migrations); pipeline.tracking serializes that with a lock file beside the
database, so every process gets the store and its experiment."""

from __future__ import annotations

import subprocess
import sys
import time

from .conftest import REPO

OPEN = """
import sys, time
from pipeline.tracking import Tracker
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all processes open the store at the same moment
tracker = Tracker(sys.argv[1], sys.argv[3])
run = tracker.start_run("probe")
tracker.end_run(run)
print(tracker.experiment_id)
"""


def test_processes_opening_a_new_sqlite_store_at_once_all_get_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    (tmp_path / "new").mkdir()
    at = time.time() + 8  # time for the interpreters to import MLflow first
    procs = [subprocess.Popen([sys.executable, "-c", OPEN, uri, str(at), f"experiment-{i}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), "\n".join(err[-2000:] for rc, _, err in results if rc)
    assert len({out.strip() for _, out, _ in results}) == 3  # three experiments in one store

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    names = {e.name for e in client.search_experiments()}
    assert {"experiment-0", "experiment-1", "experiment-2"} <= names
    assert (tmp_path / "new" / "mlflow.db.lock").exists()


def test_a_store_whose_artifacts_a_server_proxies(tmp_path, mnist):
    """A SQLite store that an MLflow server with proxied artifacts wrote into (``mlflow/server.sh`` before it gave
    loopback experiments plain-file locations): its experiments say ``mlflow-artifacts:/N``, which MLflow cannot
    reach through the SQLite file. A study into such an experiment stops before any work with the fix; a model
    registered there is read from the server's artifacts folder beside the database."""
    import os
    import urllib.request

    import mlflow
    import numpy as np
    import pytest
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.inference import OnnxClassifier
    from pipeline.tracking import Tracker
    from pipeline.train import to_pixels

    from ._consume import QUICK_TRAIN, mlflow_store, quick_model_config, register_onnx, train_and_export
    from .test_scale_out import BIN, _alive, _free_port, _launch, _stop, _wait_until

    store = tmp_path / "mlflow"
    store.mkdir()
    onnx_path = train_and_export(mnist, tmp_path / "vit.onnx", quick_model_config(), QUICK_TRAIN, images=4000)
    port, log = _free_port(), tmp_path / "server.log"
    proc = _launch([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                    "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts"], log,
                   env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    sample = to_pixels(mnist.test_images[:16]).numpy()
    try:
        _wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, proc, log,
                    "mlflow server", seconds=120)
        MlflowClient(url).create_experiment("served")  # where the server puts it: mlflow-artifacts:/1
        with mlflow_store(tmp_path):  # the global URI is put back afterwards
            mlflow.set_tracking_uri(url)  # register_onnx logs through MLflow's fluent API
            register_onnx(url, store / "unused", onnx_path, "proxied", sample, experiment="served")
        served = MlflowClient(url).get_experiment_by_name("served")
        assert served.artifact_location.startswith("mlflow-artifacts:/")
    finally:
        _stop(proc)
        assert not _alive(proc)

    sqlite = f"sqlite:///{store / 'mlflow.db'}"
    clf = OnnxClassifier("models:/proxied@champion", tracking_uri=sqlite)
    assert (clf.source.name, clf.source.version) == ("proxied", "1")
    np.testing.assert_allclose(clf.logits(sample), OnnxClassifier(onnx_path).logits(sample), atol=1e-6)
    with mlflow_store(tmp_path):  # Tracker sets the process's global URI: put it back afterwards
        with pytest.raises(MlflowException, match=r"experiment 'served' in sqlite:///.* keeps its artifacts behind "
                                                  r"an MLflow server \(mlflow-artifacts:/1\).*tracking.experiment"):
            Tracker(sqlite, "served")
        tracker = Tracker(sqlite, "elsewhere")  # another experiment of the same store is fine
        run_id = tracker.start_run("probe")
        tracker.log_text(run_id, "a plain file", "probe.txt")
        tracker.end_run(run_id)
    assert (store / "artifacts").is_dir() and list((store / "artifacts").rglob("probe.txt"))


def test_champion_and_challenger_compare_accuracies_on_the_same_test_images_only(tmp_path):
    """promote() moves @champion only between versions measured on the same test images: a higher accuracy on a
    500-image subset, or on another subset seed, does not take the alias from a version measured on all 10,000
    (it becomes the challenger, and the reason says why and how to compare them). A version registered before the
    ``test_set`` tag existed is read through its study run's parameters."""
    from mlflow.tracking import MlflowClient

    from pipeline.data import RAW_MD5, test_set_id
    from pipeline.tracking import promote

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    md5 = RAW_MD5["t10k-images-idx3-ubyte"]
    full, small, other_seed = (test_set_id(None, 0, md5), test_set_id(500, 0, md5), test_set_id(500, 1, md5))
    assert len({full, small, other_seed, test_set_id(10_000, 3, md5)}) == 3  # 10,000 of 10,000 is the full set
    client.create_registered_model("m")

    def version(accuracy: float, test_set: str) -> dict:
        v = client.create_model_version("m", source=(tmp_path / "model").as_uri()).version
        client.set_model_version_tag("m", v, "test_accuracy", str(accuracy))  # as pipeline.study.register does
        return promote(client, "m", v, accuracy, 0.0, test_set)

    assert version(0.95, full)["alias"] == "champion"
    lucky = version(0.99, small)
    assert lucky["alias"] == "challenger" and lucky["reason"].startswith("not compared: test accuracy 0.9900 is on")
    assert "500 images, subset_seed 0" in lucky["reason"] and "all 10,000" in lucky["reason"]
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    assert version(0.96, full)["alias"] == "champion"  # same test set, better: promoted as before
    assert client.get_model_version("m", "3").tags["test_set"] == full
    assert version(0.97, small)["alias"] == "challenger"

    # A champion from before the tag: its study run's parameters say what it was measured on.
    exp = client.create_experiment("legacy")
    study = client.create_run(exp)
    for key, value in (("data.test_subset", "500"), ("data.subset_seed", "1")):
        client.log_param(study.info.run_id, key, value)
    client.set_tag(study.info.run_id, "data_md5.t10k-images-idx3-ubyte", md5)
    client.create_registered_model("old")
    old = client.create_model_version("old", source=(tmp_path / "model").as_uri()).version
    for key, value in (("test_accuracy", "0.9"), ("study_run_id", study.info.run_id)):
        client.set_model_version_tag("old", old, key, value)
    client.set_registered_model_alias("old", "champion", old)
    v2 = client.create_model_version("old", source=(tmp_path / "model").as_uri()).version
    assert promote(client, "old", v2, 0.95, 0.0, small)["alias"] == "challenger"  # subset seed 0 against 1
    new = client.create_model_version("old", source=(tmp_path / "model").as_uri()).version
    assert promote(client, "old", new, 0.95, 0.0, other_seed)["alias"] == "champion"


def test_a_tracking_server_that_does_not_answer_stops_the_study_at_once(session_env, tmp_path):
    """MLFLOW_TRACKING_URI naming a server that is down: one line naming it and the fix, exit 2, before any work
    (MLflow's client retried for ~4 minutes, then the study failed with tracebacks). A deployment's flow run gets
    the same error from the Tracker."""
    import socket

    import pytest

    from pipeline.config import TrackingServerDown
    from pipeline.tracking import Tracker

    with socket.socket() as s:  # a free port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", "smoke"], cwd=REPO,
                         env=dict(session_env, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip() == (
        f"vitflow: the MLflow tracking server at {uri} does not answer ([Errno 111] Connection refused); start it "
        f"(`make serve`, or `mlflow/server.sh` for the tracking server alone), or unset MLFLOW_TRACKING_URI to log "
        f"to the local store mlflow/mlflow.db")
    with pytest.raises(TrackingServerDown, match="does not answer"):
        Tracker(uri, "anything")


def test_a_version_its_study_did_not_promote_is_marked_by_the_study_that_resumes_it(tmp_path):
    """A study killed between registering its model and the champion/challenger decision leaves a version with
    its evaluation tags but no decision and no alias; the study that resumes it tags that version decision=none
    with the reason (other studies' versions are left as they are)."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from pipeline.study import close_unpromoted_versions

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    source = (tmp_path / "model").as_uri()
    decided = client.create_model_version("m", source, tags={"study_run_id": "crashed", "decision": "champion"})
    orphan = client.create_model_version("m", source, tags={"study_run_id": "crashed", "test_accuracy": "0.9"})
    other = client.create_model_version("m", source, tags={"study_run_id": "another"})
    client.create_registered_model("m-renamed")  # the crashed study's own model name, whatever this study's is
    renamed = client.create_model_version("m-renamed", source, tags={"study_run_id": "crashed"})
    study = SimpleNamespace(cfg=SimpleNamespace(tracking=SimpleNamespace(registered_model="m")),
                            tracker=SimpleNamespace(client=client), run_id="resumer")
    assert sorted(close_unpromoted_versions(study, "crashed", "study resumer took over")) == [
        f"m-renamed/{renamed.version}", f"m/{orphan.version}"]
    tags = client.get_model_version("m", orphan.version).tags
    assert tags["decision"] == "none" and "study resumer took over" in tags["decision_reason"]
    assert client.get_model_version("m", decided.version).tags["decision"] == "champion"
    assert "decision" not in client.get_model_version("m", other.version).tags
    assert close_unpromoted_versions(study, "nobody", "study resumer took over") == []


def test_a_study_on_another_machine_is_judged_by_its_heartbeat(tmp_path):
    """A study RUNNING on another machine cannot be checked by its process: it beats (tag ``heartbeat``) while it
    runs. With a recent beat it is left alone; ten beats missed, it is closed by the next study in the experiment
    like one whose process died here. A run from another machine without a heartbeat (an older version's) is left
    alone; this machine's runs are judged by their process."""
    from types import SimpleNamespace

    from pipeline.study import ROLE, find_abandoned_studies
    from pipeline.tracking import HEARTBEAT_STALE_S, Heartbeat, Tracker, process_identity, run_process_gone

    from ._consume import mlflow_store

    with mlflow_store(tmp_path) as uri:
        tracker = Tracker(uri, "heartbeat")
        now = time.time()
        elsewhere = "another-host:4242:123:boot-there"
        runs = {name: tracker.start_run(name, tags={ROLE: "study", **tags}) for name, tags in {
            "remote-beating": {"process": elsewhere, "heartbeat": str(int(now - 30))},
            "remote-silent": {"process": elsewhere, "heartbeat": str(int(now - HEARTBEAT_STALE_S - 60))},
            "remote-old-version": {"process": elsewhere},
            "here-alive": {"process": process_identity()},
            "here-dead": {"process": f"{process_identity().split(':')[0]}:999999999:1:x"},
        }.items()}
        study = SimpleNamespace(tracker=tracker)
        assert sorted(find_abandoned_studies(study)) == sorted([runs["remote-silent"], runs["here-dead"]])
        assert find_abandoned_studies(study, exclude=runs["here-dead"]) == [runs["remote-silent"]]

        beat = Heartbeat(tracker, runs["remote-old-version"], every=0.05)
        try:
            deadline = time.time() + 30
            while "heartbeat" not in tracker.client.get_run(runs["remote-old-version"]).data.tags:
                assert time.time() < deadline, "no heartbeat written"
                time.sleep(0.05)
        finally:
            beat.stop()
        tags = tracker.client.get_run(runs["remote-old-version"]).data.tags
        assert abs(float(tags["heartbeat"]) - time.time()) < 30
        assert not run_process_gone(tags)
        assert run_process_gone(tags, now=time.time() + HEARTBEAT_STALE_S + 60)
        assert not beat._thread.is_alive()  # stopped: no thread left writing
