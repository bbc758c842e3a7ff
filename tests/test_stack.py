"""The operations stack for real: Prefect server, MLflow server and a worker on free loopback ports, deployments
run through `prefect deployment run`, results read back over the MLflow HTTP API, the UI seen in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow
ARTIFACTS = REPO / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pgid_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory, data_root):
    base = tmp_path_factory.mktemp("stack")
    env = dict(os.environ)
    env.update({
        "PREFECT_PORT": str(_free_port()), "MLFLOW_PORT": str(_free_port()),
        "VITFLOW_STACK_DIR": str(base / "state"), "VITFLOW_RESULTS_DIR": str(base / "results"), "VITFLOW_MLFLOW_DIR": str(base / "mlflow"),
        "PREFECT_HOME": str(base / "prefect-home"),
        "VITFLOW_DATA_DIR": str(data_root), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    })
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    started = subprocess.run([str(REPO / "scripts" / "stack.sh"), "start"], env=env, capture_output=True,
                             text=True, timeout=300)
    state = base / "state"
    pids = {p.stem: int(p.read_text().split()[0]) for p in state.glob("*.pid")}  # "PGID START_TICKS BOOT_ID"
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert set(pids) == {"prefect", "mlflow", "worker"}
        yield env, pids
    finally:
        stopped = subprocess.run([str(REPO / "scripts" / "stack.sh"), "stop"], env=env, capture_output=True,
                                 text=True, timeout=120)
        for log in state.glob("*.log"):  # keep the service logs for a failing CI run
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy(log, ARTIFACTS / f"stack-{log.name}")
        assert stopped.returncode == 0, stopped.stderr
        assert not [name for name, pid in pids.items() if _pgid_alive(pid)], "make stop left processes running"
        assert not list(state.glob("*.pid"))


def _prefect(env, *args, timeout=120) -> subprocess.CompletedProcess:
    """The prefect CLI in a wide terminal: its output (--watch's log lines too) wraps to the terminal's width."""
    return subprocess.run([str(REPO / ".venv" / "bin" / "prefect"), *args], env=dict(env, COLUMNS="300"),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _deployment_run(env, *params) -> subprocess.CompletedProcess:
    args = ["deployment", "run", "vit-pipeline/seed-study", "--param", "config=smoke"]
    for p in params:
        args += ["--param", p]
    return _prefect(env, *args, "--watch", "--watch-timeout", "900", timeout=960)


def test_port_in_use_is_a_clear_error(stack):
    env, _ = stack
    busy = dict(env, VITFLOW_STACK_DIR=str(Path(env["VITFLOW_STACK_DIR"]) / "second"))
    result = subprocess.run([str(REPO / "scripts" / "stack.sh"), "start"], env=busy, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert f"port {env['PREFECT_PORT']} on 127.0.0.1 is already in use" in result.stderr
    # `make ui` (mlflow/server.sh) on the stack's MLflow port: that server already serves the UI, say so
    ui = subprocess.run([str(REPO / "mlflow" / "server.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert ui.returncode == 1
    assert f"an MLflow server already answers on http://127.0.0.1:{env['MLFLOW_PORT']}" in ui.stderr, ui.stderr
    with socket.socket() as other:  # a port some other program listens on
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        ui = subprocess.run([str(REPO / "mlflow" / "server.sh")], env=dict(env, MLFLOW_PORT=str(port)),
                            capture_output=True, text=True, timeout=60)
    assert ui.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use; choose another with MLFLOW_PORT" in ui.stderr, ui.stderr


def test_scheduled_deployment_has_its_cron(stack):
    env, _ = stack
    result = _prefect(env, "deployment", "inspect", "vit-pipeline/scheduled-retraining")
    assert result.returncode == 0, result.stderr
    assert "0 3 * * 1" in result.stdout and "UTC" in result.stdout


def test_a_failing_deployment_run_shows_why_when_watched(stack):
    """`prefect deployment run --watch` streams the flow run's log (the stack's Prefect server streams logs out),
    so a failure shows its reason, not only the state 'Failed'."""
    env, _ = stack
    failed = _prefect(env, "deployment", "run", "vit-pipeline/seed-study", "--param",
                      "config=no-such-preset", "--watch", "--watch-timeout", "300", timeout=360)
    assert failed.returncode == 1 and "Flow run finished in state 'Failed'" in failed.stdout, failed.stdout[-3000:]
    assert "unknown preset 'no-such-preset'; choose one of: cpu, seed, smoke, strong" in failed.stdout, \
        failed.stdout[-3000:]


def test_deployment_runs_tracked_and_promoted(stack, tmp_path, mnist):
    from mlflow.tracking import MlflowClient

    from pipeline.inference import OnnxClassifier
    from pipeline.tracking import Tracker
    from pipeline.train import to_pixels

    from ._consume import mlflow_store

    env, _ = stack
    first = _deployment_run(env)
    assert first.returncode == 0 and "Completed" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("vitflow-smoke")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    roles = [r.data.tags.get("vitflow.role") for r in runs]
    assert sorted(roles) == sorted(["study"] + ["configuration"] * 2 + ["fold"] * 4 + ["final"])
    assert all(r.info.status == "FINISHED" for r in runs)
    final = next(r for r in runs if r.data.tags["vitflow.role"] == "final")
    assert {a.path for a in client.list_artifacts(final.info.run_id, "figures")}  # served by the MLflow server
    v1 = client.get_model_version_by_alias("vit-mnist-smoke", "champion")
    assert str(v1.version) == "1"
    # --watch streams the flow's log, whose last line is the outcome (test accuracy, version, alias)
    assert re.search(r"result: \S+ selected; test accuracy \d+\.\d\d% \(ONNX Runtime, CPUExecutionProvider; "
                     r"PyTorch [\d.]+%\); models:/vit-mnist-smoke/1 -> @champion", first.stdout), first.stdout[-3000:]

    second = _deployment_run(env, 'overrides=["train.seed=1"]')
    assert second.returncode == 0 and "Completed" in second.stdout, second.stdout[-3000:] + second.stderr[-3000:]
    v2 = client.get_model_version("vit-mnist-smoke", "2")
    acc1 = float(client.get_model_version("vit-mnist-smoke", "1").tags["test_accuracy"])
    acc2 = float(v2.tags["test_accuracy"])
    expected = "champion" if acc2 > acc1 else "challenger"
    assert v2.tags["decision"] == expected, v2.tags
    assert str(client.get_model_version_by_alias("vit-mnist-smoke", expected).version) == "2"
    studies = client.search_runs([exp.experiment_id], "tags.`vitflow.role` = 'study'", order_by=["start_time DESC"])
    assert studies[0].data.tags["alias"] == expected and studies[0].data.tags["alias_reason"]

    # The registered models, consumed from the server (this process's global MLflow URI names another store):
    # the version by alias and the final run's logged model, downloaded through the server's artifact proxy.
    sample = to_pixels(mnist.test_images[:1000]).numpy()
    by_alias = OnnxClassifier(f"models:/vit-mnist-smoke@{expected}", tracking_uri=env["MLFLOW_TRACKING_URI"])
    assert (by_alias.source.name, by_alias.source.version) == ("vit-mnist-smoke", "2")
    final_run = v2.run_id
    by_run = OnnxClassifier(f"runs:/{final_run}/model", tracking_uri=env["MLFLOW_TRACKING_URI"])
    np.testing.assert_allclose(by_run.logits(sample), by_alias.logits(sample), atol=1e-6)
    accuracy = (by_alias.predict(sample) == mnist.test_labels[:1000].numpy()).mean()
    assert accuracy > 0.12, accuracy  # above the most frequent digit's share (11%): a trained model (smoke: 15-25%)

    # The server is on loopback, so its experiments keep their artifacts as plain files in its store: the same
    # store opened as a SQLite file (what `make run`, `vitflow predict` and `make ui` do) reaches them too.
    store = Path(env["VITFLOW_MLFLOW_DIR"])
    assert exp.artifact_location.startswith((store / "artifacts").as_uri()), exp.artifact_location
    sqlite = f"sqlite:///{store / 'mlflow.db'}"
    from_file = OnnxClassifier(f"models:/vit-mnist-smoke@{expected}", tracking_uri=sqlite)
    np.testing.assert_allclose(from_file.logits(sample), by_alias.logits(sample), atol=1e-6)
    with mlflow_store(tmp_path):  # Tracker sets the process's global URI: put it back afterwards
        tracker = Tracker(sqlite, "vitflow-smoke")
        run_id = tracker.start_run("sqlite probe")
        tracker.log_text(run_id, "written through the SQLite file", "probe.txt")
        tracker.end_run(run_id)
    assert [a.path for a in client.list_artifacts(run_id)] == ["probe.txt"]  # and seen by the server
    client.delete_run(run_id)

    # The decision is shown in the Prefect UI as a markdown artifact.
    artifact = _prefect(env, "artifact", "inspect", "study-summary")
    assert artifact.returncode == 0 and expected in artifact.stdout, artifact.stdout[-2000:]

    _look_at_mlflow_ui(env, exp.experiment_id)


def _look_at_mlflow_ui(env, experiment_id: str) -> None:
    """Open the experiment page in headless Chromium; the configuration runs and their metrics must be listed."""
    if os.environ.get("VITFLOW_BROWSER_TESTS") == "0":
        pytest.skip("browser check disabled by VITFLOW_BROWSER_TESTS=0")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are needed (.ci/run installs them)"
    from mlflow.tracking import MlflowClient
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.keys import Keys

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=2400,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        flt = urllib.parse.quote("tags.`vitflow.role` = 'configuration'")
        browser.get(f"{env['MLFLOW_TRACKING_URI']}/#/experiments/{experiment_id}/runs?searchFilter={flt}")
        _wait_text(browser, "smoke study")
        # Configuration runs are nested under their study run, collapsed: expand the parents.
        for button in browser.find_elements("css selector", "button[data-component-id*='runnamecellrenderer']"):
            button.click()
        _wait_text(browser, "blocks=1", "blocks=2")
        # Show the cross-validation metrics as columns, as a person comparing configurations would.
        browser.find_element("css selector", "[data-testid='column-selection-dropdown']").click()
        for metric in ("val_error_mean", "train_error_mean"):
            _wait_text(browser, metric)
            browser.find_elements("xpath", f"//*[normalize-space(text())='{metric}']")[-1].click()
        browser.find_element("tag name", "body").send_keys(Keys.ESCAPE)
        text = _wait_text(browser, "val_error_mean", "train_error_mean")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "mlflow-ui-experiment.png"))
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        configs = client.search_runs([experiment_id], "tags.`vitflow.role` = 'configuration'")
        for run in configs:  # each configuration's mean validation error is on the page
            assert str(run.data.metrics['val_error_mean'])[:5] in text, (run.info.run_name, text[:3000])
    finally:
        browser.quit()


def _wait_text(browser, *needles: str, seconds: float = 60) -> str:
    deadline = time.time() + seconds
    while True:
        text = browser.find_element("tag name", "body").text
        if all(n in text for n in needles):
            return text
        if time.time() > deadline:
            raise AssertionError(f"MLflow UI never showed {needles}; page text: {text[:2000]}")
        time.sleep(0.5)


def _serve(env, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *args], cwd=REPO,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stack(env, command, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "scripts" / "stack.sh"), command], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_restart_keeps_a_paused_schedule_paused_and_stop_ends_orphaned_flow_runs(stack):
    """`make serve` applies prefect.yaml again (active: true) but keeps a schedule the operator paused paused; and
    `make stop` ends a flow-run process that outlived its worker (marked by the worker's VITFLOW_STACK_RUN)."""
    env, _ = stack
    name = "vit-pipeline/scheduled-retraining"
    listed = _prefect(env, "deployment", "schedule", "ls", name, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    schedule_id = next(s["id"] for s in json.loads(listed.stdout) if s["schedule"] == "cron: 0 3 * * 1")
    paused = _prefect(env, "deployment", "schedule", "pause", name, schedule_id)
    assert paused.returncode == 0, paused.stdout + paused.stderr
    state = env["VITFLOW_STACK_DIR"]
    orphan = subprocess.Popen(["sleep", "600"], env=dict(env, VITFLOW_STACK_RUN=state), start_new_session=True)
    stopped = _stack(env, "stop", timeout=120)
    assert stopped.returncode == 0 and f"flow-run process(es) the worker had left: {orphan.pid}" in stopped.stdout
    assert orphan.wait(timeout=5) is not None
    started = _stack(env, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"kept paused: {name} schedule 0 3 * * 1" in started.stdout
    listed = _prefect(env, "deployment", "schedule", "ls", name, "-o", "json")
    assert [s["active"] for s in json.loads(listed.stdout)] == [False], listed.stdout


def test_bad_ports_and_stale_pid_files(tmp_path):
    """Ports that are not numbers or are the same stop `make serve` with a message naming them; a pid file whose PID
    now names another program (other start time), or a bare PID (no start time recorded), never makes `make stop`
    end that program's process group."""
    env = dict(os.environ, VITFLOW_STACK_DIR=str(tmp_path / "state"))
    for ports, message in ((("abc", "5999"), "PREFECT_PORT=abc is not a port number (1-65535)"),
                           (("4999", "99999"), "MLFLOW_PORT=99999 is not a port number (1-65535)"),
                           (("4999", "4999"), "PREFECT_PORT and MLFLOW_PORT are both 4999")):
        out = _stack(dict(env, PREFECT_PORT=ports[0], MLFLOW_PORT=ports[1]), "start", timeout=60)
        assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    other = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        (tmp_path / "state" / "worker.pid").write_text(f"{other.pid} 12345 {boot}\n")  # a reused PID
        (tmp_path / "state" / "prefect.pid").write_text(f"{other.pid}\n")  # an older script's file
        status = _stack(env, "status", timeout=60)
        assert "worker: stopped" in status.stdout and "prefect: stopped" in status.stdout
        stopped = _stack(env, "stop", timeout=60)
        assert stopped.returncode == 0 and "left alone" in stopped.stdout
        assert other.poll() is None and _pgid_alive(other.pid)
        assert not list((tmp_path / "state").glob("*.pid"))
    finally:
        other.kill()
        other.wait()


def test_vitflow_serve_refuses_what_it_cannot_serve(tmp_path, data_root):
    """No server (Prefect's temporary one runs no scheduler), a server that does not answer, a bad cron: exit 2
    with one line naming the problem and the fix, before anything starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), VITFLOW_DATA_DIR=str(data_root))
    cases = [({}, [], "PREFECT_API_URL is not set", "runs no scheduler"),
             ({"PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"}, [], "does not answer",
              "prefect server start"),
             ({}, ["--cron", "every monday"], "'every monday' is not a cron expression", "0 3 * * 1")]
    for extra_env, args, problem, fix in cases:
        log = tmp_path / "serve.log"
        proc = _serve({**env, **extra_env}, log, "--config", "smoke", *args)
        assert proc.wait(timeout=120) == 2, log.read_text()[-3000:]
        lines = log.read_text().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vitflow serve: "), lines[-20:]
        assert problem in lines[0] and fix in lines[0], lines[0]
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()  # no temporary server was started


def test_vitflow_serve_runs_its_deployments(stack, tmp_path):
    """`vitflow serve` (no work pool) against the stack's Prefect server. The stack's work-pool deployments have
    the same names: it refuses to take them over unless --replace. With it, it registers both deployments with its
    cron, runs a `prefect deployment run` itself (the stack's worker polls its work pool only), and Ctrl-C stops
    it. Last in this module: the work-pool deployments are gone afterwards."""
    from mlflow.tracking import MlflowClient

    env, _ = stack
    log = tmp_path / "serve.log"
    refused = _serve(env, log, "--config", "smoke")
    assert refused.wait(timeout=120) == 2, log.read_text()[-3000:]
    message = log.read_text().strip()
    assert "vit-pipeline/seed-study (work pool vitflow-pool)" in message and "--replace" in message, message
    assert _prefect(env, "deployment", "inspect", "vit-pipeline/seed-study").returncode == 0  # left as it was

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("vitflow-smoke")
    studies = "tags.`vitflow.role` = 'study'"
    before = len(client.search_runs([exp.experiment_id], studies)) if exp else 0
    proc = _serve(env, log, "--config", "smoke", "--cron", "0 5 * * *", "--replace")
    try:
        deadline = time.time() + 120
        while True:  # registered once the cron of its scheduled deployment shows (the work pool's is 0 3 * * 1)
            shown = _prefect(env, "deployment", "inspect", "vit-pipeline/scheduled-retraining")
            if shown.returncode == 0 and "0 5 * * *" in shown.stdout:
                break
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert "vitflow-pool" not in shown.stdout, shown.stdout
        ran = _deployment_run(env)
        assert ran.returncode == 0 and "Completed" in ran.stdout, ran.stdout[-3000:] + log.read_text()[-3000:]
        flow_run = ran.stdout.split("Created flow run '", 1)[1].split("'", 1)[0]
        assert f"Beginning flow run '{flow_run}'" in log.read_text()  # executed by the serving process
        runs = client.search_runs([client.get_experiment_by_name("vitflow-smoke").experiment_id], studies)
        assert len(runs) == before + 1 and all(r.info.status == "FINISHED" for r in runs)
    finally:
        os.killpg(proc.pid, 2)  # Ctrl-C
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            raise
    assert code in (0, 130), log.read_text()[-3000:]
    assert not _pgid_alive(proc.pid)
