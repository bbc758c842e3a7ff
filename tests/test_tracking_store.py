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
