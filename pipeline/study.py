"""The study's steps as plain functions (cross-validate one fold, aggregate, retrain, export, evaluate, register).
flows/ chains them as Prefect tasks; a notebook or a test can call them directly."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline import attention, plots
from pipeline.config import Candidate, StudyConfig
from pipeline.data import DataError, MnistTensors, load_elsewhere, stratified_folds, test_set_id
from pipeline.export import export_onnx
from pipeline.inference import OnnxClassifier, evaluate_onnx, preferred_providers
from pipeline.model import build_model, count_parameters
from pipeline.report import EpochProgress, model_card, version_description
from pipeline.tracking import (Tracker, flatten, git_commit, package_versions, process_identity, promote,
                               run_process_gone)
from pipeline.train import FitResult, TrainingAborted, fit, resolve_device, to_pixels

ROLE = "vitflow.role"
PROGRESS_EVERY_S = 30.0  # at most one progress line per training this often (pipeline.report.EpochProgress)
PIPELINE_DIR = Path(__file__).resolve().parent


def code_version() -> str:
    """Hash of the library's source: cached fold results are reused only by the code that produced them."""
    digest = hashlib.sha256()
    for path in sorted(PIPELINE_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class Study:
    """Everything the steps share: the validated config, the data in memory, the folds and the tracker."""

    cfg: StudyConfig
    data: MnistTensors
    tracker: Tracker
    run_id: str = ""
    folds: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    selected: str = ""
    closed_abandoned: list[str] = field(default_factory=list)  # study runs of dead processes that start_study closed
    # Set when the study stops; fold tasks poll it between batches. A threading.Event, or any object with
    # set()/is_set() that pickles (the Dask runner's cluster-wide stop signal, flows/dask_runner.py).
    abort: Any = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.candidates = self.cfg.candidates()
        self.folds = stratified_folds(self.data.train_labels, self.cfg.cv.folds, self.cfg.cv.seed)
        self.code_version = code_version()
        self._data_ref: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What a fold task in another process or on another machine (a Dask worker) receives: everything but
        the tensors (the worker reloads the data from the data root and checks it against these MD5s, once per
        worker process: see ensure_data); an in-process threading.Event is replaced by a fresh one there."""
        state = dict(self.__dict__)
        data = state.pop("data")
        state.pop("folds")
        if data is not None:
            state["_data_ref"] = {"root": str(data.root), "md5": dict(data.md5)}
        if isinstance(state["abort"], threading.Event):
            state["abort"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.data, self.folds = None, []
        if self.abort is None:
            self.abort = threading.Event()

    def ensure_data(self) -> None:
        """Load the data where this study was unpickled (a Dask worker); a no-op where it was built. Refuses a
        worker whose library code differs from the flow's: its folds would be cached under the wrong key."""
        if self.data is not None:
            return
        here = code_version()
        if here != self.code_version:
            raise DataError(f"this worker's vitflow library (code version {here}) differs from the flow's "
                            f"({self.code_version}); run every worker from the same checkout or image")
        self.data = load_elsewhere(self.cfg.data, Path(self._data_ref["root"]), self._data_ref["md5"])
        self.folds = stratified_folds(self.data.train_labels, self.cfg.cv.folds, self.cfg.cv.seed)

    @property
    def key(self) -> str:
        """Same configuration, same data, same code -> same key: what a resumed study shares with the crashed one."""
        return _hash({"config": self.cfg.model_dump(mode="json"), "md5": self.data.md5, "code": self.code_version})

    def fold_key(self, index: int, fold_index: int) -> str:
        """Cache key of one fold's result: everything that determines it, nothing that does not (the device
        ``train.device`` resolves to here and torch's version included: either changes the arithmetic)."""
        cand = self.candidates[index]
        return _hash({"model": cand.model.model_dump(mode="json"), "train": cand.cv_train.model_dump(mode="json"),
                      "device": resolve_device(cand.cv_train.device).type, "torch": torch.__version__,
                      "folds": self.cfg.cv.folds, "cv_seed": self.cfg.cv.seed, "fold_index": fold_index,
                      "seed": fold_seed(self, index, fold_index), "md5": self.data.md5, "code": self.code_version,
                      "subset": self.cfg.data.model_dump(include={"train_subset", "subset_seed"})})

    def configuration_key(self, index: int) -> str:
        """Cache key of a configuration's k folds trained together (cv.batch_folds)."""
        return _hash({"folds": [self.fold_key(index, f) for f in range(self.cfg.cv.folds)], "batched": True})


def study_tags(study: Study, device: str) -> dict[str, Any]:
    tags = {ROLE: "study", "git_commit": git_commit(), "device": device, "preset": study.cfg.name,
            "config_fingerprint": study.cfg.fingerprint(), "data_root": str(study.data.root)}
    tags.update({f"data_md5.{name}": digest for name, digest in study.data.md5.items()})
    tags.update({f"version.{name}": v for name, v in package_versions().items()})
    return tags


def start_study(study: Study) -> str:
    device = str(resolve_device(study.cfg.train.device))
    params = flatten("", study.cfg.model_dump(mode="json"))
    params.update({"data.train_images": len(study.data.train_labels), "data.test_images": len(study.data.test_labels),
                   "cv.candidates": len(study.candidates)})
    tags = {**study_tags(study, device), "study_key": study.key, "code_version": study.code_version,
            "process": process_identity(), "heartbeat": str(int(time.time()))}  # beats on: tracking.Heartbeat
    crashed, running = find_crashed_study(study)
    if crashed is not None:
        tags["resumed_from"] = crashed
    if running:  # the same study, still running (or on another machine): left alone, both share the result store
        tags["concurrent_with"] = ",".join(running)
    abandoned = find_abandoned_studies(study, exclude=crashed)
    if abandoned:
        tags["closed_abandoned"] = ",".join(abandoned)[:5000]
    study.run_id = study.tracker.start_run(f"{study.cfg.name} study", tags=tags, params=params)
    study.tracker.set_tags(study.run_id, {"study_run_id": study.run_id})
    dead = ([(crashed, "the resumed study")] if crashed is not None else []) + [
        (run_id, "a later study in this experiment") for run_id in abandoned]
    for run_id, closer in dead:
        close_stale_runs(study, run_id, f"the process running it died; closed by {closer}")
        close_unpromoted_versions(study, run_id, f"its study died before the champion/challenger decision; "
                                                 f"closed by {closer}, study {study.run_id}")
    study.closed_abandoned = abandoned
    return study.run_id


def find_crashed_study(study: Study) -> tuple[str | None, list[str]]:
    """The latest earlier run of this very study (same key) that did not finish and whose process is gone, if any;
    and the same study's runs still RUNNING in a live process (a schedule and a manual run at once), or on another
    machine with a recent heartbeat: those are not taken over, their runs are not closed."""
    runs = study.tracker.client.search_runs(
        [study.tracker.experiment_id],
        filter_string=f"tags.`{ROLE}` = 'study' and tags.study_key = '{study.key}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=50)
    running = []
    for run in runs:
        if run.info.status == "RUNNING" and run.data.tags.get("process") and not run_process_gone(run.data.tags):
            running.append(run.info.run_id)
            continue
        return run.info.run_id, running
    return None, running


def find_abandoned_studies(study: Study, exclude: str | None = None) -> list[str]:
    """Studies of any configuration in this experiment still RUNNING though the process that ran them is gone (a
    SIGKILL, a reboot; on another machine: no heartbeat for HEARTBEAT_STALE_S): closed by whichever study starts
    next, not only by a rerun of the same one."""
    runs = study.tracker.client.search_runs(
        [study.tracker.experiment_id],
        filter_string=f"tags.`{ROLE}` = 'study' and attributes.status = 'RUNNING'", max_results=1000)
    return [run.info.run_id for run in runs if run.info.run_id != exclude and run_process_gone(run.data.tags)]


def close_unpromoted_versions(study: Study, crashed_run_id: str, reason: str) -> list[str]:
    """Model versions the crashed study registered (under whichever model name it used) but did not get to promote
    (killed in between): they hold no alias; tagged ``decision=none`` with the reason, so that nobody takes one for
    a vetted challenger."""
    client = study.tracker.client
    closed = []
    for version in client.search_model_versions(f"tags.study_run_id = '{crashed_run_id}'"):
        if "decision" not in version.tags:
            client.set_model_version_tag(version.name, version.version, "decision", "none")
            client.set_model_version_tag(version.name, version.version, "decision_reason", reason)
            closed.append(f"{version.name}/{version.version}")
    return closed


def close_stale_runs(study: Study, crashed_run_id: str, reason: str) -> list[str]:
    """Runs a killed process left RUNNING (SIGKILL leaves no chance to clean up) end KILLED, tagged with the
    study that closed them and why."""
    stale = study.tracker.client.search_runs(
        [study.tracker.experiment_id],
        filter_string=f"tags.study_run_id = '{crashed_run_id}' and attributes.status = 'RUNNING'", max_results=1000)
    for run in stale:
        study.tracker.set_tags(run.info.run_id, {"closed_by": study.run_id, "error": reason})
        study.tracker.end_run(run.info.run_id, "KILLED")
    return [r.info.run_id for r in stale]


def start_configuration(study: Study, index: int) -> str:
    cand = study.candidates[index]
    params = {"label": cand.label, "parameters": count_parameters(build_model(cand.model)),
              **flatten("model", cand.model.model_dump(mode="json")),
              **flatten("train", cand.cv_train.model_dump(mode="json"))}
    return study.tracker.start_run(cand.label, parent_id=study.run_id, params=params,
                                   tags={ROLE: "configuration", "configuration": cand.label,
                                         "candidate_index": index, "study_run_id": study.run_id})


def fold_seed(study: Study, index: int, fold_index: int) -> int:
    """Same seed per fold index for every configuration (configurations are compared on equal footing), from the
    configuration's own ``train.seed``: a grid over ``train.seed`` trains each point with its seed."""
    return study.candidates[index].cv_train.seed + 1000 * (fold_index + 1)


def train_fold(study: Study, index: int, fold_index: int, configuration_run_id: str,
               tags: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train one configuration on one fold; per-epoch metrics go to a fold run under the configuration's run,
    with ``tags`` saying where it ran (host, Dask worker). The returned dict is plain JSON (it is what the
    result store keeps for a resumed study). ``log`` gets progress lines when the fold takes longer than 30 s
    (``pipeline.report.EpochProgress``, quiet)."""
    study.ensure_data()
    cand = study.candidates[index]
    k = study.cfg.cv.folds
    train_idx, val_idx = study.folds[fold_index]
    x, y = study.data.train_images, study.data.train_labels
    name = f"fold {fold_index + 1}/{k}"
    where = {k: str(v) for k, v in (tags or {}).items()}
    with study.tracker.run(name, parent_id=configuration_run_id, tags={**_fold_tags(study, index, fold_index),
                                                                        **where},
                           params=_fold_params(study, index, fold_index)) as run_id:
        if study.abort.is_set():
            raise TrainingAborted(f"{cand.label} {name}: not started because the study is stopping")
        on_epoch = _EpochLog(study, [run_id], f"{cand.label} {name}", cand.cv_train.epochs, log)
        result = fit(cand.model, cand.cv_train, x[train_idx], y[train_idx], {"val": (x[val_idx], y[val_idx])},
                     seed=fold_seed(study, index, fold_index), desc=f"{cand.label} {name}",
                     should_stop=study.abort.is_set, callback=lambda epoch, m: on_epoch(0, epoch, m))
        study.tracker.log_metrics(run_id, {"fit_seconds": result.seconds})
    return {"candidate_index": index, "fold_index": fold_index, "run_id": run_id,
            "configuration_run_id": configuration_run_id, "history": result.history,
            "parameters": count_parameters(result.model), "seconds": result.seconds, "ran_on": where,
            **result.final}


class _EpochLog:
    """``(model index, epoch, metrics)`` -> the metrics into that model's MLflow run and, with ``log``, a progress
    line now and then (one reporter per model; with several, each line names its fold)."""

    def __init__(self, study: Study, run_ids: list[str], desc: str, epochs: int, log: Callable[[str], None] | None,
                 quiet: bool = True) -> None:
        self.tracker, self.run_ids = study.tracker, run_ids
        self.reporters = ([EpochProgress(desc if len(run_ids) == 1 else f"{desc} fold {f + 1}/{len(run_ids)}",
                                         epochs, log, every=PROGRESS_EVERY_S, quiet=quiet)
                           for f in range(len(run_ids))] if log is not None else [])

    def __call__(self, f: int, epoch: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_ids[f], metrics, step=epoch)
        if self.reporters:
            self.reporters[f](epoch, metrics)

    def replan(self, epochs: int) -> None:
        """The run's epoch count changed (a time budget): the progress lines count to the new one."""
        for reporter in self.reporters:
            reporter.epochs = epochs


def train_folds_batched(study: Study, index: int, configuration_run_id: str,
                        tags: dict[str, Any] | None = None,
                        log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """All k folds of one configuration trained together as one stacked model (pipeline.batched.fit_folds), one
    task instead of k (on an H100 the earlier vmap version's 3 folds cost 2.4x one fold: bench/README.md). Each
    fold still gets its own run with its own per-epoch metrics, and the same result dict as ``train_fold``.
    ``log``: progress lines, as for ``train_fold``."""
    from pipeline.batched import fit_folds

    study.ensure_data()
    cand = study.candidates[index]
    k = study.cfg.cv.folds
    x, y = study.data.train_images, study.data.train_labels
    where = {key: str(v) for key, v in (tags or {}).items()}
    with ExitStack() as runs:
        run_ids = [runs.enter_context(study.tracker.run(
            f"fold {f + 1}/{k}", parent_id=configuration_run_id,
            tags={**_fold_tags(study, index, f), **where, "batched_folds": k},
            params=_fold_params(study, index, f))) for f in range(k)]
        if study.abort.is_set():
            raise TrainingAborted(f"{cand.label}: not started because the study is stopping")
        results = fit_folds(cand.model, cand.cv_train, x, y, study.folds,
                            [fold_seed(study, index, f) for f in range(k)], desc=f"{cand.label} {k} folds",
                            should_stop=study.abort.is_set,
                            callback=_EpochLog(study, run_ids, cand.label, cand.cv_train.epochs, log))
        for run_id, result in zip(run_ids, results):
            study.tracker.log_metrics(run_id, {"fit_seconds": result.seconds})
    return [{"candidate_index": index, "fold_index": f, "run_id": run_ids[f],
             "configuration_run_id": configuration_run_id, "history": r.history,
             "parameters": count_parameters(r.model), "seconds": r.seconds, "ran_on": where, **r.final}
            for f, r in enumerate(results)]


def batch_folds(cfg: StudyConfig) -> bool:
    """cv.batch_folds: auto trains a configuration's folds as one stacked model on CUDA, one task per fold on CPU
    (where stacking gains nothing)."""
    if cfg.cv.batch_folds == "auto":
        return resolve_device(cfg.train.device).type == "cuda"
    return bool(cfg.cv.batch_folds)


def _fold_tags(study: Study, index: int, fold_index: int) -> dict[str, Any]:
    return {ROLE: "fold", "configuration": study.candidates[index].label, "fold_index": fold_index,
            "study_run_id": study.run_id, "fold_key": study.fold_key(index, fold_index)}


def _fold_params(study: Study, index: int, fold_index: int) -> dict[str, Any]:
    train_idx, val_idx = study.folds[fold_index]
    return {"fold_index": fold_index, "folds": study.cfg.cv.folds, "seed": fold_seed(study, index, fold_index),
            "train_images": len(train_idx), "val_images": len(val_idx)}


def record_cached_fold(study: Study, result: dict[str, Any], configuration_run_id: str) -> dict[str, Any]:
    """A fold reused from the result store still gets its run in this study's tree: the stored per-epoch metrics
    are replayed into it and it points at the run that trained it (tag ``cached_from``)."""
    index, fold_index = result["candidate_index"], result["fold_index"]
    tags = {**_fold_tags(study, index, fold_index), **result.get("ran_on", {}), "cached_from": result["run_id"]}
    with study.tracker.run(f"fold {fold_index + 1}/{study.cfg.cv.folds}", parent_id=configuration_run_id,
                           tags=tags, params=_fold_params(study, index, fold_index)) as run_id:
        for epoch, metrics in enumerate(result["history"], 1):
            study.tracker.log_metrics(run_id, metrics, step=epoch)
        study.tracker.log_metrics(run_id, {"fit_seconds": result["seconds"]})
    return {**result, "run_id": run_id, "configuration_run_id": configuration_run_id, "cached_from": result["run_id"]}


def aggregate(study: Study, fold_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leaderboard: mean and std (over folds, ddof=1) of the final-epoch metrics per configuration, best first.
    Ties on mean validation error go to the configuration with fewer parameters."""
    rows = []
    for index, cand in enumerate(study.candidates):
        results = sorted((r for r in fold_results if r["candidate_index"] == index), key=lambda r: r["fold_index"])
        if len(results) != study.cfg.cv.folds:
            raise RuntimeError(f"configuration {cand.label!r} has {len(results)} of {study.cfg.cv.folds} folds")
        row: dict[str, Any] = {"candidate_index": index, "label": cand.label, "overrides": cand.overrides,
                               "parameters": results[0]["parameters"]}
        for metric in ("train_loss", "train_error", "val_loss", "val_error"):
            values = np.array([r[metric] for r in results])
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        row["fold_val_errors"] = [r["val_error"] for r in results]
        row["fold_histories"] = [r["history"] for r in results]
        rows.append(row)
    rows.sort(key=lambda r: (round(r["val_error_mean"], 12), r["parameters"], r["candidate_index"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def close_configuration(study: Study, row: dict[str, Any], run_id: str) -> None:
    metrics = {k: v for k, v in row.items() if k.endswith(("_mean", "_std"))}
    metrics["rank"] = row["rank"]
    study.tracker.log_metrics(run_id, metrics)
    study.tracker.set_tags(run_id, {"selected": str(row["rank"] == 1).lower()})
    study.tracker.log_figure(run_id, plots.fold_curves(row["fold_histories"], row["label"]),
                             "figures/fold_curves.png")
    study.tracker.end_run(run_id)


def retrain_time_limit(cfg: StudyConfig, elapsed_s: float) -> float | None:
    """Seconds the final retraining may take under ``time_budget`` (None: no budget), after ``elapsed_s`` of the
    flow: what is left of ``flow_s`` less ``reserve_s``. May be 0 or less: the retraining then trains the epochs
    it needs to measure its pace (pipeline.train.PLAN_AFTER_EPOCHS) and stops."""
    budget = cfg.time_budget
    return None if budget.flow_s is None else budget.flow_s - elapsed_s - budget.reserve_s


def retrain(study: Study, leaderboard: list[dict[str, Any]], log: Callable[[str], None] | None = None,
            time_limit_s: float | None = None) -> tuple[FitResult, str]:
    """Retrain the selected configuration on all training images, evaluating on the test set every epoch.
    The ``final`` run stays open for export, evaluation and registration to log into. ``log`` gets progress lines
    (``pipeline.report.EpochProgress``: the first epoch, then about one every 30 s, and the last).
    ``time_limit_s`` (from the study's time budget): at most ``train.epochs``, as many as fit in that many seconds
    (``pipeline.train.EpochPlan``); the planned count is the run's ``epochs_planned`` parameter, and a later cut
    (the pace slowed) its ``epochs_cut_to`` tag."""
    started = time.perf_counter()
    best = study.candidates[leaderboard[0]["candidate_index"]]
    study.selected = best.label
    study.tracker.log_figure(study.run_id, plots.model_selection(leaderboard, best.label),
                             "figures/model_selection.png")
    study.tracker.log_figure(study.run_id, plots.fold_curves_grid(leaderboard, best.label), "figures/fold_curves.png")
    budget = {} if time_limit_s is None else {"time_limit_s": round(time_limit_s, 1)}
    run_id = study.tracker.start_run(
        "final", parent_id=study.run_id,
        tags={ROLE: "final", "configuration": best.label, "study_run_id": study.run_id},
        params={"configuration": best.label, **flatten("model", best.model.model_dump(mode="json")),
                **flatten("train", best.train.model_dump(mode="json")), **budget,
                "train_images": len(study.data.train_labels), "test_images": len(study.data.test_labels)})
    data = study.data
    desc = f"final {best.label}"
    on_epoch = _EpochLog(study, [run_id], desc, best.train.epochs, log, quiet=False)

    plans: list[int] = []

    def on_plan(epochs: int, why: str) -> None:
        if not plans:  # the plan; a later cut (a slower pace) is a tag: parameters cannot change
            study.tracker.log_params(run_id, {"epochs_planned": epochs})
        else:
            study.tracker.set_tags(run_id, {"epochs_cut_to": epochs})
        plans.append(epochs)
        on_epoch.replan(epochs)
        if log is not None:
            log(why)

    result = fit(best.model, best.train, data.train_images, data.train_labels,
                 {"test": (data.test_images, data.test_labels)}, seed=best.train.seed,
                 desc=desc, callback=lambda epoch, m: on_epoch(0, epoch, m), on_plan=on_plan,
                 time_limit_s=None if time_limit_s is None else time_limit_s - (time.perf_counter() - started))
    study.tracker.log_metrics(run_id, {"fit_seconds": result.seconds, "parameters": count_parameters(result.model),
                                       "torch_test_accuracy": 1 - result.final["test_error"]})
    study.tracker.log_figure(run_id, plots.model_selection(leaderboard, best.label), "figures/model_selection.png")
    study.tracker.log_figure(run_id, plots.learning_curves(
        result.history, f"Final model ({best.label}) trained on {len(data.train_labels)} images"),
        "figures/learning_curves.png")
    log_attention(study, result.model, run_id)
    return result, run_id


def one_per_class(labels: Tensor, classes: int = 10) -> list[int]:
    """Index of the first image of each class, in class order (classes absent from ``labels`` are skipped)."""
    return [int(hits[0]) for c in range(classes) if len(hits := torch.nonzero(labels == c).flatten())]


def log_attention(study: Study, model: torch.nn.Module, run_id: str) -> None:
    """Class-token attention (last block per head, rollout across blocks) on one test digit of each class; the
    average token's for a model without a class token (``model.pool: mean``)."""
    index = one_per_class(study.data.test_labels, model.cfg.num_classes)
    images = study.data.test_images[index]
    maps = attention.summarize(model, to_pixels(images))
    figure = plots.attention_maps(images.numpy(), study.data.test_labels[index].tolist(), maps.predictions.tolist(),
                                  maps.last_block.numpy(), maps.rollout.numpy(),
                                  f"Attention of the final model ({study.selected}), one test digit per class",
                                  pool=model.cfg.pool)
    study.tracker.log_figure(run_id, figure, "figures/attention.png")


def export(study: Study, result: FitResult, run_id: str, directory: str | os.PathLike) -> tuple[Path, dict]:
    """ONNX file for the final model, parity-checked against PyTorch on real test images."""
    path = Path(directory) / f"{study.run_id}.onnx"
    sample = to_pixels(study.data.test_images[: study.cfg.export.parity_batch])
    figures = export_onnx(result.model, path, sample, atol=study.cfg.export.parity_atol,
                          metadata={"study_run_id": study.run_id, "final_run_id": run_id,
                                    "configuration": study.selected})
    study.tracker.log_metrics(run_id, figures)
    return path, figures


def evaluate(study: Study, onnx_path: Path, run_id: str) -> dict[str, Any]:
    """Test-set accuracy through ONNX Runtime, the provider that ran, and the confusion matrix."""
    labels = study.data.test_labels.numpy()
    report = evaluate_onnx(onnx_path, study.data.test_images.numpy(), labels)
    # test_accuracy is the headline (ONNX Runtime); test_error/test_loss per epoch come from PyTorch during training.
    study.tracker.log_metrics(run_id, {"test_accuracy": report["test_accuracy"],
                                       "onnx_images_per_second": report["images_per_second"]})
    study.tracker.set_tags(run_id, {"onnxruntime_provider": report["provider"]})
    study.tracker.set_tags(study.run_id, {"onnxruntime_provider": report["provider"]})
    study.tracker.log_figure(run_id, plots.confusion_matrix(labels, report["predictions"],
                                                            "Test confusion matrix (ONNX Runtime)"),
                             "figures/confusion_matrix.png")
    study.tracker.log_figure(run_id, plots.misclassified(study.data.test_images.numpy(), labels,
                                                         report["probabilities"],
                                                         "Misclassified test images (ONNX Runtime)"),
                             "figures/misclassified.png")
    return {k: v for k, v in report.items() if k not in ("predictions", "probabilities")}


def model_requirements() -> list[str]:
    """What loading a logged model through MLflow's pyfunc needs, stated rather than inferred: MLflow's inference
    loads the model in a subprocess to see what it imports, ~2.7 s per logged model on 2 cores, to find the same
    four distributions (onnxruntime-gpu, where installed, is a deployment's choice, not a requirement)."""
    import mlflow
    import mlflow.onnx
    import numpy

    return [f"mlflow=={mlflow.__version__}", f"numpy=={numpy.__version__}",
            *mlflow.onnx.get_default_pip_requirements()]


def register(study: Study, onnx_path: Path, run_id: str, report: dict[str, Any]) -> dict[str, Any]:
    """Log the ONNX model into the final run, register a new version, and move the aliases."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    sample = to_pixels(study.data.test_images[:4]).numpy()
    signature = infer_signature(sample, OnnxClassifier(onnx_path, device="cpu").logits(sample))
    name = study.cfg.tracking.registered_model
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model",
                                     signature=signature, input_example=sample[:2], save_as_external_data=False,
                                     onnx_execution_providers=preferred_providers(),
                                     pip_requirements=model_requirements())
    study.tracker.end_run(run_id)  # start_run's exit finished it; keep the tracker's bookkeeping in step
    test_set = test_set_id(study.cfg.data.test_subset, study.cfg.data.subset_seed,
                           study.data.md5.get("t10k-images-idx3-ubyte"))
    # The version is created with its evaluation tags in one call: a kill between registering and tagging left a
    # version that said nothing about itself. One killed before the promotion below has no `decision` and no
    # alias; the study that resumes this one marks it (close_unpromoted_versions).
    version = str(mlflow.register_model(info.model_uri, name, tags={
        "test_accuracy": report["test_accuracy"], "test_set": test_set, "study_run_id": study.run_id,
        "final_run_id": run_id, "onnxruntime_provider": report["provider"], "preset": study.cfg.name}).version)
    client = study.tracker.client
    decision = promote(client, name, version, report["test_accuracy"], study.cfg.tracking.champion_margin,
                       test_set)
    study.tracker.set_tags(study.run_id, {"registered_model": name, "registered_version": version,
                                          "alias": decision["alias"], "alias_reason": decision["reason"]})
    return {"model_name": name, "model_uri": f"models:/{name}/{version}", **decision}


def summarize(study: Study, leaderboard: list[dict[str, Any]], result: FitResult, final_run_id: str,
              onnx_path: Path, parity: dict[str, float], evaluation: dict[str, Any], registration: dict[str, Any],
              timings: dict[str, float]) -> dict[str, Any]:
    """Everything a person reads about the study, as plain data: the source of the model card, the Prefect
    summary artifact and ``vitflow run``'s terminal summary."""
    cfg, data = study.cfg, study.data
    best = study.candidates[leaderboard[0]["candidate_index"]]
    return {
        "study": cfg.name, "description": cfg.description, "experiment": cfg.experiment_name,
        "tracking_uri": study.tracker.uri, "study_run_id": study.run_id, "final_run_id": final_run_id,
        "device": result.device, "git_commit": git_commit(),
        "config_fingerprint": cfg.fingerprint(),
        "data": {"root": str(data.root), "train_images": len(data.train_labels), "test_images": len(data.test_labels),
                 "train_subset": cfg.data.train_subset, "test_subset": cfg.data.test_subset, "md5": dict(data.md5)},
        "configuration": {"model": best.model.model_dump(mode="json"), "train": best.train.model_dump(mode="json")},
        "grid": cfg.cv.grid, "parameters": leaderboard[0]["parameters"],
        "leaderboard": [{k: v for k, v in row.items() if k != "fold_histories"} for row in leaderboard],
        "selected": leaderboard[0]["label"], "final_history": result.history,
        "epochs_trained": len(result.history), "time_budget": cfg.time_budget.model_dump(mode="json"),
        "onnx_path": str(onnx_path), **parity, **evaluation, "registration": registration, "timings": timings,
    }


def publish_model_card(study: Study, summary: dict[str, Any]) -> str:
    """The model card: logged as model_card.md on the final run and set as the registered version's description."""
    card = model_card(summary)
    reg = summary["registration"]
    study.tracker.log_text(summary["final_run_id"], card, "model_card.md")
    study.tracker.client.update_model_version(reg["model_name"], reg["version"],
                                              description=version_description(summary, card))
    return card


def quantize(study: Study, onnx_path: Path, run_id: str) -> dict[str, Any]:
    """int8 variant of the exported model (ONNX Runtime dynamic quantization), written next to the fp32 file.
    Accuracy, size and CPU throughput of both go to the final run (int8_test_accuracy, int8_accuracy_drop,
    int8_size_kb, fp32_size_kb, int8_images_per_second, fp32_images_per_second), the int8 model is logged there
    as a second model ("model-int8"), and registered as "<tracking.registered_model>-int8" only when its accuracy
    drop is within export.int8_max_accuracy_drop. Skipped when export.quantize is false; a model ONNX Runtime
    cannot quantize is recorded (tag int8_error) without failing the study."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    from pipeline import quantize as quant

    cfg = study.cfg.export
    if not cfg.quantize:
        return {"int8_registered": False, "int8_reason": "export.quantize is false"}
    try:
        int8_path = quant.quantize_int8(onnx_path, quant.int8_path_for(onnx_path))
    except quant.QuantizationError as exc:
        study.tracker.set_tags(run_id, {"int8_error": str(exc)[:5000], "int8_registered": "false"})
        return {"int8_registered": False, "int8_reason": f"quantization failed: {exc}"}
    figures = quant.compare(onnx_path, int8_path, study.data.test_images.numpy(), study.data.test_labels.numpy())
    study.tracker.log_metrics(run_id, {k: figures[k] for k in (
        "int8_test_accuracy", "int8_accuracy_drop", "int8_size_kb", "fp32_size_kb", "int8_images_per_second",
        "fp32_images_per_second", "int8_agreement")})
    drop, bound = figures["int8_accuracy_drop"], cfg.int8_max_accuracy_drop
    accepted = drop <= bound
    reason = (f"int8 test accuracy {figures['int8_test_accuracy']:.4f} vs fp32 {figures['fp32_test_accuracy']:.4f}: "
              f"drop {drop:+.4f} {'within' if accepted else 'over'} export.int8_max_accuracy_drop={bound}")
    name = f"{study.cfg.tracking.registered_model}-int8"
    sample = to_pixels(study.data.test_images[:4]).numpy()
    signature = infer_signature(sample, OnnxClassifier(int8_path, device="cpu").logits(sample))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(onnx.load(str(int8_path)), name="model-int8", signature=signature,
                                     input_example=sample[:2], save_as_external_data=False,
                                     onnx_execution_providers=["CPUExecutionProvider"],
                                     pip_requirements=model_requirements())
    study.tracker.client.update_run(run_id, status="RUNNING")  # start_run's exit ended it; register-model ends it
    tags = {"int8_registered": str(accepted).lower(), "int8_reason": reason, "int8_path": str(int8_path)}
    out = {**figures, "int8_path": str(int8_path), "int8_registered": accepted, "int8_reason": reason}
    if accepted:  # registered with its tags in one call, as the fp32 model
        version = str(mlflow.register_model(info.model_uri, name, tags={
            "test_accuracy": figures["int8_test_accuracy"], "accuracy_drop": drop,
            "fp32_model": study.cfg.tracking.registered_model, "final_run_id": run_id, "study_run_id": study.run_id,
            "quantization": "ONNX Runtime dynamic, int8 weights", "preset": study.cfg.name}).version)
        tags["int8_model_uri"] = out["int8_model_uri"] = f"models:/{name}/{version}"
    study.tracker.set_tags(run_id, tags)
    return out
