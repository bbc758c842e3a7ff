"""Scale-out: the fold tasks on a Dask cluster through prefect-dask's DaskTaskRunner (``vitflow run --runner dask``).

Everything Dask-specific lives here: the scheduler address and its reachability, the task runner (an existing
cluster, or a LocalCluster sized to the machine), the checks that workers can reach the MLflow tracking server
and the Prefect API, the tags saying which worker ran a fold, and a stop signal that reaches folds on other
machines. The fold task itself is unchanged: pipeline.study.Study travels to a worker without its tensors and
reloads them there (see Study.__getstate__)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from pipeline.config import ConfigError

RUNNERS = ("local", "dask")
DEFAULT_SCHEDULER_PORT = 8786
CONNECT_TIMEOUT_S = 5.0
WORKERS_TIMEOUT_S = 60.0  # how long a study waits for the first worker to join an existing scheduler
STOP_POLL_S = 1.0  # how often a fold on a worker asks the scheduler whether the study is stopping
PRELOAD = "flows.dask_preload"  # imported by each worker at start (dask worker --preload flows.dask_preload)


class ClusterError(ConfigError):
    """The Dask setup cannot work (no scheduler there, no tracking server, a worker that cannot reach it);
    the message says what and how to fix it."""


def check_runner(runner: str) -> str:
    if runner not in RUNNERS:
        raise ClusterError(f"runner {runner!r} is not one of {', '.join(RUNNERS)}")
    return runner


def normalize_address(address: str) -> str:
    """``HOST``, ``HOST:PORT`` or ``tcp://HOST:PORT`` -> ``tcp://HOST:PORT`` (port 8786 when missing)."""
    text = address.strip()
    if not text:
        raise ClusterError("--dask-address is empty; give the scheduler as tcp://HOST:8786, or leave it out for a "
                           "local cluster")
    parsed = urlparse(text if "://" in text else f"tcp://{text}")
    try:
        port = parsed.port or DEFAULT_SCHEDULER_PORT
    except ValueError:
        port = None
    if parsed.scheme not in ("tcp", "tls") or not parsed.hostname or port is None or parsed.path not in ("", "/"):
        raise ClusterError(f"--dask-address {address!r} is not a Dask scheduler address; expected tcp://HOST:PORT, "
                           f"e.g. tcp://10.0.0.5:{DEFAULT_SCHEDULER_PORT}")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{parsed.scheme}://{host}:{port}"


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, not after the Dask client's own retries, when nothing listens at the scheduler address."""
    parsed = urlparse(address)
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} ({reason}); start one there (`dask scheduler --port "
            f"{parsed.port}`, then `dask worker {address}` on each machine, see README 'Scaling out'), or fix "
            f"--dask-address; without --dask-address a local cluster sized to this machine is started") from None


def require_tracking_server(uri: str) -> None:
    """Workers are other processes or machines: they log their fold runs to an MLflow tracking server, not to a
    file or SQLite store on the flow's disk."""
    if urlparse(uri).scheme in ("http", "https"):
        return
    raise ClusterError(
        f"--runner dask needs an MLflow tracking server (fold runs are logged from the Dask workers, other "
        f"processes or machines), but the tracking URI is {uri!r}; start one (`make serve`, or `mlflow/server.sh` "
        f"for the tracking server alone) and set MLFLOW_TRACKING_URI=http://HOST:PORT (or, with "
        f"MLFLOW_TRACKING_URI unset, pass --set tracking.uri=http://HOST:PORT)")


def preflight(tracking_uri: str, address: str | None) -> str | None:
    """The checks that need no cluster: the tracking URI, the address's form, a listening scheduler."""
    require_tracking_server(tracking_uri)
    if address is None:
        return None
    address = normalize_address(address)
    check_reachable(address)
    return address


def task_runner(address: str | None, local_workers: int):
    """prefect-dask's DaskTaskRunner on the scheduler at ``address``; without one, a LocalCluster of
    ``local_workers`` single-threaded worker processes on loopback (dashboard on a free loopback port)."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address, client_kwargs={"timeout": f"{int(CONNECT_TIMEOUT_S * 3)}s"})
    return DaskTaskRunner(cluster_kwargs={"n_workers": max(1, local_workers), "threads_per_worker": 1,
                                          "processes": True, "host": "127.0.0.1",
                                          "dashboard_address": "127.0.0.1:0", "preload": [PRELOAD]})


def is_dask_runner(runner: Any) -> bool:
    return type(runner).__name__ == "DaskTaskRunner"


@contextmanager
def prefect_api_for_workers() -> Iterator[str]:
    """Dask workers report their task runs to the flow's Prefect API. Without $PREFECT_API_URL a flow runs
    against a temporary server that only its own process knows about, and each worker would start its own;
    so start that temporary server here and name it in the settings that travel with every task. Workers on
    other machines need a real server: set PREFECT_API_URL (checked once the cluster is known)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the default instance: the flow's own client finds and reuses it
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url


def _can_connect(urls: list[str]) -> dict[str, str]:
    """Run on each worker: which of ``urls`` this machine cannot open a TCP connection to, and why."""
    failures = {}
    for url in urls:
        parsed = urlparse(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            failures[url] = exc.strerror or type(exc).__name__
    return failures


def attach(runner: Any, tracking_uri: str) -> dict[str, Any]:
    """Connect to the cluster, wait for a worker, check that every worker reaches the tracking server and the
    Prefect API. Returns the scheduler address, the workers (name, host, threads) and the total thread count."""
    from prefect.settings import PREFECT_API_URL

    client = runner.client  # connects (or starts the LocalCluster) on first use
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
    except TimeoutError:
        raise ClusterError(f"no Dask worker joined the scheduler at {client.scheduler.address} within "
                           f"{WORKERS_TIMEOUT_S:.0f} s; start workers with `dask worker "
                           f"{client.scheduler.address} --nthreads 1`") from None
    info = client.scheduler_info()["workers"]
    workers = {addr: {"name": str(w.get("name")), "host": w.get("host") or urlparse(addr).hostname,
                      "nthreads": int(w.get("nthreads") or 1)} for addr, w in info.items()}
    urls = [tracking_uri] + ([PREFECT_API_URL.value()] if PREFECT_API_URL.value() else [])
    try:
        unreachable = client.run(_can_connect, urls)
    except Exception as exc:  # e.g. a worker without vitflow installed cannot unpickle this function
        raise ClusterError(f"the Dask workers could not run vitflow's connectivity check ({type(exc).__name__}: "
                           f"{exc}); every worker needs the same environment as this machine (same image or "
                           f"`pip install -e .` of the same checkout)") from None
    bad = {addr: fails for addr, fails in unreachable.items() if fails}
    if bad:
        addr, fails = next(iter(bad.items()))
        url, reason = next(iter(fails.items()))
        raise ClusterError(
            f"Dask worker {workers.get(addr, {}).get('name', addr)} ({addr}) cannot reach {url} ({reason}); "
            f"{len(bad)} of {len(workers)} worker(s) affected. Workers log fold runs to the MLflow tracking server "
            f"and task runs to the Prefect API: serve both on an address the workers reach (e.g. "
            f"`mlflow server --host 0.0.0.0 --allowed-hosts ...`, `prefect server start --host 0.0.0.0`) and set "
            f"MLFLOW_TRACKING_URI / PREFECT_API_URL to it")
    return {"scheduler": client.scheduler.address, "workers": workers,
            "threads": sum(w["nthreads"] for w in workers.values()) or 1, "client": client}


def worker_tags() -> dict[str, str]:
    """Where a fold ran: ``host`` always; ``dask.worker`` (name) and ``dask.worker_address`` on a Dask worker."""
    tags = {"host": socket.gethostname()}
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a Dask worker
        return tags
    tags.update({"dask.worker": str(worker.name), "dask.worker_address": str(worker.address)})
    return tags


def on_dask_worker() -> bool:
    return "dask.worker" in worker_tags()


class ClusterStop:
    """The study's stop signal across the cluster: a threading.Event in the flow's process plus a
    distributed.Event named after the study run, which folds on workers poll (at most once a second, between
    batches) so that a failing or interrupted study stops them too. Pickles as its name only."""

    def __init__(self, name: str, client: Any = None) -> None:
        self.name = name
        self._client = client
        self._local = threading.Event()
        self._checked = 0.0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])

    def _event(self):
        from distributed import Event

        return Event(self.name, client=self._client)

    def set(self) -> None:
        self._local.set()
        try:
            self._event().set()
        except Exception:  # the cluster is gone: nothing left on it to stop
            pass

    def is_set(self) -> bool:
        if self._local.is_set():
            return True
        with self._lock:
            now = time.monotonic()
            if now - self._checked < STOP_POLL_S:
                return False
            self._checked = now
        try:
            if self._event().is_set():
                self._local.set()
        except Exception:  # scheduler unreachable for a moment: keep training, Dask reports a lost scheduler
            pass
        return self._local.is_set()

