"""MLflow helpers: the store, the experiment, the run tree (study -> configuration -> fold, study -> final),
run hygiene (no run left RUNNING) and the model registry with champion/challenger aliases."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from filelock import FileLock, Timeout
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig, require_answering_server

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = PROJECT_ROOT / "mlflow"
CHAMPION, CHALLENGER = "champion", "challenger"


def tracking_uri(cfg: TrackingConfig) -> str:
    """$MLFLOW_TRACKING_URI, else the config's, else SQLite in the project's mlflow/ folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    if uri:
        return uri
    DEFAULT_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store URI (sqlite:///relative or sqlite:////absolute); None for any
    other store, and for an in-memory database."""
    if urlparse(uri).scheme != "sqlite":
        return None
    db = uri.removeprefix("sqlite:///")
    return None if not db or db.startswith(":memory:") else Path(db)


def _artifact_location(uri: str) -> str | None:
    """Next to a local SQLite database, artifacts go to its artifacts/ folder (not ./mlruns of the cwd)."""
    db = sqlite_path(uri)
    if db is None:
        return None  # a tracking server decides where artifacts live
    return (db.resolve().parent / "artifacts").as_uri()


SERVED_ARTIFACTS = "mlflow-artifacts:"


def served_artifacts_on_disk(location: str, uri: str) -> Path | None:
    """Where a SQLite store's own ``mlflow/server.sh`` keeps a location it serves (``mlflow-artifacts:/P`` ->
    ``<the database's folder>/artifacts/P``, its --artifacts-destination), if that exists; None for any other
    location or store. MLflow itself cannot reach mlflow-artifacts:/ through a SQLite URI."""
    db = sqlite_path(uri)
    if db is None or not location.startswith(SERVED_ARTIFACTS):
        return None
    relative = urlparse(location).path.lstrip("/")
    folder = db.resolve().parent / "artifacts" / relative
    return folder if folder.exists() else None


STORE_LOCK_TIMEOUT_S = 120


def _store_lock(uri: str) -> AbstractContextManager[Any]:
    """A lock across processes for opening a local SQLite store: a new store's first opening creates its schema
    (MLflow's migrations), and two studies started at once against a new store both tried, and one failed with
    "table alembic_version already exists". A file beside the database (``<db>.lock``); nothing for other stores."""
    db = sqlite_path(uri)
    return nullcontext() if db is None else FileLock(f"{db}.lock", timeout=STORE_LOCK_TIMEOUT_S)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux): a PID reused by another process differs."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_identity() -> str:
    """host:pid:start ticks:boot id of this process, as a run tag: what ``process_alive`` checks."""
    return f"{platform.node()}:{os.getpid()}:{_start_ticks(os.getpid())}:{_boot_id()}"


def process_alive(identity: str) -> bool | None:
    """Whether the process a ``process_identity`` names still runs: None when it ran on another machine (it cannot
    be checked from here), False when it is gone (also after a reboot, or when its PID now names another process)."""
    try:
        host, pid, ticks, boot = identity.rsplit(":", 3)
        pid_n = int(pid)
    except ValueError:
        return False
    if host != platform.node():
        return None
    boot_now = _boot_id()
    if boot and boot_now and boot != boot_now:
        return False
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    ticks_now = _start_ticks(pid_n)
    return not (ticks and ticks_now and ticks != ticks_now)


HEARTBEAT_S = 60.0  # a running study tags its run with the time this often (Heartbeat)
HEARTBEAT_STALE_S = 600.0  # a study on another machine whose last beat is older than this counts as dead


class Heartbeat:
    """Tags a run ``heartbeat=<unix time>`` every ``every`` seconds from a daemon thread until stopped. A study run
    on another machine cannot be checked by its process; a heartbeat older than HEARTBEAT_STALE_S (ten beats
    missed, far beyond clock skew) says its process is gone. A failed beat (a busy store) is skipped: the next one
    tries again, and the study never fails for it."""

    def __init__(self, tracker: Tracker, run_id: str, every: float = HEARTBEAT_S) -> None:
        self.tracker, self.run_id, self.every = tracker, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="vitflow-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.tracker.set_tags(self.run_id, {"heartbeat": str(int(time.time()))})
            except Exception:  # noqa: BLE001 - a missed beat is harmless
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def run_process_gone(tags: dict[str, str], now: float | None = None) -> bool:
    """Whether the process that ran a study (its tags ``process`` and ``heartbeat``) is gone: on this machine, by
    its process (PID, start time, boot); on another machine, by a heartbeat older than HEARTBEAT_STALE_S. A run
    without a ``process`` tag, or from another machine without a heartbeat, cannot be judged: not gone."""
    process = tags.get("process")
    if not process:
        return False
    alive = process_alive(process)
    if alive is not None:
        return not alive
    try:
        return ((now or time.time()) - float(tags["heartbeat"])) > HEARTBEAT_STALE_S
    except (KeyError, ValueError):
        return False


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "torchvision", "prefect", "mlflow", "onnx", "onnxruntime-gpu", "onnxruntime",
                 "scikit-learn", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    return out


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=5, check=False)
        commit = result.stdout.strip()
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                                   capture_output=True, text=True, timeout=5, check=False).stdout.strip()
            return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{'model': {'dim': 8}} -> {'model.dim': 8}; lists become JSON."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: json.dumps(value) if isinstance(value, (list, tuple)) else value}


class Tracker:
    """Thread-safe logging through MlflowClient (fold tasks run in threads); remembers which runs it opened so
    that a crash can close every one of them as FAILED or KILLED."""

    def __init__(self, uri: str, experiment: str) -> None:
        require_answering_server(uri)
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.experiment_name = experiment
        lock = _store_lock(uri)
        try:
            with lock:  # the first opening (the client opens it) may create the store's schema: one at a time
                self.client = MlflowClient(tracking_uri=uri)
                self.experiment_id = self._ensure_experiment(experiment)
        except Timeout as exc:
            raise MlflowException(f"waited {STORE_LOCK_TIMEOUT_S} s for {lock.lock_file}, held by another process "
                                  f"opening the same MLflow store; if no other study or script is starting, delete "
                                  f"that file and run again") from exc
        self._open: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """A tracker sent to another process (a Dask worker) talks to the same store (URI) and experiment; the
        runs it opens there are its own to close."""
        return {"uri": self.uri, "experiment_name": self.experiment_name, "experiment_id": self.experiment_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.client = MlflowClient(tracking_uri=self.uri)
        self._open = set()
        self._lock = threading.Lock()

    def _ensure_experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if sqlite_path(self.uri) is not None and str(found.artifact_location).startswith(SERVED_ARTIFACTS):
                # Made through an MLflow server that proxies artifacts (mlflow/server.sh before it stored them as
                # plain files): through the SQLite file, the first figure would fail, after the training.
                raise MlflowException(
                    f"experiment {name!r} in {self.uri} keeps its artifacts behind an MLflow server "
                    f"({found.artifact_location}), which a SQLite store cannot write to; log through that server "
                    f"(MLFLOW_TRACKING_URI=http://127.0.0.1:5000 while `make serve` or mlflow/server.sh runs), or "
                    f"use a new experiment (--set tracking.experiment=NAME)")
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=_artifact_location(self.uri))
        except MlflowException:  # created concurrently by another process
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, Any] | None = None,
                  params: dict[str, Any] | None = None) -> str:
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = _retry_locked(self.client.create_run, self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        with self._lock:
            self._open.add(run_id)
        if params:
            self.log_params(run_id, params)
        return run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        _retry_locked(self.client.set_terminated, run_id, status=status)
        with self._lock:
            self._open.discard(run_id)

    @contextmanager
    def run(self, name: str, parent_id: str | None = None, **kwargs: Any) -> Iterator[str]:
        """A run that ends FINISHED, FAILED on an exception, KILLED on an interrupt."""
        run_id = self.start_run(name, parent_id, **kwargs)
        try:
            yield run_id
        except BaseException as exc:
            self.end_run(run_id, failure_status(exc))
            self.set_tags(run_id, {"error": f"{type(exc).__name__}: {exc}"[:5000]})
            raise
        self.end_run(run_id)

    def close_open_runs(self, status: str) -> list[str]:
        """End every run this tracker opened and has not ended (the crash path)."""
        with self._lock:
            pending = list(self._open)
        for run_id in pending:
            try:
                self.end_run(run_id, status)
            except MlflowException:
                pass
        return pending

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            _retry_locked(self.client.log_batch, run_id, params=items[i:i + 100], synchronous=True)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        _retry_locked(self.client.log_batch, run_id, metrics=items, synchronous=True)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        _retry_locked(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()],
                      synchronous=True)

    def log_figure(self, run_id: str, figure: Any, path: str) -> None:
        self.client.log_figure(run_id, figure, path)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_dict(self, run_id: str, data: dict[str, Any], path: str) -> None:
        self.client.log_dict(run_id, data, path)


def failure_status(exc: BaseException) -> str:
    """KILLED for interrupts and signals (BaseExceptions that are not Exceptions: KeyboardInterrupt, SystemExit,
    the orchestrator's termination signals) and for work stopped because the study stopped; FAILED for errors."""
    from pipeline.train import TrainingAborted

    killed = not isinstance(exc, Exception) or isinstance(exc, TrainingAborted)
    return RunStatus.to_string(RunStatus.KILLED if killed else RunStatus.FAILED)


def _retry_locked(call, *args, attempts: int = 8, **kwargs):
    """SQLite allows one writer: concurrent fold tasks can meet "database is locked". Retry with backoff rather
    than lose a metric point."""
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # MlflowException wrapping sqlalchemy's OperationalError
            if "locked" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)


def latest_alias_version(client: MlflowClient, model_name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def recorded_test_set(client: MlflowClient, version: Any) -> str | None:
    """The test set a registered version's ``test_accuracy`` was measured on (``pipeline.data.test_set_id``): its
    ``test_set`` tag, or for a version registered before that tag existed, what its study run's parameters say."""
    from pipeline.data import test_set_id

    if version.tags.get("test_set"):
        return version.tags["test_set"]
    try:
        study = client.get_run(version.tags["study_run_id"])
    except (KeyError, MlflowException):
        return None
    params = study.data.params
    if "data.test_subset" not in params:
        return None
    subset = params["data.test_subset"]
    return test_set_id(None if subset in ("None", "") else int(subset), params.get("data.subset_seed"),
                       study.data.tags.get("data_md5.t10k-images-idx3-ubyte"))


def promote(client: MlflowClient, model_name: str, version: str, accuracy: float, margin: float,
            test_set: str) -> dict[str, Any]:
    """Champion/challenger: the new version becomes champion only if it beats the champion's test accuracy by
    more than ``margin``, measured on the same test images (``test_set``, ``pipeline.data.test_set_id``);
    otherwise it is the challenger. Returns the decision with both accuracies and why."""
    champion = latest_alias_version(client, model_name, CHAMPION)
    champion_accuracy = champion_test_set = None
    if champion is not None:
        raw = champion.tags.get("test_accuracy")
        champion_accuracy = float(raw) if raw is not None else None
        champion_test_set = recorded_test_set(client, champion)
    if champion is None:
        alias, reason = CHAMPION, "no champion yet"
    elif champion_accuracy is None:
        alias, reason = CHAMPION, f"champion v{champion.version} has no recorded test accuracy"
    elif champion_test_set != test_set:
        # A lucky score on a small or other subset must not take the alias: not compared, and the reason says how.
        alias, reason = CHALLENGER, (
            f"not compared: test accuracy {accuracy:.4f} is on {test_set}, champion v{champion.version}'s "
            f"({champion_accuracy:.4f}) on {champion_test_set or 'an unrecorded test set'}; compare both on the "
            f"same images (vitflow evaluate --model models:/{model_name}/N) and, if this one is better, give it "
            f"@champion in the MLflow UI (the version's Aliases)")
    elif accuracy > champion_accuracy + margin:
        alias, reason = CHAMPION, (f"test accuracy {accuracy:.4f} beats champion v{champion.version} "
                                   f"({champion_accuracy:.4f}) by more than {margin:.4f}")
    else:
        alias, reason = CHALLENGER, (f"test accuracy {accuracy:.4f} does not beat champion v{champion.version} "
                                     f"({champion_accuracy:.4f}) by more than {margin:.4f}")
    client.set_registered_model_alias(model_name, alias, version)
    decision = {
        "alias": alias, "version": str(version), "test_accuracy": accuracy, "reason": reason,
        "previous_champion_version": champion.version if champion is not None else None,
        "previous_champion_accuracy": champion_accuracy,
    }
    client.set_model_version_tag(model_name, version, "test_set", test_set)
    for key, value in (("decision", alias), ("decision_reason", reason),
                       ("previous_champion_version", decision["previous_champion_version"]),
                       ("previous_champion_accuracy", champion_accuracy)):
        client.set_model_version_tag(model_name, version, key, "none" if value is None else str(value))
    return decision
