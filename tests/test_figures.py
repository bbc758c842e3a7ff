"""Figures, attention maps and the model card, from real MNIST and really trained tiny models.

One small study runs through pipeline.study's own steps (no Prefect) into a throw-away MLflow store, so the
figures and the card are checked on the runs they are logged to, as well as rendered directly."""

from __future__ import annotations

import io
import math

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import attention, plots, report
from pipeline import study as steps
from pipeline.config import ModelConfig, load_config
from pipeline.data import RAW_MD5, load, verify
from pipeline.inference import evaluate_onnx
from pipeline.model import build_model
from pipeline.tracking import Tracker
from pipeline.train import to_pixels


@pytest.fixture(scope="module")
def study_run(data_root, tmp_path_factory):
    """A real study of 2 configurations x 2 folds on 1,200 / 500 images, every step of pipeline.study."""
    home = tmp_path_factory.mktemp("figures")
    previous_uri = mlflow.get_tracking_uri()
    cfg = load_config("smoke", ["tracking.experiment=figures", "train.device=cpu"])
    data = load(cfg.data, root=data_root, md5=verify(data_root))
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", cfg.experiment_name)
    study = steps.Study(cfg=cfg, data=data, tracker=tracker)
    steps.start_study(study)
    config_runs = [steps.start_configuration(study, i) for i in range(len(study.candidates))]
    results = [steps.train_fold(study, i, f, config_runs[i])
               for i in range(len(study.candidates)) for f in range(cfg.cv.folds)]
    leaderboard = steps.aggregate(study, results)
    for row in leaderboard:
        steps.close_configuration(study, row, config_runs[row["candidate_index"]])
    result, final_run = steps.retrain(study, leaderboard)
    onnx_path, parity = steps.export(study, result, final_run, home / "models")
    evaluation = steps.evaluate(study, onnx_path, final_run)
    registration = steps.register(study, onnx_path, final_run, evaluation)
    timings = {"data_s": 0.1, "cv_s": 1.0, "retrain_s": 1.0, "export_s": 1.0, "evaluate_s": 1.0,
               "register_s": 1.0, "total_s": 5.1}
    summary = steps.summarize(study, leaderboard, result, final_run, onnx_path, parity, evaluation, registration,
                              timings)
    card = steps.publish_model_card(study, summary)
    tracker.end_run(study.run_id)
    yield {"study": study, "leaderboard": leaderboard, "result": result, "final_run": final_run,
           "config_runs": config_runs, "onnx_path": onnx_path, "summary": summary, "card": card,
           "client": tracker.client, "home": home}
    mlflow.set_tracking_uri(previous_uri)


def png(figure) -> Image.Image:
    """The figure as MLflow stores it (savefig, PNG, default dpi), decoded."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    expected = tuple(int(round(v)) for v in figure.get_size_inches() * figure.dpi)
    assert buffer.tell() > 5_000  # a real picture, not an empty canvas
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.format == "PNG" and image.size == expected
    lo, hi = image.convert("L").getextrema()
    assert hi - lo > 100  # drawn on: dark marks on the light background
    return image


# --- each figure from real data ----------------------------------------------------------------------------------

def test_model_selection_figure(study_run):
    rows = study_run["leaderboard"]
    image = png(plots.model_selection(rows, rows[0]["label"]))
    assert image.width >= 700 and image.height >= 450


def test_learning_curves_figure(study_run):
    image = png(plots.learning_curves(study_run["result"].history, "final model"))
    assert image.width >= 1000 and image.height >= 400


def test_fold_curves_figures(study_run):
    rows = study_run["leaderboard"]
    assert all(len(r["fold_histories"]) == 2 for r in rows)
    assert png(plots.fold_curves(rows[0]["fold_histories"], rows[0]["label"])).width >= 1000
    assert png(plots.fold_curves_grid(rows, rows[0]["label"])).width >= 700


def test_confusion_and_misclassified_figures(study_run):
    study = study_run["study"]
    labels = study.data.test_labels.numpy()
    report_ = evaluate_onnx(study_run["onnx_path"], study.data.test_images.numpy(), labels)
    probabilities = report_["probabilities"]
    assert probabilities.shape == (len(labels), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert (probabilities.argmax(axis=1) == report_["predictions"]).all()
    assert png(plots.confusion_matrix(labels, report_["predictions"], "test")).width >= 1000
    wrong = int((report_["predictions"] != labels).sum())
    assert wrong > 0  # one epoch on 1,200 images: there are mistakes to show
    image = png(plots.misclassified(study.data.test_images.numpy(), labels, probabilities, "misclassified"))
    assert image.height == int(round((1.9 * math.ceil(min(wrong, 24) / 8) + 0.7) * 100))


def test_misclassified_figure_without_mistakes():
    labels = np.arange(10)
    image = png(plots.misclassified(np.zeros((10, 28, 28)), labels, np.eye(10), "none wrong"))
    assert image.width == 1280


def test_attention_figure(study_run):
    study, model = study_run["study"], study_run["result"].model
    index = steps.one_per_class(study.data.test_labels)
    assert study.data.test_labels[index].tolist() == list(range(10))
    maps = attention.summarize(model, to_pixels(study.data.test_images[index]))
    image = png(plots.attention_maps(study.data.test_images[index].numpy(), list(range(10)),
                                     maps.predictions.tolist(), maps.last_block.numpy(), maps.rollout.numpy(),
                                     "attention"))
    assert image.width >= 1400 and image.height >= 600  # 10 digits across, digit + 2 heads + rollout down


# --- attention maths ---------------------------------------------------------------------------------------------

def test_attention_and_rollout_rows_sum_to_one(study_run):
    model = study_run["result"].model  # depth 1 or 2, trained on real digits
    pixels = to_pixels(study_run["study"].data.test_images[:16])
    maps = model.attention_maps(pixels)
    assert len(maps) == model.cfg.depth
    for attn in maps:
        assert attn.shape == (16, model.cfg.heads, 50, 50)
        torch.testing.assert_close(attn.sum(-1), torch.ones(16, model.cfg.heads, 50))
    rolled = attention.rollout(maps)
    assert rolled.shape == (16, 50, 50) and (rolled >= 0).all()
    torch.testing.assert_close(rolled.sum(-1), torch.ones(16, 50))
    summary = attention.summarize(model, pixels)
    assert summary.last_block.shape == (16, model.cfg.heads, 7, 7) and summary.rollout.shape == (16, 7, 7)
    assert (summary.rollout >= 0).all() and (summary.rollout.sum((1, 2)) <= 1 + 1e-6).all()
    cls_last = attention.class_token_attention(maps[-1])
    torch.testing.assert_close(cls_last.sum(-1) + maps[-1][:, :, 0, 0], torch.ones(16, model.cfg.heads))


def test_mean_pool_maps_are_the_average_tokens(study_run):
    """model.pool=mean has no class token: its maps are the mean of the attention rows (what the pooled token
    draws on), over all 49 patches, so the last block's and the rollout's each sum to 1; the figure says whose."""
    model = build_model(ModelConfig(depth=2, pool="mean"), seed=2)
    images = study_run["study"].data.test_images[:4]
    pixels = to_pixels(images)
    maps = model.eval().attention_maps(pixels)
    summary = attention.summarize(model, pixels)
    assert summary.last_block.shape == (4, 2, 7, 7) and summary.rollout.shape == (4, 7, 7)
    torch.testing.assert_close(summary.last_block.flatten(2), maps[-1].mean(dim=2))
    torch.testing.assert_close(summary.rollout.flatten(1), attention.rollout(maps).mean(dim=1))
    torch.testing.assert_close(summary.rollout.sum((1, 2)), torch.ones(4))
    torch.testing.assert_close(summary.last_block.sum((2, 3)), torch.ones(4, 2))
    figure = plots.attention_maps(images.numpy(), list(range(4)), summary.predictions.tolist(),
                                  summary.last_block.numpy(), summary.rollout.numpy(), "attention", pool="mean")
    assert "average-token attention" in figure._suptitle.get_text()


def test_rollout_equals_naive_reference(study_run):
    model = build_model(ModelConfig(depth=3), seed=3).eval()
    maps = model.attention_maps(to_pixels(study_run["study"].data.test_images[:2]))
    expected = torch.empty(2, 50, 50)
    for b in range(2):
        joint = torch.eye(50)
        for attn in maps:  # first block first; each block's matrix applied on the left
            a = sum(attn[b, h] for h in range(attn.shape[1])) / attn.shape[1]
            a = 0.5 * a + 0.5 * torch.eye(50)  # rows of a sum to 1, so (a + I) / row sum = (a + I) / 2
            joint = a @ joint
        expected[b] = joint
    torch.testing.assert_close(attention.rollout(maps), expected, atol=1e-6, rtol=1e-5)


def test_rollout_of_identity_attention_is_the_identity():
    eye = torch.eye(50).expand(4, 2, 50, 50)
    rolled = attention.rollout([eye, eye, eye])
    torch.testing.assert_close(rolled, torch.eye(50).expand(4, 50, 50))
    cls = rolled[:, 0, 1:]
    assert cls.shape == (4, 49) and (cls == 0).all()  # a class token that only attends to itself reads no patch


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_rollout_of_a_uniformly_attending_model(study_run, depth):
    """Zero queries: every token attends to all 50 equally. Rollout is then (I + U)^L / 2^L with U = 1/50, so the
    class token's rollout gives each of the 49 patches exactly (1 - 2^-L) / 50."""
    model = build_model(ModelConfig(depth=depth), seed=0).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:8].zero_()
            block.attn.qkv.bias[:8].zero_()
    summary = attention.summarize(model, to_pixels(study_run["study"].data.test_images[:5]))
    assert summary.rollout.shape == (5, 7, 7)
    torch.testing.assert_close(summary.rollout, torch.full((5, 7, 7), (1 - 2.0**-depth) / 50))
    torch.testing.assert_close(summary.last_block, torch.full((5, 2, 7, 7), 1 / 50))


# --- figures and the card on the runs ----------------------------------------------------------------------------

def test_figures_are_logged_to_the_right_runs(study_run, tmp_path):
    client, study = study_run["client"], study_run["study"]

    def figures(run_id):
        return {f.path for f in client.list_artifacts(run_id, "figures")}

    assert figures(study_run["final_run"]) == {f"figures/{n}.png" for n in (
        "model_selection", "learning_curves", "confusion_matrix", "misclassified", "attention")}
    assert figures(study.run_id) == {"figures/model_selection.png", "figures/fold_curves.png"}
    for run_id in study_run["config_runs"]:
        assert figures(run_id) == {"figures/fold_curves.png"}
    local = client.download_artifacts(study_run["final_run"], "figures", str(tmp_path))
    for name in ("misclassified", "attention"):
        with Image.open(f"{local}/{name}.png") as image:
            assert image.format == "PNG" and image.width >= 1000


def test_model_card(study_run, tmp_path):
    card, summary, client = study_run["card"], study_run["summary"], study_run["client"]
    for name, digest in RAW_MD5.items():
        assert f"`{name}` | `{digest}`" in card
    for row in report.cv_rows(study_run["leaderboard"]):
        line = next(l for l in card.splitlines() if f"| {row['rank']} | " in l and row["configuration"] in l)
        assert row["parameters"] in line and row["val_error"] in line and row["train_error"] in line
    accuracy = f"{100 * summary['test_accuracy']:.2f}%"
    assert f"test accuracy (ONNX Runtime, CPUExecutionProvider) | **{accuracy}**" in card
    assert "images/s" in card and "## Known limits" in card and "**Subset run:**" in card
    assert f"`depth={summary['configuration']['model']['depth']}`" in card
    reg = summary["registration"]
    assert card.startswith(f"# Model card: vit-mnist-smoke version {reg['version']}")
    assert client.get_model_version("vit-mnist-smoke", reg["version"]).description == card
    path = client.download_artifacts(study_run["final_run"], "model_card.md", str(tmp_path))
    assert open(path, encoding="utf-8").read() == card


def test_terminal_summary_matches_the_card(study_run):
    from flows.cli import format_summary

    text, card, summary = format_summary(study_run["summary"]), study_run["card"], study_run["summary"]
    numbers = report.key_numbers(summary)
    for key in ("test_accuracy", "torch_test_accuracy", "parity", "throughput_detail", "wall_time"):
        assert numbers[key] in text and numbers[key] in card, key
    for row in report.cv_rows(study_run["leaderboard"]):
        for cell in ("configuration", "parameters", "val_error", "train_error"):
            assert row[cell] in text and row[cell] in card
    assert summary["registration"]["model_uri"] in text and summary["registration"]["model_uri"] in card


def test_long_cards_are_cut_to_fit_a_version_description(study_run):
    summary = dict(study_run["summary"])
    rows = [dict(row, rank=i + 1, label=f"config {i + 1}") for i, row in enumerate(summary["leaderboard"] * 40)]
    summary["leaderboard"] = rows
    card = report.model_card(summary)
    assert len(card) > report.DESCRIPTION_LIMIT and "| 80 | config 80 |" in card
    description = report.version_description(summary, card)
    assert len(description) <= report.DESCRIPTION_LIMIT
    assert "| 5 | config 5 |" in description and "| 6 | config 6 |" not in description
    assert "75 more configurations: see model_card.md" in description

