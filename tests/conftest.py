"""Shared fixtures: real MNIST from the data root, isolated Prefect home and MLflow stores per test session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Ctrl-C from a terminal reaches processes whose SIGINT is at its default. Started as a background job of a
# non-interactive shell (`make test &`), pytest inherits SIGINT (and SIGQUIT) ignored, and so would every study and
# server the tests start (an ignored signal stays ignored across exec): tests/test_resilience.py's Ctrl-C and
# tests/test_stack.py's Ctrl-C of `vitflow serve` would then be ignored. A handler here makes the children's SIGINT
# the default again (a caught signal is reset by exec), as a terminal's foreground job has it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _data_root() -> Path:
    env = os.environ.get("VITFLOW_DATA_DIR")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.exit(f"real MNIST not found under {root}/MNIST/raw; set VITFLOW_DATA_DIR to the folder holding "
                    f"MNIST/raw", returncode=2)
    return root.resolve()


DATA_ROOT = _data_root()
os.environ["VITFLOW_DATA_DIR"] = str(DATA_ROOT)


@pytest.fixture(scope="session")
def data_root() -> Path:
    return DATA_ROOT


@pytest.fixture(scope="session")
def mnist(data_root):
    from pipeline.config import DataConfig
    from pipeline.data import load

    return load(DataConfig(root=str(data_root), download=False))


@pytest.fixture(scope="session")
def session_env(tmp_path_factory) -> dict[str, str]:
    """Environment for CLI subprocesses: own Prefect home, own MLflow store, the real data root."""
    home = tmp_path_factory.mktemp("vitflow-e2e")
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "VITFLOW_RESULTS_DIR": str(home / "results"),  # never resume from the developer's own result store
        "VITFLOW_DATA_DIR": str(DATA_ROOT),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_runs(session_env):
    """The smoke preset run twice through the real CLI (Prefect flow, MLflow SQLite store): both results."""
    first = run_cli(["run", "--config", "smoke"], session_env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    second = run_cli(["run", "--config", "smoke", "--set", "train.seed=1"], session_env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    return first, second


@pytest.fixture(scope="session")
def mlflow_client(session_env, smoke_runs):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=session_env["MLFLOW_TRACKING_URI"])
