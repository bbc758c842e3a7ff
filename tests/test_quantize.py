"""int8 dynamic quantization: the file, its accuracy against fp32 on real test images, and the flow's
quantize-onnx step (metrics and a second logged model on the final run, registration gated on the drop)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from pipeline import quantize as quant
from pipeline.inference import OnnxClassifier
from pipeline.train import to_pixels

from ._consume import QUICK_TRAIN, mlflow_store, quick_model_config, train_and_export

TEST_IMAGES = 2000


@pytest.fixture(scope="module")
def fp32(mnist, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    return train_and_export(mnist, tmp / "vit.onnx", quick_model_config(), QUICK_TRAIN, images=4000)


@pytest.fixture(scope="module")
def int8(fp32):
    return quant.quantize_int8(fp32)


def test_int8_file_next_to_fp32_and_valid(fp32, int8, mnist):
    assert int8 == fp32.with_name("vit.int8.onnx") and int8.is_file()
    proto = onnx.load(str(int8))
    onnx.checker.check_model(proto)
    ops = {n.op_type for n in proto.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops  # weights really are int8
    assert not list(fp32.parent.glob(".*tmp"))  # nothing half-written left behind
    clf = OnnxClassifier(int8, device="cpu")
    for n in (1, 5, 300):  # dynamic batch survives quantization
        assert clf.logits(to_pixels(mnist.test_images[:n]).numpy()).shape == (n, 10)


def test_int8_accuracy_close_to_fp32(fp32, int8, mnist):
    figures = quant.compare(fp32, int8, mnist.test_images[:TEST_IMAGES].numpy(),
                            mnist.test_labels[:TEST_IMAGES].numpy(), repeats=1)
    assert figures["fp32_test_accuracy"] > 0.6
    assert abs(figures["int8_accuracy_drop"]) < 0.02
    assert figures["int8_agreement"] > 0.95
    assert figures["int8_accuracy_drop"] == pytest.approx(figures["fp32_test_accuracy"] -
                                                           figures["int8_test_accuracy"])
    assert figures["int8_size_kb"] > 0 and figures["fp32_size_kb"] > 0
    assert figures["int8_images_per_second"] > 0 and figures["fp32_images_per_second"] > 0


def test_conv_stem_keeps_fp32_conv(mnist, tmp_path):
    """Only MatMul/Gemm weights become int8: the conv-pool stem's Conv nodes stay fp32 (ConvInteger is ~3.5x
    slower than Conv on ONNX Runtime's CPU provider), the transformer's matmuls are still integer."""
    from pipeline.config import ModelConfig
    from pipeline.export import export_onnx
    from pipeline.model import build_model

    model = build_model(ModelConfig(dim=16, depth=1, stem="conv-pool", stem_channels=8), seed=0).eval()
    sample = to_pixels(mnist.test_images[:64])
    export_onnx(model, tmp_path / "conv.onnx", sample)
    int8 = quant.quantize_int8(tmp_path / "conv.onnx")
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert "ConvInteger" not in ops and ops.count("Conv") == 3
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= set(ops)
    assert OnnxClassifier(int8, device="cpu").logits(sample.numpy()).shape == (64, 10)


def test_int8_runs_whole_batches_on_every_thread_fp32_in_chunks(fp32, int8):
    """A dynamically quantized model cannot be cut into chunks (its activation scale is per call), so ONNX Runtime
    spreads each call over the threads itself; the fp32 model runs chunks on one-thread calls, one per thread."""
    whole, chunks = OnnxClassifier(int8, device="cpu", threads=2), OnnxClassifier(fp32, device="cpu", threads=2)
    assert not whole.chunked and whole.session.get_session_options().intra_op_num_threads == 2
    assert chunks.chunked and chunks.workers == 2 and chunks.session.get_session_options().intra_op_num_threads == 1


def test_per_channel_and_unknown_weight_type(fp32, tmp_path, mnist):
    path = quant.quantize_int8(fp32, tmp_path / "pc.onnx", per_channel=True)
    pixels = to_pixels(mnist.test_images[:500]).numpy()
    agree = (OnnxClassifier(path).predict(pixels) == OnnxClassifier(fp32).predict(pixels)).mean()
    assert agree > 0.95
    with pytest.raises(ValueError, match="weight_type"):
        quant.quantize_int8(fp32, tmp_path / "x.onnx", weight_type="int4")


def test_not_an_onnx_file_is_a_quantization_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(quant.QuantizationError, match="not a readable ONNX model"):
        quant.quantize_int8(bad)
    assert not (tmp_path / "bad.int8.onnx").exists()


# ------------------------------------------------------------------------------------------- study step


def _study(mnist, tmp_path, uri, **export):
    from pipeline.config import load_config
    from pipeline.data import MnistTensors
    from pipeline.study import Study
    from pipeline.tracking import Tracker

    overrides = [f"export.{k}={v}" for k, v in export.items()] + ["tracking.registered_model=quant-test"]
    cfg = load_config("smoke", overrides)
    data = MnistTensors(train_images=mnist.train_images[:200], train_labels=mnist.train_labels[:200],
                        test_images=mnist.test_images[:1000], test_labels=mnist.test_labels[:1000],
                        root=mnist.root, md5={})
    study = Study(cfg=cfg, data=data, tracker=Tracker(uri, "quant-test"))
    study.run_id = study.tracker.start_run("study")
    return study


def test_study_step_logs_and_registers_within_bound(fp32, mnist, tmp_path):
    from pipeline import study as steps

    onnx_path = tmp_path / "models" / "run.onnx"
    onnx_path.parent.mkdir()
    onnx_path.write_bytes(fp32.read_bytes())
    with mlflow_store(tmp_path) as uri:
        study = _study(mnist, tmp_path, uri, int8_max_accuracy_drop=0.05)
        final = study.tracker.start_run("final", parent_id=study.run_id)
        out = steps.quantize(study, onnx_path, final)
        client = study.tracker.client
        run = client.get_run(final)
        assert run.info.status == "RUNNING"  # register-model, the next step, ends it
        for key in ("int8_test_accuracy", "int8_accuracy_drop", "int8_size_kb", "fp32_size_kb",
                    "int8_images_per_second", "fp32_images_per_second"):
            assert key in run.data.metrics
        assert run.data.metrics["int8_test_accuracy"] == pytest.approx(out["int8_test_accuracy"])
        assert (tmp_path / "models" / "run.int8.onnx").is_file()
        assert out["int8_registered"] and run.data.tags["int8_registered"] == "true"
        mv = client.get_model_version("quant-test-int8", "1")
        assert float(mv.tags["test_accuracy"]) == pytest.approx(out["int8_test_accuracy"])
        assert mv.tags["fp32_model"] == "quant-test" and mv.tags["final_run_id"] == final
        logged = client.search_logged_models(experiment_ids=[study.tracker.experiment_id])
        assert [m.name for m in logged] == ["model-int8"] and logged[0].source_run_id == final
        # the registered int8 model serves through MLflow's pyfunc like the file itself
        import mlflow.pyfunc

        batch = to_pixels(mnist.test_images[:8]).numpy()
        served = mlflow.pyfunc.load_model("models:/quant-test-int8/1").predict(batch)["logits"]
        np.testing.assert_allclose(served, OnnxClassifier(out["int8_path"]).logits(batch), atol=1e-5)


def test_study_step_does_not_register_over_bound(fp32, mnist, tmp_path, monkeypatch):
    from pipeline import study as steps

    real_compare = quant.compare

    def worse(*args, **kwargs):  # the same measurement, then a drop the bound must reject
        figures = real_compare(*args, **kwargs)
        figures["int8_test_accuracy"] -= 0.2
        figures["int8_accuracy_drop"] += 0.2
        return figures

    monkeypatch.setattr(quant, "compare", worse)
    with mlflow_store(tmp_path) as uri:
        study = _study(mnist, tmp_path, uri, int8_max_accuracy_drop=0.01)
        final = study.tracker.start_run("final", parent_id=study.run_id)
        out = steps.quantize(study, fp32, final)
        client = study.tracker.client
        assert not out["int8_registered"] and "over export.int8_max_accuracy_drop=0.01" in out["int8_reason"]
        assert client.search_model_versions("name = 'quant-test-int8'") == []
        assert [m.name for m in client.search_logged_models(experiment_ids=[study.tracker.experiment_id])] == \
            ["model-int8"]  # logged for inspection, just not registered
        assert client.get_run(final).data.tags["int8_registered"] == "false"


def test_study_step_can_be_switched_off(fp32, mnist, tmp_path):
    from pipeline import study as steps

    with mlflow_store(tmp_path) as uri:
        study = _study(mnist, tmp_path, uri, quantize="false")
        final = study.tracker.start_run("final", parent_id=study.run_id)
        assert steps.quantize(study, fp32, final)["int8_registered"] is False
        assert "int8_test_accuracy" not in study.tracker.client.get_run(final).data.metrics


@pytest.mark.slow
def test_flow_runs_quantize_step(mlflow_client):
    """The smoke flow (conftest's two CLI runs): each final run carries the int8 figures and two logged models;
    the -int8 registered model has a version exactly for the runs whose drop was within the bound."""
    exp = mlflow_client.get_experiment_by_name("vitflow-smoke")
    finals = mlflow_client.search_runs([exp.experiment_id], "tags.`vitflow.role` = 'final'")
    assert finals
    registered = 0
    for final in finals:
        metrics, tags = final.data.metrics, final.data.tags
        assert {"int8_test_accuracy", "int8_accuracy_drop", "int8_size_kb", "fp32_size_kb",
                "int8_images_per_second", "fp32_images_per_second"} <= set(metrics)
        within = metrics["int8_accuracy_drop"] <= 0.005
        assert tags["int8_registered"] == str(within).lower()
        registered += within
        names = {m.name for m in mlflow_client.search_logged_models(experiment_ids=[exp.experiment_id])
                 if m.source_run_id == final.info.run_id}
        assert names == {"model", "model-int8"}
    assert len(mlflow_client.search_model_versions("name = 'vit-mnist-smoke-int8'")) == registered
