"""The Prefect flow ``vit-pipeline``: acquire data -> one task per (configuration, fold) -> aggregate -> retrain
the best -> export ONNX -> evaluate with ONNX Runtime -> register. Each task is a thin call into pipeline/."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.context import FlowRunContext  # noqa: E402
from prefect.futures import as_completed, wait  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402

from flows import dask_runner  # noqa: E402
from pipeline import data as data_lib  # noqa: E402
from pipeline import report as report_lib  # noqa: E402
from pipeline import study as steps  # noqa: E402
from pipeline.config import DataConfig, StudyConfig, load_config  # noqa: E402
from pipeline.tracking import PROJECT_ROOT, Heartbeat, Tracker, failure_status, tracking_uri  # noqa: E402
from pipeline.train import PLAN_AFTER_EPOCHS, configure_threads, resolve_device  # noqa: E402

MAX_FOLD_WORKERS = 16
RESULTS_DIR_ENV = "VITFLOW_RESULTS_DIR"


def results_dir() -> Path:
    """Where finished folds are kept for resuming: $VITFLOW_RESULTS_DIR, default .vitflow/results (git-ignored)."""
    return Path(os.environ.get(RESULTS_DIR_ENV) or PROJECT_ROOT / ".vitflow" / "results").resolve()


def _retry_download_only(task, task_run, state) -> bool:
    """Retry network failures; a missing file with downloads off, or a corrupt file, will not heal by waiting."""
    try:
        state.result()
    except data_lib.DownloadError:
        return True
    except Exception:
        return False
    return False


@task(name="acquire-data", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_download_only,
      cache_policy=NO_CACHE)
def acquire_data(data_cfg: DataConfig) -> tuple[Path, dict[str, str]]:
    """Download MNIST when missing (torchvision, retried on network errors), then verify every file's md5."""
    root, md5 = data_lib.acquire(data_cfg)
    get_run_logger().info("MNIST verified under %s", data_lib.raw_dir(root))
    return root, md5


class Opaque:
    """A task argument that Prefect passes on without looking inside (as ``quote`` does) and that survives the
    trip to a Dask worker: ``quote`` is a tuple subclass, which Dask's transport turns into a plain tuple."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __getstate__(self) -> tuple[Any]:
        return (self.value,)

    def __setstate__(self, state: tuple[Any]) -> None:
        self.value = state[0]


def _fold_cache_key(context, parameters: dict[str, Any]) -> str:
    return parameters["cache_key"]  # configuration + fold + data md5 + code version (pipeline.study.Study.fold_key)


@task(name="train-fold", task_run_name="{label} fold {fold_number}", cache_key_fn=_fold_cache_key,
      persist_result=True, result_serializer="json")
def train_fold(study: Opaque, index: int, fold_index: int, configuration_run_id: str, label: str,
               fold_number: int, cache_key: str) -> dict[str, Any]:
    """One fold; its result is kept in the result store, so a re-run of a crashed study skips it. On a Dask
    worker the study arrives without its tensors and reloads them there (pipeline.study.Study.ensure_data)."""
    study: steps.Study = study.value
    where = dask_runner.worker_tags()
    if "dask.worker" in where:
        configure_threads(study.cfg.train.threads or 1)  # one torch thread per Dask thread
    result = steps.train_fold(study, index, fold_index, configuration_run_id, tags=where, log=get_run_logger().info)
    get_run_logger().info("%s fold %d: val_error %.4f (%.1f s) on %s", label, fold_number, result["val_error"],
                          result["seconds"], where.get("dask.worker", where["host"]))
    return result


@task(name="train-configuration", task_run_name="{label} {folds} folds batched", cache_key_fn=_fold_cache_key,
      persist_result=True, result_serializer="json")
def train_configuration(study: Opaque, index: int, configuration_run_id: str, label: str, folds: int,
                        cache_key: str) -> list[dict[str, Any]]:
    """The k folds of one configuration as one stacked model (cv.batch_folds; CUDA by default), one run each."""
    study: steps.Study = study.value
    where = dask_runner.worker_tags()
    results = steps.train_folds_batched(study, index, configuration_run_id, tags=where, log=get_run_logger().info)
    get_run_logger().info("%s: %d folds in %.1f s, val_error %s", label, folds, results[0]["seconds"],
                          ", ".join(f"{r['val_error']:.4f}" for r in results))
    return results


@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate(study: steps.Study, fold_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return steps.aggregate(study, fold_results)


@task(name="retrain-best", cache_policy=NO_CACHE)
def retrain(study: steps.Study, leaderboard: list[dict[str, Any]], time_limit_s: float | None = None):
    return steps.retrain(study, leaderboard, log=get_run_logger().info,  # progress lines in the task's log
                         time_limit_s=time_limit_s)


@task(name="export-onnx", cache_policy=NO_CACHE)
def export_onnx(study: steps.Study, result, run_id: str, directory: str):
    return steps.export(study, result, run_id, directory)


@task(name="evaluate-onnx", cache_policy=NO_CACHE)
def evaluate_onnx(study: steps.Study, onnx_path: Path, run_id: str) -> dict[str, Any]:
    return steps.evaluate(study, onnx_path, run_id)


@task(name="quantize-onnx", cache_policy=NO_CACHE)
def quantize_onnx(study: steps.Study, onnx_path: Path, run_id: str) -> dict[str, Any]:
    return steps.quantize(study, onnx_path, run_id)


@task(name="register-model", cache_policy=NO_CACHE)
def register(study: steps.Study, onnx_path: Path, run_id: str, report: dict[str, Any]) -> dict[str, Any]:
    return steps.register(study, onnx_path, run_id, report)


@task(name="model-card", cache_policy=NO_CACHE)
def model_card(study: steps.Study, summary: dict[str, Any]) -> str:
    return steps.publish_model_card(study, summary)


def fold_concurrency(cfg: StudyConfig, jobs: int) -> int:
    if cfg.cv.concurrency:
        return min(cfg.cv.concurrency, jobs)
    if resolve_device(cfg.train.device).type == "cuda":
        # Small models leave the GPU launch-bound; 4 threads launching at once cut the seed CV 1.5x on an H200.
        return min(4, jobs)
    return max(1, min(os.cpu_count() or 1, jobs))  # tiny models: one thread per task scales better than intra-op


def _on_dask(cfg: StudyConfig, config: str, overrides: list[str] | None, fresh: bool,
             dask_address: str | None) -> dict[str, Any]:
    """The same flow as a subflow whose task runner is prefect-dask's DaskTaskRunner (how a deployment, whose
    task runner is fixed, runs with runner=dask; the CLI goes the same way)."""
    address = dask_runner.preflight(tracking_uri(cfg.tracking), dask_address)
    jobs = len(cfg.candidates()) * cfg.cv.folds
    runner = dask_runner.task_runner(address, local_workers=fold_concurrency(cfg, jobs))
    with dask_runner.prefect_api_for_workers():
        return vit_pipeline.with_options(task_runner=runner)(config=config, overrides=overrides, fresh=fresh,
                                                             runner="dask", dask_address=address)


@flow(name="vit-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=MAX_FOLD_WORKERS), log_prints=True)
def vit_pipeline(config: str = "seed", overrides: list[str] | None = None, fresh: bool = False,
                 runner: str = "local", dask_address: str | None = None) -> dict[str, Any]:
    """Run a study: ``config`` is a preset name (configs/<name>.yaml) or a YAML path; ``overrides`` are
    ``key=value`` strings (e.g. ``train.epochs=2``). Folds finished by an earlier run of the same study (same
    configuration, data and code) are reused from the result store unless ``fresh`` is set. ``runner="dask"``
    trains the fold tasks on the Dask scheduler at ``dask_address`` (tcp://HOST:8786), or on a LocalCluster
    sized to this machine when no address is given; it needs an MLflow tracking server (HTTP URI)."""
    started = time.perf_counter()
    cfg = load_config(config, overrides)  # fails here, before any work, on a bad configuration
    dask_runner.check_runner(runner)
    active_runner = FlowRunContext.get().task_runner
    on_dask = dask_runner.is_dask_runner(active_runner)
    if runner == "dask" and not on_dask:
        return _on_dask(cfg, config, overrides, fresh, dask_address)
    logger = get_run_logger()
    timings: dict[str, float] = {}

    mark = time.perf_counter()
    root, md5 = acquire_data(cfg.data)
    dataset = data_lib.load(cfg.data, root=root, md5=md5)
    timings["data_s"] = time.perf_counter() - mark
    logger.info("data: %s", dataset.summary())

    tracker = Tracker(tracking_uri(cfg.tracking), cfg.experiment_name)
    study = steps.Study(cfg=cfg, data=dataset, tracker=tracker)
    cluster = None
    if on_dask:
        dask_runner.require_tracking_server(tracker.uri)
        cluster = dask_runner.attach(active_runner, tracker.uri)
        study.abort = dask_runner.ClusterStop(f"vitflow-stop-{uuid.uuid4().hex}", cluster["client"])
    running: list = []
    heartbeat = None
    try:
        steps.start_study(study)
        heartbeat = Heartbeat(tracker, study.run_id)  # how a study on another machine is known to be alive
        if study.closed_abandoned:
            logger.warning("closed %d study run(s) left RUNNING by a process that is gone: %s (their MLflow runs "
                           "are now KILLED, tagged closed_by=%s)", len(study.closed_abandoned),
                           ", ".join(study.closed_abandoned), study.run_id)
        batched = steps.batch_folds(cfg)
        if batched:  # one task per configuration, its folds trained as one stacked model
            jobs = [(i, None) for i in range(len(study.candidates))]
        else:
            jobs = [(i, f) for i in range(len(study.candidates)) for f in range(cfg.cv.folds)]
        if cluster is None:
            workers = fold_concurrency(cfg, len(jobs))
            if workers > 1 and cfg.train.compile != "off" and not batched:
                # torch.compile is not thread-safe: two fold tasks compiling in one process fail ("FX to
                # symbolically trace a dynamo-optimized function"). One at a time, with all the cores; the
                # compiled code is reused by every later fold of the same architecture.
                logger.warning("train.compile=%s: fold tasks run one at a time (torch.compile is not thread-safe); "
                               "for concurrent compiled folds use --runner dask (one process per worker)",
                               cfg.train.compile)
                workers = 1
            where = f"threads on {dask_runner.worker_tags()['host']}"
            run_tags = {"runner": "local"}
        else:  # as many folds in flight as the cluster has worker threads; Dask places them
            workers = max(1, min(cluster["threads"], len(jobs)))
            names = sorted(w["name"] for w in cluster["workers"].values())
            where = f"Dask at {cluster['scheduler']}, {len(names)} worker(s): {', '.join(names)}"
            run_tags = {"runner": "dask", "dask.scheduler": cluster["scheduler"],
                        "dask.workers": ",".join(names)[:5000]}
        tracker.set_tags(study.run_id, run_tags)
        threads = configure_threads(cfg.train.threads, workers)
        logger.info("cross-validation: %d configurations x %d folds, %d %s at once (%s), %d torch thread(s) each",
                    len(study.candidates), cfg.cv.folds, workers,
                    "configurations (folds batched)" if batched else "folds", where,
                    cfg.train.threads or 1 if cluster else threads)

        mark = time.perf_counter()
        config_runs = [steps.start_configuration(study, i) for i in range(len(study.candidates))]
        store = {"result_storage": results_dir(), "refresh_cache": fresh or not cfg.cv.resume}
        fold_task = train_fold.with_options(**store)
        configuration_task = train_configuration.with_options(**store)
        results = []
        asked: dict[Any, int] = {}  # future -> the configuration (grid position) that submitted it

        def collect(future) -> None:
            out, index = future.result(), asked.pop(future)
            # A result served from the store was trained under the same key, but maybe in a study whose grid had
            # another order or other points: it belongs to the configuration that asked for it in this study.
            results.extend({**r, "candidate_index": index} for r in (out if isinstance(out, list) else [out]))

        for index, fold_index in jobs:
            if len(running) >= workers:
                done = next(as_completed(running))
                running.remove(done)
                collect(done)
            label = study.candidates[index].label
            if fold_index is None:
                running.append(configuration_task.submit(Opaque(study), index, config_runs[index], label,
                                                         cfg.cv.folds, study.configuration_key(index)))
                asked[running[-1]] = index
            else:
                running.append(fold_task.submit(Opaque(study), index, fold_index, config_runs[index], label,
                                                fold_index + 1, study.fold_key(index, fold_index)))
                asked[running[-1]] = index
        while running:
            collect(running.pop(0))
        for i, result in enumerate(results):
            if result["configuration_run_id"] != config_runs[result["candidate_index"]]:  # served from the cache
                results[i] = steps.record_cached_fold(study, result, config_runs[result["candidate_index"]])
        reused = sum("cached_from" in r for r in results)
        tracker.log_metrics(study.run_id, {"folds_reused": reused, "folds_trained": len(results) - reused})
        if reused:
            logger.info("resumed: %d of %d folds reused from the result store %s", reused, len(results),
                        results_dir())
        leaderboard = aggregate(quote(study), results)
        for row in leaderboard:
            steps.close_configuration(study, row, config_runs[row["candidate_index"]])
        timings["cv_s"] = time.perf_counter() - mark
        create_markdown_artifact(key="cv-leaderboard", markdown=report_lib.cv_table_markdown(leaderboard),
                                 description=f"{cfg.name}: cross-validation leaderboard")

        mark = time.perf_counter()
        configure_threads(cfg.train.threads, 1)  # the retraining runs alone: all cores are its own
        time_limit_s = steps.retrain_time_limit(cfg, mark - started)
        if time_limit_s is not None and time_limit_s <= 0:
            logger.warning("time budget: the flow's %.0f s are spent before the retraining (%.0f s so far, %.0f s "
                           "kept for export, evaluation and registry); it trains only the %d epochs that measure its "
                           "pace. Raise time_budget.flow_s, or shorten the CV (cv.epochs, cv.grid)",
                           cfg.time_budget.flow_s, mark - started, cfg.time_budget.reserve_s, PLAN_AFTER_EPOCHS)
        elif time_limit_s is not None:
            logger.info("time budget: %.0f s of the flow's %.0f s are left for the retraining (%.0f s so far, %.0f s "
                        "kept for export, evaluation and registry)", time_limit_s, cfg.time_budget.flow_s,
                        mark - started, cfg.time_budget.reserve_s)
        result, final_run = retrain(quote(study), leaderboard, time_limit_s)
        timings["retrain_s"] = time.perf_counter() - mark

        mark = time.perf_counter()
        onnx_path, parity = export_onnx(quote(study), quote(result), final_run,
                                        str(PROJECT_ROOT / "models" / cfg.experiment_name))
        timings["export_s"] = time.perf_counter() - mark

        mark = time.perf_counter()
        report = evaluate_onnx(quote(study), onnx_path, final_run)
        timings["evaluate_s"] = time.perf_counter() - mark

        mark = time.perf_counter()
        quantized = quantize_onnx(quote(study), onnx_path, final_run)
        logger.info("int8: %s", quantized["int8_reason"])
        timings["quantize_s"] = time.perf_counter() - mark

        mark = time.perf_counter()
        registration = register(quote(study), onnx_path, final_run, report)
        timings["register_s"] = time.perf_counter() - mark
        timings["total_s"] = time.perf_counter() - started
        tracker.log_metrics(study.run_id, {**timings, "test_accuracy": report["test_accuracy"],
                                           "best_val_error_mean": leaderboard[0]["val_error_mean"]})
        summary = steps.summarize(study, leaderboard, result, final_run, onnx_path, parity, report, registration,
                                  timings)
        summary["folds_reused"], summary["folds_trained"] = reused, len(results) - reused
        summary["fold_runner"] = where
        card = model_card(quote(study), summary)  # model_card.md on the final run, the version's description
        logger.info("%s", report_lib.result_line(summary))
        heartbeat.stop()
        tracker.end_run(study.run_id)
    except BaseException as exc:
        if heartbeat is not None:
            heartbeat.stop()
        status = failure_status(exc)
        study.abort.set()  # folds still training stop at their next epoch boundary
        wait(running, timeout=600)
        closed = tracker.close_open_runs(status)
        if study.run_id:
            tracker.set_tags(study.run_id, {"error": f"{type(exc).__name__}: {exc}"[:5000]})
        logger.error("study failed (%s: %s); %d MLflow run(s) marked %s", type(exc).__name__, exc, len(closed),
                     status)
        raise

    create_markdown_artifact(key="study-summary", markdown=card,
                             description=f"{cfg.name}: model card of {registration['model_uri']} "
                                         f"(@{registration['alias']})")
    return summary
