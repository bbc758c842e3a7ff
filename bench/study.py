"""Wall time of a whole study through the flow, split by stage, and the time spent in MLflow calls.

    .venv/bin/python bench/study.py                           # the seed study, once (~7 min on 2 CPU cores)
    .venv/bin/python bench/study.py --config smoke --resumed  # fresh, then the same study again (folds reused)
    .venv/bin/python bench/study.py --fresh --set train.epochs=2 --resume-store .vitflow/results

What runs: the Prefect flow ``vit_pipeline`` in this process, as ``vitflow run`` / ``make run`` run it (without the
CLI's argument parsing and summary), with MLflow on a temporary SQLite store and artifact folder, and the fold
result store (``$VITFLOW_RESULTS_DIR``) in a temporary folder unless ``--resume-store`` names one. Prefect uses
its usual home (``$PREFECT_HOME``) and temporary API server; the ONNX files go to ``models/`` as in a real run.
``--resumed`` runs the study twice on the same stores: ``--fresh`` first, then again, reusing every fold.

Stages: the flow times them itself and logs them as metrics of the study run (data_s, cv_s, retrain_s, export_s,
evaluate_s, quantize_s, register_s, total_s); they are read back from MLflow after the run. "call" is the wall
time of the flow call in this process: it adds Prefect's temporary API server and flow-run bookkeeping.

Tracking overhead is measured, not estimated: for the duration of each run, every public method of
``pipeline.tracking.Tracker`` and of ``MlflowClient``, ``mlflow.start_run``, ``mlflow.end_run`` (what leaving a
``with mlflow.start_run()`` block calls) and ``mlflow.onnx.log_model`` are wrapped with timers, in this process
only, and restored afterwards. A call made inside another timed call is not counted again (a per-thread depth
counter: only the outermost call is timed), so a Tracker method's time includes its retries on "database is
locked" and the client calls it makes. Calls are split by thread: those of the flow's own thread lie on the
study's critical path (time the study would not take without MLflow); those of the fold tasks' worker threads
run while other folds train, so their sum (thread-seconds) delays each fold's thread but not, one for one, the
study. ``log_figure`` includes rendering the PNG (matplotlib's savefig runs inside ``MlflowClient.log_figure``);
building the figures (``pipeline.plots``) is not counted. With ``--runner dask`` style runners, folds run in
other processes and their MLflow calls are not seen here.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STAGES = [("data", "data_s"), ("CV", "cv_s"), ("retrain", "retrain_s"), ("export", "export_s"),
          ("evaluate", "evaluate_s"), ("quantize", "quantize_s"), ("register", "register_s")]


class MlflowTimer:
    """Times the outermost MLflow call of each thread, per call name and per kind of thread (flow or fold)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._originals: list[tuple[Any, str, Callable]] = []
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)  # (thread kind, call) -> seconds
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._local, "inside", False):
                return original(*args, **kwargs)
            self._local.inside = True
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self._local.inside = False
                kind = "flow" if threading.current_thread() is threading.main_thread() else "folds"
                with self._lock:
                    self.seconds[(kind, label)] += elapsed
                    self.calls[(kind, label)] += 1

        setattr(owner, name, timed)
        self._originals.append((owner, name, original))

    def install(self) -> None:
        import mlflow
        import mlflow.onnx
        import mlflow.tracking.fluent
        from mlflow.tracking import MlflowClient

        from pipeline.tracking import Tracker

        for cls in (Tracker, MlflowClient):
            for name, member in vars(cls).items():
                if inspect.isfunction(member) and (not name.startswith("_") or name == "__init__") and name != "run":
                    self.wrap(cls, name, f"{cls.__name__}.{name}")  # Tracker.run: a context manager, its parts
        self.wrap(mlflow, "start_run", "mlflow.start_run")
        self.wrap(mlflow.tracking.fluent, "end_run", "mlflow.end_run")
        self.wrap(mlflow.onnx, "log_model", "mlflow.onnx.log_model")

    def restore(self) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals.clear()

    def total(self, kind: str) -> tuple[float, int]:
        return (sum(s for (k, _), s in self.seconds.items() if k == kind),
                sum(n for (k, _), n in self.calls.items() if k == kind))


def run_study(config: str, overrides: list[str], fresh: bool) -> dict[str, Any]:
    """One flow run with MLflow calls timed: the stage metrics from MLflow, the call's wall time, the timer."""
    from mlflow.tracking import MlflowClient

    from flows.vit_pipeline import vit_pipeline

    timer = MlflowTimer()
    timer.install()
    start = time.perf_counter()
    try:
        summary = vit_pipeline(config=config, overrides=overrides, fresh=fresh)
    finally:
        timer.restore()
    wall = time.perf_counter() - start
    metrics = MlflowClient(tracking_uri=summary["tracking_uri"]).get_run(summary["study_run_id"]).data.metrics
    return {"fresh": fresh, "metrics": metrics, "call_s": wall, "timer": timer}


def table(rows: list[dict[str, Any]]) -> str:
    head = (["run", "folds trained / reused", "flow total s"] + [f"{name} s" for name, _ in STAGES]
            + ["MLflow, flow thread s (calls, share of total)", "MLflow, fold threads s (calls)", "call s",
               "test accuracy"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        m = row["metrics"]
        flow_s, flow_n = row["timer"].total("flow")
        fold_s, fold_n = row["timer"].total("folds")
        cells = (["fresh" if row["fresh"] else "resumed", f"{m['folds_trained']:.0f} / {m['folds_reused']:.0f}",
                  f"{m['total_s']:.1f}"] + [f"{m[key]:.1f}" for _, key in STAGES]
                 + [f"{flow_s:.1f} ({flow_n}, {flow_s / m['total_s']:.0%})", f"{fold_s:.1f} ({fold_n})",
                    f"{row['call_s']:.1f}",
                    f"{m['test_accuracy']:.2%}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def top_calls(row: dict[str, Any], limit: int = 10) -> str:
    timer = row["timer"]
    lines = ["| thread | MLflow call | calls | s |", "|---|---|---|---|"]
    for (kind, label), seconds in sorted(timer.seconds.items(), key=lambda item: -item[1])[:limit]:
        lines.append(f"| {kind} | {label} | {timer.calls[(kind, label)]} | {seconds:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="seed", help="preset name or YAML path (default: seed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, repeatable")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fresh", action="store_true", help="retrain every fold (vitflow run --fresh)")
    mode.add_argument("--resumed", action="store_true", help="run twice: fresh, then resumed from the first run")
    parser.add_argument("--resume-store", type=Path, help="fold result store to use (default: a temporary one)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vitflow-bench-study-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.environ["VITFLOW_RESULTS_DIR"] = str((args.resume_store or Path(tmp) / "results").resolve())
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        plan = [True, False] if args.resumed else [args.fresh]
        rows = [run_study(args.config, args.set, fresh) for fresh in plan]
    print(f"\nStudy '{args.config}'{' ' + ' '.join(args.set) if args.set else ''}: stage wall times (from the "
          f"study run's metrics) and time in MLflow calls\n")
    print(table(rows))
    for row in rows:
        print(f"\nMLflow calls by time, {'fresh' if row['fresh'] else 'resumed'} run:\n")
        print(top_calls(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
