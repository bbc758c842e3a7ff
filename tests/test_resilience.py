"""Fault injection with real processes and stores: SIGKILL during cross-validation then resume, a damaged record in
the result store, SIGTERM, a Ctrl-C (SIGINT to the whole process group), SIGKILL of the study alone (its temporary
Prefect API server must not outlive it), and concurrent fold tasks against SQLite without losing a metric point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

# Big enough that a fold takes seconds (so a kill lands mid-CV), small enough for CI.
STUDY = ["run", "--config", "smoke", "--set", "data.train_subset=8000", "--set", "train.epochs=4",
         "--set", "tracking.experiment=resilience"]
METRICS = ("train_loss", "train_error", "val_loss", "val_error", "epoch_seconds")


def _env(session_env, tmp_path, name):
    return dict(session_env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / name}.db",
                VITFLOW_RESULTS_DIR=str(tmp_path / f"{name}-results"))


def _start(env, *extra):
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *STUDY, *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _client(env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def _runs(env, where=""):
    client = _client(env)
    exp = client.get_experiment_by_name("resilience")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=where, max_results=1000)


def _wait_for(predicate, proc, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the study ended before the fault could be injected:\n{proc.stdout.read()[-3000:]}")
        try:
            if predicate():
                return
        except Exception:  # the store may not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the study to reach the injection point")


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _start_training(env):
    """A study started and waited for until a fold is training (a running fold run with metrics)."""
    proc = _start(env)
    running_with_metrics = "tags.`vitflow.role` = 'fold' and attributes.status = 'RUNNING'"
    _wait_for(lambda: any(r.data.metrics for r in _runs(env, running_with_metrics)), proc)
    return proc


def _signal_and_wait(proc, send, timeout):
    """``send(proc)``, then the study's output and the seconds it took to end (its group is killed after)."""
    sent = time.time()
    send(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    return out, time.time() - sent


def _study(env, extra_where=""):
    runs = _runs(env, "tags.`vitflow.role` = 'study'" + extra_where)
    return sorted(runs, key=lambda r: r.info.start_time)


@pytest.fixture(scope="module")
def uninterrupted(session_env, tmp_path_factory):
    """The reference: the same study, uninterrupted, all four fold tasks at once."""
    env = _env(session_env, tmp_path_factory.mktemp("reference"), "reference")
    proc = _start(env, "--set", "cv.concurrency=4", "--fresh")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return env


def test_concurrent_fold_tasks_lose_no_metric_point(uninterrupted):
    folds = _runs(uninterrupted, "tags.`vitflow.role` = 'fold'")
    assert len(folds) == 4 and all(r.info.status == "FINISHED" for r in folds)
    client = _client(uninterrupted)
    for run in folds:
        for metric in METRICS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert steps == [1, 2, 3, 4], (run.info.run_name, metric, steps)
    study = _study(uninterrupted)[0]
    assert study.data.metrics["folds_trained"] == 4 and study.data.metrics["folds_reused"] == 0


def _stored_folds(env) -> int:
    """How many fold results the study's result store holds intact, read as Prefect reads them when it looks a
    fold up (a SIGKILL may land while Prefect writes one: such a record is unreadable, and a re-run must treat it as
    missing and train the fold again)."""
    from prefect.results import ResultRecord

    count = 0
    for path in Path(env["VITFLOW_RESULTS_DIR"]).glob("*"):
        try:
            count += "fold_index" in ResultRecord.deserialize(path.read_bytes()).result
        except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
            pass
    return count


def test_sigkill_during_cv_then_resume(session_env, tmp_path, uninterrupted):
    env = _env(session_env, tmp_path, "crash")
    proc = _start(env)
    # A fold's MLflow run is FINISHED a moment before Prefect stores the task's result; what a re-run can reuse is
    # what the result store holds when the kill lands, so that is what the test waits for and counts.
    _wait_for(lambda: _stored_folds(env) >= 1, proc)
    _kill_group(proc)  # no chance to clean up: runs stay RUNNING
    crashed = _study(env)
    assert len(crashed) == 1 and crashed[0].info.status == "RUNNING"
    done_before = _stored_folds(env)
    assert 1 <= done_before < 4

    rerun = subprocess.run([sys.executable, "-m", "flows.cli", *STUDY], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{4 - done_before} trained, {done_before} reused from an earlier run" in rerun.stdout, rerun.stdout[-3000:]
    resumed = _study(env)[-1]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from"] == crashed[0].info.run_id
    assert resumed.data.metrics["folds_reused"] == done_before
    assert resumed.data.metrics["folds_trained"] == 4 - done_before
    assert not _runs(env, "attributes.status = 'RUNNING'")  # the cleanup closed what the kill left behind
    assert _client(env).get_run(crashed[0].info.run_id).info.status == "KILLED"
    # The resumed study's tree is complete: every fold has a run under its configuration.
    folds = _runs(env, f"tags.study_run_id = '{resumed.info.run_id}' and tags.`vitflow.role` = 'fold'")
    assert len(folds) == 4 and sum("cached_from" in r.data.tags for r in folds) == done_before

    reference = _study(uninterrupted)[0]
    assert resumed.data.metrics["test_accuracy"] == reference.data.metrics["test_accuracy"]
    assert resumed.data.metrics["best_val_error_mean"] == reference.data.metrics["best_val_error_mean"]


def test_the_same_study_started_twice_leaves_the_live_one_alone(session_env, tmp_path):
    """A schedule and a manual run of the same study at once: the second is no resume of the first, which is still
    running (its process is alive). It neither closes the first one's runs nor claims to resume from it; it notes
    the concurrent study, and both finish."""
    env = _env(session_env, tmp_path, "twice")
    first = _start_training(env)
    try:
        second = subprocess.run([sys.executable, "-m", "flows.cli", *STUDY], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=900)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        out, _ = first.communicate(timeout=900)
        assert first.returncode == 0, out[-4000:]
    finally:
        if first.poll() is None:
            _kill_group(first)
    studies = _study(env)
    assert len(studies) == 2 and all(s.info.status == "FINISHED" for s in studies)
    older, newer = studies
    assert "resumed_from" not in newer.data.tags
    assert newer.data.tags["concurrent_with"] == older.info.run_id
    assert not _runs(env, "tags.closed_by != ''")  # nothing of the live study was closed as crashed
    assert not _runs(env, "attributes.status != 'FINISHED'")


def test_a_killed_study_is_closed_by_the_next_study_of_another_configuration(session_env, tmp_path):
    """A study killed (SIGKILL) and never run again does not stay RUNNING in MLflow: the next study in the same
    experiment, whatever its configuration, finds that its process is gone and closes its runs as KILLED."""
    env = _env(session_env, tmp_path, "abandoned")
    killed = _start_training(env)
    _kill_group(killed)
    [abandoned] = _study(env)
    assert abandoned.info.status == "RUNNING"
    left_running = {r.info.run_id for r in _runs(env, "attributes.status = 'RUNNING'")}
    assert len(left_running) >= 3  # the study, a configuration, a fold at least

    other = subprocess.run([sys.executable, "-m", "flows.cli", *STUDY, "--set", "data.train_subset=2000",
                            "--set", "train.epochs=1", "--set", "export.quantize=false"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    assert f"closed 1 study run(s) left RUNNING by a process that is gone: {abandoned.info.run_id}" in other.stderr
    newer = _study(env)[-1]
    assert "resumed_from" not in newer.data.tags  # another configuration: nothing to resume
    assert newer.data.tags["closed_abandoned"] == abandoned.info.run_id
    assert not _runs(env, "attributes.status = 'RUNNING'")
    for run_id in left_running:
        run = _client(env).get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["closed_by"] == newer.info.run_id, run.data.tags


def test_a_damaged_result_record_is_trained_again(session_env, tmp_path, uninterrupted):
    """A record cut short (a kill while Prefect wrote it, a full disk) or emptied is a cache miss, not a crash:
    the study trains that fold again and reuses the others."""
    env = _env(session_env, tmp_path, "damaged")
    first = subprocess.run([sys.executable, "-m", "flows.cli", *STUDY], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    records = sorted(Path(env["VITFLOW_RESULTS_DIR"]).glob("*"))
    assert len(records) == 4 and _stored_folds(env) == 4
    records[0].write_bytes(records[0].read_bytes()[:200])  # truncated mid-JSON
    records[1].write_bytes(b"")  # created, never written
    assert _stored_folds(env) == 2

    rerun = subprocess.run([sys.executable, "-m", "flows.cli", *STUDY], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    study = _study(env)[-1]
    assert study.info.status == "FINISHED"
    assert (study.data.metrics["folds_reused"], study.data.metrics["folds_trained"]) == (2, 2)
    assert _stored_folds(env) == 4  # the retrained folds' records were written again, whole
    reference = _study(uninterrupted)[0]
    assert study.data.metrics["test_accuracy"] == reference.data.metrics["test_accuracy"]


def test_sigterm_ends_runs_killed_promptly(session_env, tmp_path):
    env = _env(session_env, tmp_path, "term")
    proc = _start_training(env)
    out, seconds = _signal_and_wait(proc, lambda p: os.kill(p.pid, signal.SIGTERM), timeout=60)
    assert seconds < 30, "SIGTERM took too long to stop the study"
    assert proc.returncode == 143, out[-3000:]  # 128 + SIGTERM
    assert "interrupted (SIGTERM); open MLflow runs were marked KILLED" in out
    runs = _runs(env)
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    study = _study(env)[0]
    assert study.info.status == "KILLED"
    assert [r for r in runs if r.data.tags.get("vitflow.role") == "fold" and r.info.status == "KILLED"]


def _api_servers(parent: int | None = None) -> list[int]:
    """PIDs of Prefect temporary API servers (uvicorn serving prefect.server.api.server:create_app), of ``parent``'s
    children only when given; read from /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if b"prefect.server.api.server:create_app" in cmdline and parent in (None, ppid):
            found.append(int(pid))
    return found


def _gone(pids: list[int], seconds: float = 15) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not [pid for pid in pids if pid in _api_servers()]:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_to_the_process_group_stops_the_study_promptly(session_env, tmp_path):
    """A terminal's Ctrl-C sends SIGINT to every process of the foreground group. Prefect's temporary API server
    must not die with the study: the study still reports to it, then exits (it took ~2.5 minutes and ended with a
    ConnectError while the server shared the group)."""
    env = _env(session_env, tmp_path, "ctrl-c")
    proc = _start_training(env)
    servers = _api_servers(proc.pid)
    assert len(servers) == 1, servers
    out, seconds = _signal_and_wait(proc, lambda p: os.killpg(p.pid, signal.SIGINT), timeout=120)
    assert seconds < 30, f"Ctrl-C took {seconds:.0f} s to stop the study:\n{out[-3000:]}"
    assert proc.returncode == 130, out[-3000:]  # 128 + SIGINT
    assert "interrupted (SIGINT); open MLflow runs were marked KILLED" in out and "ConnectError" not in out
    assert _gone(servers), "the temporary Prefect API server outlived the study"
    runs = _runs(env)
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert _study(env)[0].info.status == "KILLED"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_study_alone_takes_its_api_server_along(session_env, tmp_path):
    env = _env(session_env, tmp_path, "orphan")
    proc = _start(env)
    _wait_for(lambda: _api_servers(proc.pid), proc)
    servers = _api_servers(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the study only, not its group: nothing of it can clean up
    proc.wait(timeout=30)
    try:
        assert _gone(servers), "the temporary Prefect API server outlived a killed study"
    finally:
        for pid in _api_servers():
            if pid in servers:
                os.kill(pid, signal.SIGKILL)
