"""``vitflow predict`` and ``vitflow evaluate``: use a trained model (an .onnx file or a registered MLflow model)
on real images, arrays and IDX files, and measure it on the MNIST test set.

Exit codes: 0 all went well, 1 something failed (an input that could not be read; the others are still
predicted), 2 a usage error (bad option, a model that cannot be found or loaded).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "models:/vit-mnist@champion"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _test_subset(text: str) -> int:
    value = _positive_int(text)
    if not 10 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"{value}: the test set has 10,000 images, and a stratified subset needs "
                                         f"one of each of the 10 digits; use 10 to 10000")
    return value


def _top_k(text: str) -> int:
    value = _positive_int(text)
    if value > 10:
        raise argparse.ArgumentTypeError(f"{value}: there are only 10 digits")
    return value


def _err(message: str) -> None:
    print(f"vitflow: {message}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_classifier(args: argparse.Namespace):
    """The classifier, or None after one line on stderr saying why the model cannot be used."""
    import os

    from pipeline.inference import ModelNotFound, OnnxClassifier

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for problems only

    try:
        return OnnxClassifier(args.model, device=args.device)
    except ModelNotFound as exc:
        hint = " (train and register one with `vitflow run`, or pass --model)" if args.model == DEFAULT_MODEL else ""
        _err(f"model: {exc}{hint}")
    except Exception as exc:  # not an ONNX file, unsupported opset, a CUDA request without a GPU ...
        _err(f"model: cannot load {args.model}: {type(exc).__name__}: {_one_line(exc)}")
    return None


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help="an .onnx file, a folder holding one, or an MLflow URI: models:/NAME@ALIAS, "
                             "models:/NAME/VERSION, models:/NAME/latest, runs:/RUN_ID/model (registry: "
                             f"$MLFLOW_TRACKING_URI, else the project's mlflow/ store; default: {DEFAULT_MODEL})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="ONNX Runtime provider: auto (CUDA when a GPU is present, else CPU), cpu, cuda")
    parser.add_argument("--batch-size", type=_positive_int, default=1024,
                        help="images per ONNX Runtime call (default 1024)")


# --------------------------------------------------------------------------------------------- predict


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns: input, digit, probability, top-k (digit:probability ...)."""
    table = [("input", "digit", "probability", f"top-{len(rows[0]['top_k'])}" if rows else "top-k")]
    for row in rows:
        top = "  ".join(f"{t['digit']}:{t['probability']:.3f}" for t in row["top_k"])
        table.append((row["input"], str(row["digit"]), f"{row['probability']:.3f}", top))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    return "\n".join(f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2].ljust(widths[2])}  {r[3]}".rstrip()
                     for r in table)


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from pipeline.preprocess import InputError, Sample, load_samples

    if args.max_pixels <= 0:
        _err("predict: --max-pixels must be positive")
        return 2
    clf = _load_classifier(args)
    if clf is None:
        return 2
    samples: list[Sample] = []
    failures = 0
    for item in args.inputs:
        files = _expand(item)
        if files is None:
            _err(f"{item}: empty folder, nothing to predict")
            failures += 1
            continue
        for path in files:
            try:
                samples.extend(load_samples(path, max_pixels=args.max_pixels))
            except InputError as exc:
                _err(f"{path}: {exc}")
                failures += 1
            except Exception as exc:  # a reader bug must not cost the other inputs their predictions
                _err(f"{path}: unexpected {type(exc).__name__}: {_one_line(exc)}")
                failures += 1
    rows = []
    if samples:
        pixels = np.stack([s.pixels for s in samples])[:, None]
        probabilities = clf.probabilities(pixels, args.batch_size)
        k = min(args.top_k, probabilities.shape[1])
        for sample, p in zip(samples, probabilities):
            order = np.argsort(-p, kind="stable")[:k]
            rows.append({"input": sample.name, "file": sample.source, "index": sample.index, "digit": int(order[0]),
                         "probability": float(p[order[0]]),
                         "top_k": [{"digit": int(d), "probability": float(p[d])} for d in order]})
    if args.json:
        for row in rows:
            print(json.dumps(row))
    elif rows:
        print(format_table(rows))
        print(f"\n{len(rows)} prediction(s) by {clf.source.label} on {clf.provider}"
              + (f"; {failures} input(s) failed (see above)" if failures else ""))
    sys.stdout.flush()
    return 1 if failures else 0


def _expand(item: str) -> list[str] | None:
    """A folder stands for its files (name order); None for an empty folder."""
    from pipeline.preprocess import expand_inputs

    if Path(item).is_dir():
        files = list(expand_inputs([item]))
        return files or None
    return [item]


# -------------------------------------------------------------------------------------------- evaluate


def format_evaluation(result: dict[str, Any], source_label: str, uri: str, data_root: str) -> str:
    per_class = result["per_class"]
    lines = [
        f"Model:       {uri}" + (f"  ({source_label})" if source_label != uri else ""),
        f"Test set:    {result['test_images']:,} MNIST test images from {data_root}",
        f"Accuracy:    {100 * result['test_accuracy']:.2f}% ({result['correct']:,} / {result['test_images']:,})",
        f"Provider:    {result['provider']}",
        f"Throughput:  {result['images_per_second']:,.0f} images/s (batches of {result['batch_size']})",
        "",
        "digit  images  correct  accuracy",
    ]
    for digit, row in per_class.items():
        accuracy = "-" if math.isnan(row["accuracy"]) else f"{100 * row['accuracy']:.2f}%"
        lines.append(f"{digit:<5}  {row['images']:>6}  {row['correct']:>7}  {accuracy:>8}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.config import DataConfig
    from pipeline.data import DataError, acquire, load
    from pipeline.evaluation import confusion_figure, evaluate_classifier, log_evaluation

    if args.figure:  # before the evaluation, not after it
        from matplotlib.figure import Figure

        figure = Path(args.figure)
        formats = Figure().canvas.get_supported_filetypes()
        if not figure.parent.is_dir():
            _err(f"--figure {args.figure}: folder {figure.parent} does not exist; create it or pick another path")
            return 2
        if figure.suffix.lstrip(".").lower() not in formats:
            _err(f"--figure {args.figure}: unknown image format {figure.suffix or '(no extension)'}; use one of "
                 f"{', '.join('.' + f for f in sorted(formats))}")
            return 2
    clf = _load_classifier(args)
    if clf is None:
        return 2
    data_cfg = DataConfig(test_subset=args.test_subset, download=not args.no_download)
    try:
        root, md5 = acquire(data_cfg)
        data = load(data_cfg, root=root, md5=md5)
    except DataError as exc:
        _err(str(exc))
        return 2
    result = evaluate_classifier(clf, data.test_images.numpy(), data.test_labels.numpy(), args.batch_size)
    print(format_evaluation(result, clf.source.label, clf.source.uri, str(root)))
    if args.figure:
        confusion_figure(result, clf.source).savefig(args.figure, dpi=100)
        print(f"\nConfusion matrix: {args.figure}")
    if args.log_to_mlflow:
        from pipeline.config import TrackingConfig
        from pipeline.tracking import tracking_uri

        uri = clf.source.tracking_uri or tracking_uri(TrackingConfig())
        try:
            logged = log_evaluation(result, clf.source, uri, data_md5=md5, experiment=args.experiment)
        except Exception as exc:
            _err(f"evaluate: could not log to MLflow at {uri}: {type(exc).__name__}: {_one_line(exc)}")
            return 1
        where = f"run {logged['run_id']} in experiment '{logged['experiment']}' ({uri})"
        if clf.source.name:
            where += (f"; model version {clf.source.name} v{clf.source.version} tagged evaluated_accuracy="
                      f"{result['test_accuracy']:.6f}")
        print(f"\nMLflow:      {where}")
    return 0


# ----------------------------------------------------------------------------------------------- wiring


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``predict`` and ``evaluate`` to vitflow's subcommands."""
    from pipeline.preprocess import DEFAULT_MAX_PIXELS

    pred = subparsers.add_parser(
        "predict", help="predict digits in image files (PNG/JPEG/BMP/...), .npy arrays and IDX files",
        description="Predict the digit in each input. Images of any size and mode are preprocessed the way MNIST "
                    "was made (grey, light background inverted, cropped to the digit, fitted into 20x20, centred "
                    "by centre of mass in 28x28); .npy arrays (28, 28) / (N, 28, 28) / (N, 1, 28, 28) (uint8 "
                    "0-255 or float 0-1) and IDX image files are taken as MNIST digits already. A folder stands for "
                    "its files. An "
                    "input that cannot be read gets one line on stderr; the others are still predicted (exit 1).")
    pred.add_argument("inputs", nargs="+", metavar="INPUT", help="image, .npy or IDX file, or a folder of them")
    _model_arguments(pred)
    pred.add_argument("--top-k", "-k", type=_top_k, default=3, help="how many digits to list per input (default 3)")
    pred.add_argument("--json", action="store_true", help="one JSON object per prediction (JSON lines)")
    pred.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                      help=f"refuse images with more pixels than this, before decoding them (decompression bombs; "
                           f"default {DEFAULT_MAX_PIXELS:,})")
    pred.set_defaults(func=cmd_predict)

    ev = subparsers.add_parser(
        "evaluate", help="test-set accuracy, per-class accuracy, confusion matrix and throughput of a model",
        description="Evaluate a model on the MNIST test set (data root: $VITFLOW_DATA_DIR, else data/ in the "
                    "checkout).")
    _model_arguments(ev)
    ev.add_argument("--test-subset", type=_test_subset, default=None,
                    help="a stratified subset of this many test images (default: all 10,000)")
    ev.add_argument("--figure", metavar="PNG", help="also save the confusion-matrix figure to this file")
    ev.add_argument("--log-to-mlflow", action="store_true",
                    help="log the evaluation to a new MLflow run linked to the model version, and tag the "
                         "version with evaluated_accuracy")
    ev.add_argument("--experiment", default=None,
                    help="experiment for --log-to-mlflow (default: the model's own; for a plain file "
                         "vitflow-evaluations)")
    ev.add_argument("--no-download", action="store_true", help="fail instead of downloading missing MNIST files")
    ev.set_defaults(func=cmd_evaluate)
