
import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, config_from_dict, list_presets, load_config

from .conftest import REPO, run_cli


def test_seed_preset_is_the_original_study():
    cfg = load_config("seed")
    m, t = cfg.model, cfg.train
    assert (m.image_size, m.patch_size, m.dim, m.heads, m.pos_embedding) == (28, 4, 8, 2, "sinusoidal")
    assert (t.optimizer, t.lr, t.epochs, t.batch_size) == ("adam", 0.005, 5, 128)
    assert cfg.cv.folds == 3
    assert cfg.cv.grid == {"model.depth": [2, 3], "model.mlp_hidden": [16, 32]}
    labels = [c.label for c in cfg.candidates()]
    assert labels == ["blocks=2 mlp=16", "blocks=2 mlp=32", "blocks=3 mlp=16", "blocks=3 mlp=32"]
    assert [(c.model.depth, c.model.mlp_hidden) for c in cfg.candidates()] == [(2, 16), (2, 32), (3, 16), (3, 32)]


def test_every_preset_loads():
    assert {"seed", "smoke"} <= set(list_presets())
    for name in list_presets():
        load_config(name)


def test_overrides_are_typed_and_reach_grid():
    cfg = load_config("seed", ["train.epochs=2", "train.lr=1e-3", "cv.grid.model.depth=[1,4]", "data.download=false"])
    assert cfg.train.epochs == 2 and cfg.train.lr == pytest.approx(1e-3) and cfg.data.download is False
    assert cfg.cv.grid["model.depth"] == [1, 4]


def test_config_file_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "cv": {"folds": 2, "grid": {"model.dim": [8, 16]}}}))
    cfg = load_config(path)
    assert cfg.name == "mine" and len(cfg.candidates()) == 2


@pytest.mark.parametrize("override, fragment", [
    ("model.heads=3", "model.heads=3 must divide model.dim=8"),
    ("model.patch_size=5", "model.patch_size=5 must divide model.image_size=28"),
    ("cv.folds=1", "cv.folds=1"),
    ("cv.grid={}", "cv.grid is empty"),
    ("cv.grid.model.depth=[]", "cv.grid.model.depth is empty"),
    ("model.colour=3", "unknown key 'model.colour'"),
    ("train.lr=-0.1", "train.lr=-0.1"),
    ("train.epochs=many", "train.epochs='many'"),
    ("cv.grid.model.heads=[2,3]", "cv.grid point blocks=2 mlp=16 heads=3: model.heads=3 must divide model.dim=8"),
    ("cv.grid.model.bogus=[1]", "'model.bogus' is not a known field"),
    ("data.train_subset=25", "data.train_subset=25 is too small: a stratified subset needs 3 of each of the 10 "
                             "digits for cv.folds=3; use at least 30"),
    ("data.test_subset=5", "data.test_subset=5 is too small: a stratified subset needs one of each of the 10 digits"),
    ("time_budget.flow_s=20", "time_budget.reserve_s=30 leaves nothing of time_budget.flow_s=20 for training; use a "
                              "reserve below the budget"),
    ("time_budget.flow_s=0", "time_budget.flow_s=0"),
    # YAML reads true/false as booleans, which pydantic's lax mode would take as 1/0
    ("train.epochs=true", "train.epochs=True: a number is expected, not a boolean"),
    ("train.lr=true", "train.lr=True: a number is expected, not a boolean"),
    ("train.grad_clip=true", "train.grad_clip=True: a number is expected"),
    ("cv.concurrency=true", "cv.concurrency=True: a number is expected"),
    ("data.test_subset=false", "data.test_subset=False: a number is expected"),
])
def test_invalid_configuration_is_one_clear_line(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("seed", [override])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_switches_keep_their_booleans():
    cfg = load_config("seed", ["cv.batch_folds=true", "cv.resume=false", "model.attn_out_proj=true",
                               "data.download=false", "train.cuda_graph=off"])
    assert (cfg.cv.batch_folds, cfg.cv.resume, cfg.model.attn_out_proj, cfg.data.download) == (True, False, True,
                                                                                               False)
    assert cfg.train.cuda_graph == "off"


@pytest.mark.parametrize("stem", ["conv", "conv-pool"])
def test_a_conv_stem_needs_a_power_of_2_patch_size(stem):
    assert load_config("seed", [f"model.stem={stem}"]).model.stem == stem
    with pytest.raises(ConfigError, match=rf"model.stem={stem} halves .* model.patch_size must be a power of 2 "
                                          r"\(2, 4, \.\.\.\); got 7: use model.stem=patch for it"):
        load_config("seed", [f"model.stem={stem}", "model.patch_size=7"])


def test_unknown_preset_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of: .*seed"):
        load_config("nope")
    with pytest.raises(ConfigError, match="not key=value"):
        load_config("seed", ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown key 'surprise'"):
        config_from_dict({"surprise": 1})


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    import os

    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PREFECT_HOME=str(tmp_path))
    result = run_cli(["run", "--set", "model.heads=3"], env, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.heads=3 must divide model.dim=8" in lines[0], result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def test_cv_epochs_shortens_the_folds_only():
    cfg = load_config("seed", ["cv.epochs=2", "train.epochs=7"])
    for cand in cfg.candidates():
        assert cand.cv_train.epochs == 2 and cand.train.epochs == 7
        assert cand.cv_train.model_copy(update={"epochs": 7}) == cand.train
    assert all(c.cv_train == c.train for c in load_config("seed").candidates())
    with pytest.raises(ConfigError, match="cv.epochs"):
        load_config("seed", ["cv.epochs=0"])


def test_a_time_budget_leaves_the_cv_and_its_cached_folds_alone():
    """The budget shortens the final retraining only: the CV folds, and so their keys in the result store, are
    those of the same study without it."""
    plain, budgeted = load_config("seed"), load_config("seed", ["time_budget.flow_s=600", "time_budget.reserve_s=20"])
    assert plain.time_budget.flow_s is None and budgeted.time_budget.flow_s == 600
    assert [c.cv_train for c in plain.candidates()] == [c.cv_train for c in budgeted.candidates()]
    assert [c.train for c in plain.candidates()] == [c.train for c in budgeted.candidates()]
    assert plain.fingerprint() != budgeted.fingerprint()  # the study itself differs, and its MLflow params say so


@pytest.mark.parametrize("preset", ["cpu", "strong"])
def test_accuracy_presets_stay_within_their_parameter_budget(preset):
    from pipeline.model import build_model, count_parameters

    cfg = load_config(preset)
    sizes = [count_parameters(build_model(c.model)) for c in cfg.candidates()]
    assert max(sizes) <= 1_100_000 and len(sizes) >= 2
    assert cfg.train.augment.active and cfg.train.schedule == "cosine"


def test_yaml_off_and_on_are_compile_modes(tmp_path):
    # YAML 1.1 reads a bare `off` as false: `compile: off` in a file or `--set train.compile=off` must still work
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "x"}) + "train:\n  compile: off\n")
    assert load_config(path).train.compile == "off"
    assert load_config("strong", ["train.compile=off"]).train.compile == "off"
    assert load_config("seed", ["train.compile=on"]).train.compile == "default"
    assert load_config("seed", ["train.compile=max-autotune"]).train.compile == "max-autotune"
    with pytest.raises(ConfigError, match="train.compile"):
        load_config("seed", ["train.compile=fast"])
    assert load_config("seed", ["train.cuda_graph=off"]).train.cuda_graph == "off"
    assert load_config("seed", ["train.cuda_graph=on"]).train.cuda_graph == "auto"


def test_an_install_outside_a_checkout_says_how_to_install(tmp_path):
    """`pip install .` copies pipeline/ and flows/ into site-packages without configs/, and the default stores
    would land beside them (an mlflow/ folder there is MLflow's own package): vitflow refuses, and says why."""
    source, target = tmp_path / "source", tmp_path / "site"  # a copy: the build writes build/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("pipeline", "flows"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    probe = ("from pipeline.config import ConfigError, load_config\n"
             "try:\n    load_config('seed')\nexcept ConfigError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "vitflow runs from a checkout of its repository, installed in place" in out.stdout
    assert str(target / "configs") in out.stdout


def test_the_default_data_root_is_the_checkouts_not_the_working_folders(tmp_path, monkeypatch):
    from pipeline.config import DataConfig

    from .conftest import REPO

    monkeypatch.delenv("VITFLOW_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert DataConfig().resolved_root() == (REPO / "data").resolve()
    assert DataConfig(root="mnist-copy").resolved_root() == tmp_path / "mnist-copy"  # a given relative root: cwd's
    monkeypatch.setenv("VITFLOW_DATA_DIR", str(tmp_path / "elsewhere"))
    assert DataConfig(root="mnist-copy").resolved_root() == tmp_path / "elsewhere"
