"""``vitflow``: the command line. ``vitflow run`` validates the configuration, runs the Prefect flow and prints
a summary table."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pipeline import report  # noqa: E402
from pipeline.config import ConfigError, list_presets, load_config, require_answering_server  # noqa: E402


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")  # runs end KILLED, not left RUNNING


def format_summary(s: dict[str, Any]) -> str:
    """The terminal summary: the model card's numbers, formatted by the same functions (pipeline.report)."""
    rows = [("rank", "configuration", "params", "val error", "train error")]
    for r in report.cv_rows(s["leaderboard"]):
        rows.append((r["rank"], r["configuration"] + ("  <- selected" if r["rank"] == "1" else ""),
                     r["parameters"], r["val_error"], r["train_error"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
    n = report.key_numbers(s)
    reg = s["registration"]
    t = s["timings"]
    port = os.environ.get("MLFLOW_PORT") or "5000"  # what `make ui` binds
    ui = (f"make ui   (then open http://127.0.0.1:{port}; while `make serve` runs, its MLflow server is "
          f"already there)" if s["tracking_uri"].startswith("sqlite") else s["tracking_uri"])
    return "\n".join([
        "",
        f"Study '{s['study']}' ({len(s['leaderboard'])} configurations x "
        f"{report.folds_of(s['leaderboard'])}-fold CV, device {s['device']})",
        "",
        table,
        "",
        f"Test accuracy (ONNX Runtime, {s['provider']}): {n['test_accuracy']}  "
        f"[PyTorch: {n['torch_test_accuracy']}, parity max |diff| {n['parity']}]",
        f"Throughput:      {n['throughput_detail']}",
        f"Final training:  {report.final_training(s)}",
        f"CV folds:        {s.get('folds_trained', '?')} trained, {s.get('folds_reused', 0)} reused from an earlier "
        f"run of this study" + (" (vitflow run --fresh retrains all)" if s.get("folds_reused") else ""),
        f"Fold tasks:      {s.get('fold_runner', 'local threads')}",
        f"ONNX model:      {s['onnx_path']}",
        f"Registered:      {reg['model_uri']} -> @{reg['alias']} ({reg['reason']})",
        f"Model card:      model_card.md on final run {s['final_run_id']} (also the version's description)",
        f"Wall time:       {n['wall_time']} (data {t['data_s']:.1f}, CV {t['cv_s']:.1f}, retrain "
        f"{t['retrain_s']:.1f}, export {t['export_s']:.1f}, evaluate {t['evaluate_s']:.1f}"
        + (f", int8 {t['quantize_s']:.1f}" if "quantize_s" in t else "") + f", register {t['register_s']:.1f})",
        f"MLflow:          experiment '{s['experiment']}', study run {s['study_run_id']}",
        f"Look at it:      {ui}",
    ])


def _api_server_class() -> type:
    """Prefect's temporary API server (``SubprocessASGIServer``), started in its own session where Linux can tie
    its life to ours.

    Prefect starts that server as a child in our process group. A Ctrl-C in the terminal (SIGINT to the whole
    foreground group) or ``timeout``/``kill -- -PGID`` (SIGTERM to the group) then stops the server at the same
    moment as the study, and the study's last calls (the flow run's Crashed state, the log flush at exit) retry
    against a dead API: ``vitflow run`` took ~2.5 minutes to exit after a Ctrl-C, and failed with ConnectError
    instead of saying it was interrupted. In its own session the server gets no group signals: the study reports
    its state and exits, and Prefect's exit handler stops the server as after any run. So that nothing outlives
    a study that is killed outright (SIGKILL, the OOM killer), the server gets SIGTERM when the thread that started
    it ends (prctl PR_SET_PDEATHSIG): that thread stays parked until the process ends. Elsewhere than Linux, and
    if this Prefect's server has no ``_run_uvicorn_command``, Prefect's own class as it is."""
    from prefect.server.api import server as api_server

    base = api_server.SubprocessASGIServer
    if not sys.platform.startswith("linux") or not hasattr(base, "_run_uvicorn_command"):
        return base
    import ctypes
    import functools

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):  # no C library with prctl to be found: Prefect's own class
        return base
    parent = os.getpid()

    def die_with_parent() -> None:  # in the child, between fork and exec
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: nobody would stop this server
            os._exit(1)

    class SubprocessProxy:  # the server module's view of `subprocess` while it spawns: Popen in a new session
        def __init__(self, real: Any) -> None:
            self._real = real
            self.Popen = functools.partial(real.Popen, start_new_session=True, preexec_fn=die_with_parent)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

    class OwnSessionServer(base):
        def _run_uvicorn_command(self) -> Any:
            real = api_server.subprocess
            api_server.subprocess = SubprocessProxy(real)
            try:
                return super()._run_uvicorn_command()
            finally:
                api_server.subprocess = real

    return OwnSessionServer


def start_prefect_api_early() -> threading.Event | None:
    """With no PREFECT_API_URL, Prefect boots a temporary API server (a subprocess: several seconds) when the flow
    is first called. Boot it now in a thread instead, so that it starts while torch, MLflow and the flow are
    imported; ``wait()`` on the returned event (set once the server is up, or its start failed) before calling
    the flow. The flow then finds it running (Prefect keeps one
    such server per process). If this early start fails, the error is printed and the flow starts the server
    itself as usual. None when an API URL is set (a real server: nothing to start). The server runs in its own
    session (``_api_server_class``), and the thread stays parked for the process's life, as that requires."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    # imported here, not in the thread: concurrent imports of one package from two threads can deadlock
    server_class = _api_server_class()
    ready = threading.Event()

    def run() -> None:
        try:
            server_class().start()
        except Exception as exc:  # noqa: BLE001 - the flow starts the server itself
            print(f"vitflow: early start of Prefect's temporary API failed ({type(exc).__name__}: {exc}); "
                  f"the flow starts it instead", file=sys.stderr)
        finally:
            ready.set()
        threading.Event().wait()  # parked: the server's life is tied to this thread's (PR_SET_PDEATHSIG)

    threading.Thread(target=run, name="prefect-api-boot", daemon=True).start()
    return ready


def settle_garbage_collector() -> None:
    """Move the ~1M objects that importing torch, Prefect and MLflow creates out of the garbage collector's
    sight (gc.freeze), so that its full collections during the study, and the one at interpreter exit, scan only
    what the study itself creates. Measured on a smoke study (2 CPU cores): 12 full collections took 3.1 s and
    the exit's 3.5 s, of a ~24 s process. Only for a whole ``vitflow`` process, not when main() is called
    in-process by a caller that owns the interpreter."""
    # no gc.collect() first: it would cost a full collection (~0.5 s) to free a little import-time garbage
    gc.freeze()


class _NoTracebackFor(logging.Filter):
    """Drops the traceback from Prefect's "Encountered exception during execution" record when the exception is
    one the CLI explains in one line (bad data, a bad configuration): its message stays in the log, and the final
    ``vitflow:`` line says what to do. Unexpected exceptions keep their traceback."""

    def __init__(self, *expected: type[BaseException]) -> None:
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.expected):
            record.exc_info, record.exc_text = None, None
        return True


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.set)  # validate before Prefect or any data work starts
        if args.runner == "dask":  # no tracking server, a bad or silent scheduler address: say so in seconds
            from flows import dask_runner
            from pipeline.tracking import tracking_uri

            args.dask_address = dask_runner.preflight(tracking_uri(cfg.tracking), args.dask_address)
        # A tracking server that is down: say so in seconds (MLflow's client would retry for minutes).
        require_answering_server(os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or "")
    except ConfigError as exc:
        print(f"vitflow: {exc}", file=sys.stderr)
        return 2
    booting = start_prefect_api_early()
    from flows.vit_pipeline import vit_pipeline  # torch, Prefect, MLflow: only once the config is known good
    from pipeline.data import DataError

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        run_logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackFor) for f in run_logger.filters):  # main() may run more than once
            run_logger.addFilter(_NoTracebackFor(DataError, ConfigError))
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        if booting is not None:
            booting.wait()
        if getattr(args, "whole_process", False):
            settle_garbage_collector()
        summary = vit_pipeline(config=args.config, overrides=args.set, fresh=args.fresh, runner=args.runner,
                               dask_address=args.dask_address)
    except (DataError, ConfigError) as exc:
        print(f"vitflow: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the flow's log above has the traceback; end with the cause in one line
        print(f"vitflow: study failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:  # SIGINT, or SIGTERM (ours or Prefect's TerminationSignal)
        if isinstance(exc, SystemExit):
            raise
        signum = getattr(exc, "signal", None) or (signal.SIGTERM if "signal 15" in str(exc) else signal.SIGINT)
        print(f"vitflow: interrupted ({signal.Signals(signum).name}); open MLflow runs were marked KILLED",
              file=sys.stderr)
        return 128 + int(signum)
    print(format_summary(summary))
    return 0


SERVED = ("seed-study", "scheduled-retraining")  # the deployments `vitflow serve` serves (prefect.yaml's names)


def prepare_serving(cron: str, replace: bool) -> str | None:
    """Why ``vitflow serve`` cannot serve, or None once it can: the cron must parse, and a Prefect server must
    answer at PREFECT_API_URL. Without one, Prefect would start its temporary API server, which runs no scheduler
    (the scheduled retraining would never run), shows no UI and ends with this process.

    Deployments of the same names that a worker runs (prefect.yaml's, on a work pool: ``make serve``) are not taken
    over silently: a served run of a deployment updated in place from a work-pool one crashed loading its code
    ("No such file or directory: '.../None'": the deployment kept no path). With ``replace`` they are deleted, and
    serving creates them anew."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone="UTC")
    except ValidationError:
        return (f"--cron {cron!r} is not a cron expression (five fields, UTC: minute hour day month weekday, "
                f"e.g. '0 3 * * 1')")
    url = PREFECT_API_URL.value()
    start = ("start one with `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api (`make serve` "
             "starts one too, with a worker that runs these deployments already)")
    if not url:
        return ("no Prefect server to serve the deployments to: PREFECT_API_URL is not set. Prefect's temporary API "
                "server runs no scheduler and stops with this process, so the scheduled retraining would never "
                f"run; {start}")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
        if error is not None:
            return (f"the Prefect server at PREFECT_API_URL={url} does not answer ({type(error).__name__}: {error}); "
                    f"{start}")
        pooled = []
        for name in SERVED:
            try:
                deployment = client.read_deployment_by_name(f"vit-pipeline/{name}")
            except ObjectNotFound:
                continue
            if deployment.work_pool_name:
                pooled.append(deployment)
        listed = ", ".join(f"vit-pipeline/{d.name} (work pool {d.work_pool_name})" for d in pooled)
        if pooled and not replace:
            return (f"{listed} already exist on {url}, run by a worker (`make serve`, `prefect deploy`): run them "
                    f"with `prefect deployment run`, or pass --replace to serve them from this process instead "
                    f"(`VITFLOW_HOME=$PWD prefect deploy --all`, as `make serve` runs it, puts them back)")
        for deployment in pooled:
            client.delete_deployment(deployment.id)
        if pooled:
            print(f"vitflow serve: {listed} replaced: this process serves them now", file=sys.stderr)
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the flow's deployments from this process (no work pool needed); Ctrl-C stops serving."""
    try:
        load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"vitflow: {exc}", file=sys.stderr)
        return 2
    problem = prepare_serving(args.cron, args.replace)
    if problem is not None:
        print(f"vitflow serve: {problem}", file=sys.stderr)
        return 2
    from prefect import serve

    from flows.vit_pipeline import vit_pipeline

    parameters = {"config": args.config, "overrides": args.set}
    serve(
        vit_pipeline.to_deployment(name=SERVED[0], parameters=parameters, tags=["vitflow", "manual"]),
        vit_pipeline.to_deployment(name=SERVED[1], parameters=parameters, cron=args.cron,
                                   tags=["vitflow", "scheduled"]),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitflow", description="ViT on MNIST: k-fold model selection as a "
                                     "Prefect flow, tracked in MLflow, exported to ONNX.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a study (cross-validation, retraining, ONNX export, registration)",
                         description="Run a study as a Prefect flow: k-fold cross-validation over the preset's "
                                     "grid, retraining of the best configuration on all training images, ONNX "
                                     "export, ONNX Runtime evaluation on the test set, int8 quantization and MLflow "
                                     "registration. Tracks to $MLFLOW_TRACKING_URI, else mlflow/ in the checkout.")
    run.add_argument("--config", "-c", default="seed",
                     help=f"preset name ({', '.join(list_presets())}) or path to a YAML file (default: seed)")
    run.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                     help="override one setting, e.g. --set train.epochs=2 --set cv.grid.model.depth=[2,3]")
    run.add_argument("--fresh", action="store_true",
                     help="retrain every fold even if an earlier run of the same study finished it")
    run.add_argument("--runner", choices=("local", "dask"), default="local",
                     help="where fold tasks run: local threads (default), or Dask workers (prefect-dask; needs an "
                          "MLflow tracking server, MLFLOW_TRACKING_URI=http://...)")
    run.add_argument("--dask-address", metavar="tcp://HOST:8786",
                     help="Dask scheduler for --runner dask; default: a local cluster sized to this machine")
    run.set_defaults(func=cmd_run)
    srv = sub.add_parser("serve", help="serve the deployments seed-study and scheduled-retraining from this "
                         "process (needs PREFECT_API_URL pointing at a Prefect server); Ctrl-C stops")
    srv.add_argument("--config", "-c", default="seed", help="preset or YAML path the deployments run (default: seed)")
    srv.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    srv.add_argument("--cron", default="0 3 * * 1",
                     help="schedule of scheduled-retraining, UTC (default: Mondays 03:00)")
    srv.add_argument("--replace", action="store_true",
                     help="take over deployments of the same names that a worker runs (prefect.yaml's, on a work "
                          "pool): delete them, then serve them from this process")
    srv.set_defaults(func=cmd_serve)
    from flows.consume_cli import add_parsers  # predict, evaluate
    add_parsers(sub)
    args = parser.parse_args(argv)
    if getattr(args, "dask_address", None) and args.runner != "dask":
        parser.error("--dask-address needs --runner dask")
    args.whole_process = argv is None  # the command line itself (console script, python -m flows.cli)
    try:
        rc = args.func(args)
        if args.whole_process:
            sys.stdout.flush()  # a reader that left shows here, not as an error at interpreter exit
    except BrokenPipeError:  # e.g. `vitflow predict ... --json | head`: the reader left; stop quietly
        if not args.whole_process:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 128 + signal.SIGPIPE  # what a shell reports for a command ended by SIGPIPE
    if args.whole_process:
        gc.freeze()  # the exit's final collection then skips what the command made (seconds for a study)
    return rc


if __name__ == "__main__":
    sys.exit(main())
