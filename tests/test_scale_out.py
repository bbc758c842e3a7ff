"""Scale-out for real, all on loopback: PostgreSQL (Debian's binaries, a throw-away cluster on a free port), an
MLflow tracking server on it, a Dask scheduler and two workers as separate processes. The smoke study runs with
``--runner dask`` (fold runs must name both workers, metrics must equal a local run's with the same seed), the
local run goes through the same server, and the PostgreSQL tables must hold what the MLflow API reports. Every
server is stopped by its own process group."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO, run_cli

pytestmark = pytest.mark.slow

BIN = REPO / ".venv" / "bin"
STUDY = ["run", "--config", "smoke", "--set", "export.quantize=false"]
LOCAL = [*STUDY, "--set", "tracking.experiment=scale-local", "--set", "tracking.registered_model=vit-mnist-local"]
FOLD_METRICS = ("train_loss", "train_error", "val_loss", "val_error")
WORKERS = ("w1", "w2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """A server in its own process group (so that stopping it stops its children), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)


def _stop(*procs: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """``sig`` to each process group at once, then SIGKILL to any group still there after ``timeout``. A group
    can outlive its leader: a ``dask worker``'s nanny exits while the worker process it started is still shutting
    down, so the whole group is waited for, not only the process that was launched."""
    for s in (sig, signal.SIGKILL):
        for proc in procs:
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        while any(_alive(proc) for proc in procs) and time.time() < deadline:
            time.sleep(0.1)
        if not any(_alive(proc) for proc in procs):
            break
    for proc in procs:
        proc.wait(timeout=10)


def _alive(proc: subprocess.Popen) -> bool:
    try:
        os.killpg(proc.pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_until(check, proc: subprocess.Popen, log: Path, what: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited at start:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what} not ready after {seconds:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL server binaries (newest major version), or $VITFLOW_PG_BIN."""
    candidates = [os.environ.get("VITFLOW_PG_BIN", "")] + sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
        else 0, reverse=True)
    for path in candidates:
        if path and (Path(path) / "initdb").is_file() and (Path(path) / "postgres").is_file():
            return Path(path)
    return None


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port> with a database ``mlflow``; yields its URI, or
    None when the server binaries are not installed (.ci/run installs them)."""
    import psycopg

    pg_bin = postgres_bin()
    if pg_bin is None:
        yield None
        return
    # initdb refuses to run as root: as root, the cluster belongs to the 'postgres' (else 'nobody') account.
    # tempfile's directory (mode 0700, /tmp) rather than pytest's, whose parents that account cannot enter.
    base = Path(tempfile.mkdtemp(prefix="vitflow-pg-"))
    as_user: dict = {}
    if os.geteuid() == 0:
        account = next((name for name in ("postgres", "nobody") if _has_user(name)), None)
        assert account, "running as root and neither a 'postgres' nor a 'nobody' account exists for PostgreSQL"
        entry = pwd.getpwnam(account)
        os.chown(base, entry.pw_uid, entry.pw_gid)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    data, log = base / "data", tmp_path_factory.mktemp("postgres-log") / "postgres.log"
    init = subprocess.run([str(pg_bin / "initdb"), "-D", str(data), "-U", "vitflow", "--auth=trust", "-E", "UTF8",
                           "--no-sync", "--no-instructions"], cwd=base, capture_output=True, text=True, timeout=120,
                          check=False, **as_user)
    assert init.returncode == 0, init.stdout + init.stderr
    port = _free_port()
    proc = _launch([str(pg_bin / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(base),
                    "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                   log, cwd=base, **as_user)
    try:
        def create_db() -> bool:
            with psycopg.connect(host="127.0.0.1", port=port, user="vitflow", dbname="postgres", connect_timeout=2,
                                 autocommit=True) as conn:
                conn.execute("CREATE DATABASE mlflow")
            return True

        _wait_until(create_db, proc, log, "postgres", seconds=60)
        yield {"uri": f"postgresql+psycopg://vitflow@127.0.0.1:{port}/mlflow", "port": port}
    finally:
        _stop(proc, sig=signal.SIGINT)  # PostgreSQL's fast shutdown
        assert not _alive(proc)
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """``mlflow server`` on a free loopback port: backend store PostgreSQL (SQLite when PostgreSQL is not
    installed), artifacts served from a temporary folder."""
    base = tmp_path_factory.mktemp("mlflow-server")
    backend = postgres["uri"] if postgres else f"sqlite:///{base / 'mlflow.db'}"
    port, log = _free_port(), base / "mlflow.log"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PATH=f"{BIN}:{os.environ['PATH']}")
    proc = _launch([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--backend-store-uri", backend, "--artifacts-destination", str(base / "artifacts"),
                    "--serve-artifacts"], log, env=env, cwd=base)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, proc, log,
                    "mlflow server", seconds=120)
        yield url
    finally:
        _stop(proc)
        assert not _alive(proc)


@pytest.fixture(scope="module")
def dask_processes(tmp_path_factory, session_env):
    """``dask scheduler`` and two ``dask worker`` processes (one thread each, named w1 and w2) on loopback, only
    launched here (they import torch, Prefect and MLflow at start: the servers come up meanwhile). The workers
    have no VITFLOW_DATA_DIR: MNIST reaches them through the study's (shared) data root."""
    base = tmp_path_factory.mktemp("dask")
    env = {k: v for k, v in session_env.items() if k != "VITFLOW_DATA_DIR"}
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = {"scheduler": _launch([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--dashboard-address", "127.0.0.1:0", "--preload", "flows.dask_preload"],
                                  base / "scheduler.log", env=env, cwd=REPO)}
    for name in WORKERS:
        procs[name] = _launch([str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1", "--name",
                               name, "--host", "127.0.0.1", "--no-dashboard", "--preload", "flows.dask_preload",
                               "--local-directory", str(base / name)], base / f"{name}.log", env=env, cwd=REPO)
    try:
        yield {"address": address, "port": port, "procs": procs, "logs": base}
    finally:
        _stop(*procs.values())
        assert not [name for name, proc in procs.items() if _alive(proc)], "a Dask process outlived the test"


@pytest.fixture(scope="module")
def dask_cluster(dask_processes):
    """The cluster once the scheduler listens and both workers have joined, with a client for the checks."""
    from distributed import Client

    port, logs = dask_processes["port"], dask_processes["logs"]
    _wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True,
                dask_processes["procs"]["scheduler"], logs / "scheduler.log", "dask scheduler")
    client = Client(dask_processes["address"], timeout="30s")
    try:
        client.wait_for_workers(len(WORKERS), timeout=180)
        yield {**dask_processes, "client": client}
    finally:
        client.close()


def _env(session_env, mlflow_url: str, tmp_path_factory, name: str) -> dict[str, str]:
    """Own Prefect home (the two studies run at once) and result store; a patient temporary Prefect server (it
    starts while the Dask processes import on the same two cores)."""
    home = tmp_path_factory.mktemp(f"{name}-study")
    return dict(session_env, MLFLOW_TRACKING_URI=mlflow_url, VITFLOW_RESULTS_DIR=str(home / "results"),
                PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")


@pytest.fixture(scope="module")
def studies(dask_processes, mlflow_server, session_env, tmp_path_factory, request):
    """The smoke study twice through the MLflow server: in local threads (started first, in the background,
    while the Dask workers finish starting) and with --runner dask. Returns both CLI results and wall times."""
    base = tmp_path_factory.mktemp("local-study")
    started = time.perf_counter()
    with open(base / "stdout", "w+") as out, open(base / "stderr", "w+") as err:  # files: no pipe to fill up
        local = subprocess.Popen([sys.executable, "-m", "flows.cli", *LOCAL], cwd=REPO, stdout=out, stderr=err,
                                 text=True, env=_env(session_env, mlflow_server, tmp_path_factory, "local"))
        try:
            cluster = request.getfixturevalue("dask_cluster")
            dask_started = time.perf_counter()
            dask = run_cli([*STUDY, "--runner", "dask", "--dask-address", cluster["address"]],
                           _env(session_env, mlflow_server, tmp_path_factory, "dask"))
            dask_seconds = time.perf_counter() - dask_started
            local.wait(timeout=600)
        finally:
            if local.poll() is None:
                local.kill()
                local.wait()
        out.seek(0), err.seek(0)
        local_result = subprocess.CompletedProcess(local.args, local.returncode, out.read(), err.read())
    assert dask.returncode == 0, (dask.stdout[-3000:] + dask.stderr[-5000:] +
                                  "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-2000:]
                                          for p in sorted(cluster["logs"].glob("*.log"))))
    assert local_result.returncode == 0, local_result.stdout[-3000:] + local_result.stderr[-5000:]
    total = time.perf_counter() - started
    print(f"scale-out studies: dask CLI {dask_seconds:.1f} s, both studies {total:.1f} s")  # shown with -s
    return {"dask": dask, "local": local_result, "dask_s": dask_seconds, "total_s": total}


def _study_runs(client, experiment: str) -> tuple:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    studies = [r for r in runs if r.data.tags.get("vitflow.role") == "study"]
    assert len(studies) == 1, [r.info.run_name for r in studies]
    folds = {(r.data.tags["configuration"], int(r.data.tags["fold_index"])): r for r in runs
             if r.data.tags.get("vitflow.role") == "fold"}
    return exp, studies[0], folds, runs


def test_dask_study_runs_folds_on_both_workers(studies, dask_cluster, mlflow_server):
    from mlflow.tracking import MlflowClient

    result = studies["dask"]
    assert f"Fold tasks:      Dask at {dask_cluster['address']}, 2 worker(s): w1, w2" in result.stdout
    client = MlflowClient(mlflow_server)
    _, study, folds, runs = _study_runs(client, "vitflow-smoke")
    assert study.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in runs)
    assert study.data.tags["runner"] == "dask" and study.data.tags["dask.workers"] == "w1,w2"
    assert study.data.tags["dask.scheduler"] == dask_cluster["address"]
    assert sorted(folds) == [("blocks=1", 0), ("blocks=1", 1), ("blocks=2", 0), ("blocks=2", 1)]
    addresses = {str(w["name"]): addr for addr, w in dask_cluster["client"].scheduler_info()["workers"].items()}
    for fold in folds.values():
        tags = fold.data.tags
        assert tags["dask.worker"] in WORKERS and tags["dask.worker_address"] == addresses[tags["dask.worker"]]
        assert tags["host"] == socket.gethostname()
        assert [m.step for m in client.get_metric_history(fold.info.run_id, "val_error")] == [1, 2]
    assert {f.data.tags["dask.worker"] for f in folds.values()} == set(WORKERS)  # both workers trained folds
    # the rest of the study ran in the flow's process and reached the registry through the server
    assert client.get_model_version_by_alias("vit-mnist-smoke", "champion").version == "1"


def test_dask_metrics_equal_local_run(studies, mlflow_server):
    """Same seed on CPU: every fold's per-epoch metrics, and the retrained model's test accuracy, are the same
    whether the folds trained on Dask workers or in local threads."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    _, dask_run, dask_folds, _ = _study_runs(client, "vitflow-smoke")
    _, local_run, local_folds, _ = _study_runs(client, "scale-local")
    assert local_run.data.tags["runner"] == "local" and "dask.worker" not in next(iter(local_folds.values())).data.tags
    assert sorted(dask_folds) == sorted(local_folds)
    for key, fold in dask_folds.items():
        for metric in FOLD_METRICS:
            ours = [m.value for m in client.get_metric_history(fold.info.run_id, metric)]
            theirs = [m.value for m in client.get_metric_history(local_folds[key].info.run_id, metric)]
            assert len(ours) == 2 and ours == pytest.approx(theirs, abs=1e-6), (key, metric, ours, theirs)
    assert dask_run.data.metrics["test_accuracy"] == local_run.data.metrics["test_accuracy"]
    assert dask_run.data.metrics["best_val_error_mean"] == pytest.approx(local_run.data.metrics["best_val_error_mean"],
                                                                         abs=1e-9)


def test_postgres_backend_holds_the_runs(postgres, mlflow_server, studies):
    """The tracking server's backend store is PostgreSQL: its tables hold the runs, metrics and registered
    models that the MLflow API reports."""
    if postgres is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin or $VITFLOW_PG_BIN); "
                    "apt-get install postgresql (.ci/run does)")
    import psycopg
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    with (psycopg.connect(host="127.0.0.1", port=postgres["port"], user="vitflow", dbname="mlflow") as conn,
          conn.cursor() as cur):
        for experiment in ("vitflow-smoke", "scale-local"):
            exp, _, folds, runs = _study_runs(client, experiment)
            cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s AND status = 'FINISHED'",
                        (int(exp.experiment_id),))
            assert cur.fetchone()[0] == len(runs) == 8  # study, 2 configurations, 4 folds, final
            fold = next(iter(folds.values()))
            cur.execute("SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'val_error' ORDER BY step",
                        (fold.info.run_id,))
            assert [(s, v) for s, v in cur.fetchall()] == [
                (m.step, m.value) for m in sorted(client.get_metric_history(fold.info.run_id, "val_error"),
                                                  key=lambda m: m.step)]
        cur.execute("SELECT name, alias, version FROM registered_model_aliases ORDER BY name")
        assert cur.fetchall() == [("vit-mnist-local", "champion", 1), ("vit-mnist-smoke", "champion", 1)]


def test_stop_signal_reaches_a_worker(dask_cluster):
    """A failing or interrupted study stops folds on other machines: a task polling the study's ClusterStop on a
    worker sees it set by this process within about a second."""
    from flows.dask_runner import ClusterStop

    client = dask_cluster["client"]
    stop = ClusterStop(f"vitflow-stop-test-{os.getpid()}", client)

    def wait_for_stop(signal_: ClusterStop) -> float:
        begun = time.monotonic()
        while not signal_.is_set():
            if time.monotonic() - begun > 60:
                return -1.0
            time.sleep(0.05)
        return time.monotonic() - begun

    future = client.submit(wait_for_stop, stop, pure=False)
    time.sleep(2)
    assert not future.done()
    set_at = time.monotonic()
    stop.set()
    waited = future.result(timeout=30)
    assert waited > 0 and time.monotonic() - set_at < 5


def test_dask_refuses_a_sqlite_tracking_store(session_env):
    started = time.perf_counter()
    result = run_cli([*STUDY, "--runner", "dask"], session_env, timeout=120)  # session_env: SQLite
    assert result.returncode == 2 and time.perf_counter() - started < 30
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("vitflow: --runner dask needs an MLflow tracking server")
    assert "sqlite:///" in line and "make serve" in line and "MLFLOW_TRACKING_URI=http://" in line


def test_unreachable_dask_address_fails_fast(session_env):
    port = _free_port()  # nothing listens there
    env = dict(session_env, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{_free_port()}")
    started = time.perf_counter()
    result = run_cli([*STUDY, "--runner", "dask", "--dask-address", f"127.0.0.1:{port}"], env, timeout=120)
    assert result.returncode == 2 and time.perf_counter() - started < 30, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"vitflow: cannot reach the Dask scheduler at tcp://127.0.0.1:{port}")
    assert "dask scheduler" in line and "dask worker" in line
