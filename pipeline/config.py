"""Typed study configuration: YAML presets plus ``key=value`` overrides, validated before any work starts."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

DATA_DIR_ENV = "VITFLOW_DATA_DIR"
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message is one line naming the field and the value."""


class TrackingServerDown(ConfigError):
    """The tracking URI names an MLflow server that does not answer."""


def require_answering_server(uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking URI must answer before a study starts: MLflow's client retries a refused connection for
    minutes, and the study would fail after them with a traceback. Any HTTP answer counts (a server behind a proxy
    or with authentication may refuse ``/health``); only no answer at all is an error."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlparse

    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:  # URLError (refused, unknown host), a timeout
        reason = getattr(exc, "reason", None) or exc
        raise TrackingServerDown(
            f"the MLflow tracking server at {uri} does not answer ({reason}); start it (`make serve`, or "
            f"`mlflow/server.sh` for the tracking server alone), or unset MLFLOW_TRACKING_URI to log to the local "
            f"store mlflow/mlflow.db") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads true/false as 1/0 for a number field; a boolean there is a mistake (YAML
        reads true/false, yes/no, on/off as booleans), so it is refused. Fields that take a boolean keep it."""
        if isinstance(value, bool) and info.field_name is not None:
            accepted = typing.get_args(cls.model_fields[info.field_name].annotation) or (
                cls.model_fields[info.field_name].annotation,)
            if bool not in accepted and (int in accepted or float in accepted):
                raise PydanticCustomError("bool_for_number", "a number is expected, not a boolean")
        return value


class DataConfig(_Strict):
    root: str | None = Field(None, description=f"MNIST root (holds MNIST/raw); ${DATA_DIR_ENV} wins, default data/ "
                                               f"in the checkout")
    download: bool = True
    mirrors: list[str] | None = Field(None, description="base URLs to download from; None: torchvision's mirrors")
    train_subset: int | None = Field(None, gt=0, description="stratified subset of the 60k training images")
    test_subset: int | None = Field(None, gt=0, description="stratified subset of the 10k test images")
    subset_seed: int = 0

    def resolved_root(self) -> Path:
        return Path(os.environ.get(DATA_DIR_ENV) or self.root or PRESET_DIR.parent / "data").expanduser().resolve()


class ModelConfig(_Strict):
    image_size: int = Field(28, gt=0)
    channels: int = Field(1, gt=0)
    patch_size: int = Field(4, gt=0)
    dim: int = Field(8, gt=0)
    heads: int = Field(2, gt=0)
    depth: int = Field(2, gt=0)
    mlp_hidden: int = Field(16, gt=0)
    num_classes: int = Field(10, ge=2)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    pos_embedding: Literal["sinusoidal", "learned"] = "sinusoidal"
    pos_base: float = Field(10000.0, gt=1, description="wavelength base of the sinusoidal embedding")
    input_mean: float = Field(0.5, description="pixels in [0, 1] are normalised as (x - input_mean) / input_std")
    input_std: float = Field(0.5, gt=0)
    attn_out_proj: bool = Field(False, description="output projection after the heads are concatenated")
    stem: Literal["patch", "conv", "conv-pool"] = Field(
        "patch", description="how pixels become tokens: 'patch' embeds each patch_size x patch_size patch linearly "
        "(ViT); 'conv' runs log2(patch_size) 3x3 stride-2 convolutions, then a 1x1 one to dim (ViT_C, Xiao et al. "
        "2021): the same token grid, each token seeing its neighbours' pixels; 'conv-pool' runs each as a 3x3 "
        "stride-1 convolution and a 3x3 stride-2 max-pool (compact convolutional transformers, Hassani et al. 2021)")
    stem_channels: int = Field(32, gt=0, description="conv stem: channels of its first convolution, doubling in "
                                                     "each further one")
    pool: Literal["cls", "mean"] = Field(
        "cls", description="what the classifier head reads: 'cls', a learned class token prepended to the patch tokens "
        "(ViT); 'mean', the mean of the patch tokens after the last block and its LayerNorm, with no class token "
        "(global average pooling, as in Beyer et al. 2022's plain ViT baselines)")

    @model_validator(mode="after")
    def _divisibility(self) -> "ModelConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"model.patch_size={self.patch_size} must divide model.image_size={self.image_size}")
        if self.stem != "patch" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"model.stem={self.stem} halves the image until it reaches the token grid, so "
                             f"model.patch_size must be a power of 2 (2, 4, ...); got {self.patch_size}: use "
                             f"model.stem=patch for it")
        if self.dim % self.heads:
            raise ValueError(f"model.heads={self.heads} must divide model.dim={self.dim}")
        return self


class AugmentConfig(_Strict):
    """Random affine and elastic augmentation of each training batch on the training device (no per-sample
    DataLoader), one resampling per batch. Pixels outside the source image are background (0)."""

    rotation: float = Field(0.0, ge=0, le=180, description="degrees; angle drawn uniformly from [-rotation, rotation]")
    translate: float = Field(0.0, ge=0, le=0.5, description="shift as a fraction of the image side, per axis")
    scale: tuple[float, float] = Field((1.0, 1.0), description="zoom factor drawn uniformly from [low, high]")
    shear: float = Field(0.0, ge=0, le=45, description="degrees; x-shear angle drawn from [-shear, shear]")
    elastic_alpha: float = Field(0.0, ge=0, le=100, description="elastic distortion (Simard et al. 2003): scale of "
                                 "the smoothed random displacement field, in pixels; 0 turns it off")
    elastic_sigma: float = Field(4.0, gt=0, le=10, description="elastic distortion: std of the Gaussian that smooths "
                                 "the displacement field, in pixels (larger: smoother, smaller displacements)")
    erasing: float = Field(0.0, ge=0, le=1, description="probability of blanking one random rectangle per image")
    anneal: float = Field(0.0, ge=0, le=1, description="the last fraction of a run's optimizer steps over which all "
                          "of the above fade linearly to none (rotation, shear, shift, zoom, elastic displacement "
                          "and erasing scaled together, to 0 at the last step), so the last steps train on images "
                          "like the test images; 0: the full augmentation to the end")

    @field_validator("scale")
    @classmethod
    def _scale(cls, scale: tuple[float, float]) -> tuple[float, float]:
        low, high = scale
        if not 0 < low <= high:
            raise ValueError(f"train.augment.scale={list(scale)} must be [low, high] with 0 < low <= high")
        return scale

    @property
    def active(self) -> bool:
        return self.resamples or bool(self.erasing)

    @property
    def resamples(self) -> bool:
        """Whether each image is resampled through a random affine and/or elastic sampling grid."""
        return bool(self.rotation or self.translate or self.scale != (1.0, 1.0) or self.shear or self.elastic_alpha)


class TrainConfig(_Strict):
    epochs: int = Field(5, gt=0)
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(4096, gt=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(0.005, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, gt=0, description="torch intra-op threads; None: cores / concurrent tasks")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning rate over the steps")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from lr/100 to lr over these epochs")
    min_lr: float = Field(0.0, ge=0, description="cosine schedule: the learning rate it decays to")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0, description="clip the gradients' global norm to this value")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast on CUDA (CPU stays fp32)")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "off", description="torch.compile mode for the training step's model; off: eager")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights, updated after every "
                                      "optimizer step with this decay (e.g. 0.9995; less in the first updates: "
                                      "min(decay, (1 + n) / (10 + n)) after n): it is what is evaluated, exported and "
                                      "registered; the trained weights' own figures are reported as "
                                      "<set>_loss_raw/<set>_error_raw. None: no average")
    cuda_graph: Literal["auto", "off"] = Field(
        "auto", description="auto: on CUDA, capture the whole training step (augmentation, forward, backward, "
                            "optimizer) once as a CUDA graph and replay it, when compile is off and there is no dropout")

    @field_validator("compile", "cuda_graph", mode="before")
    @classmethod
    def _switch(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads a bare ``off``/``on`` (and ``false``/``true``) as a boolean: take them as "off" and the
        field's "on" mode (compile: "default", cuda_graph: "auto")."""
        on = "default" if info.field_name == "compile" else "auto"
        return {False: "off", True: on}.get(value, value) if isinstance(value, bool) else value


class CVConfig(_Strict):
    folds: int = Field(3, ge=2)
    seed: int = 0
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    resume: bool = Field(True, description="reuse folds finished by an earlier run of the same study")
    concurrency: int | None = Field(None, gt=0, description="fold tasks trained at once; None: auto (CPU: one per core, CUDA: 4)")
    batch_folds: bool | Literal["auto"] = Field(
        "auto", description="train a configuration's folds together as one stacked model; auto: on CUDA only")
    epochs: int | None = Field(None, gt=0, description="epochs of each CV fold (a shorter screening run, with its "
                                                        "own schedule); None: train.epochs, as the final model")

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not grid:
            raise ValueError("cv.grid is empty; give at least one field to search, e.g. model.depth: [2, 3]")
        for key, values in grid.items():
            section = key.split(".", 1)[0]
            if section not in ("model", "train") or "." not in key:
                raise ValueError(f"cv.grid key {key!r} must name a model.* or train.* field")
            if not values:
                raise ValueError(f"cv.grid.{key} is empty; give at least one value")
        return grid


class ExportConfig(_Strict):
    parity_atol: float = Field(1e-4, gt=0)
    parity_batch: int = Field(256, gt=0)
    quantize: bool = True  # also write, compare and log an int8 (dynamic quantization) model
    int8_max_accuracy_drop: float = Field(0.005, ge=0)  # register the int8 model only within this drop


class TimeBudgetConfig(_Strict):
    """A wall-time budget for the whole flow. The final retraining then trains as many of ``train.epochs`` as fit:
    after its first epochs it measures their pace and fits the epoch count, and the learning-rate schedule with
    it, to the time left. The CV is not shortened (its folds are the model selection)."""

    flow_s: float | None = Field(None, gt=0, description="the flow's wall-time budget in seconds, from its start "
                                                         "to the registered model; None: no budget, train.epochs")
    reserve_s: float = Field(30.0, ge=0, description="of it, the seconds kept for what follows the retraining "
                                                     "(ONNX export, evaluation, int8, registry)")

    @model_validator(mode="after")
    def _reserve_below_budget(self) -> "TimeBudgetConfig":
        if self.flow_s is not None and self.reserve_s >= self.flow_s:
            raise ValueError(f"time_budget.reserve_s={self.reserve_s:g} leaves nothing of time_budget.flow_s="
                             f"{self.flow_s:g} for training; use a reserve below the budget")
        return self


class TrackingConfig(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; $MLFLOW_TRACKING_URI wins, default sqlite under mlflow/")
    experiment: str | None = Field(None, description="default: vitflow-<study name>")
    registered_model: str = "vit-mnist"
    champion_margin: float = Field(0.0, ge=0, description="accuracy gain needed to move the champion alias")


class StudyConfig(_Strict):
    name: str = "study"
    description: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    time_budget: TimeBudgetConfig = Field(default_factory=TimeBudgetConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _subsets_hold_every_digit(self) -> "StudyConfig":
        # Subsets are stratified over the 10 digits, and stratified k-fold CV needs k images of each digit.
        need = {"data.train_subset": (self.data.train_subset, 10 * self.cv.folds,
                                      f"{self.cv.folds} of each of the 10 digits for cv.folds={self.cv.folds}"),
                "data.test_subset": (self.data.test_subset, 10, "one of each of the 10 digits")}
        for key, (size, least, why) in need.items():
            if size is not None and size < least:
                raise ValueError(f"{key}={size} is too small: a stratified subset needs {why}; use at least {least}")
        return self

    @model_validator(mode="after")
    def _grid_points_valid(self) -> "StudyConfig":
        # Every grid point must itself be a valid configuration: fail now, not after hours of CV.
        for key in self.cv.grid:
            section, name = key.split(".", 1)
            if name not in type(getattr(self, section)).model_fields:
                raise ValueError(f"cv.grid key {key!r} is not a known field of {section}")
        for overrides in grid_points(self.cv.grid):
            try:
                self._apply(overrides)
            except ValidationError as exc:
                raise ValueError(f"cv.grid point {_label(overrides)}: {_first_error(exc)}") from None
        return self

    def _apply(self, overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
        raw = {"model": self.model.model_dump(), "train": self.train.model_dump()}
        for key, value in overrides.items():
            section, name = key.split(".", 1)
            raw[section][name] = value
        return ModelConfig.model_validate(raw["model"]), TrainConfig.model_validate(raw["train"])

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"vitflow-{self.name}"

    def candidates(self) -> list["Candidate"]:
        """The grid expanded into concrete configurations, in a stable order."""
        out = []
        for overrides in grid_points(self.cv.grid):
            model, train = self._apply(overrides)
            cv_train = train if self.cv.epochs is None else train.model_copy(update={"epochs": self.cv.epochs})
            out.append(Candidate(label=_label(overrides), overrides=overrides, model=model, train=train,
                                 cv_train=cv_train))
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class Candidate(_Strict):
    """One point of the model-selection grid."""

    label: str
    overrides: dict[str, Any]
    model: ModelConfig
    train: TrainConfig  # the final retraining
    cv_train: TrainConfig  # the cross-validation folds (train, with cv.epochs when set)


_SHORT = {"model.depth": "blocks", "model.mlp_hidden": "mlp", "model.dim": "dim", "model.heads": "heads",
          "train.lr": "lr", "model.patch_size": "patch", "model.dropout": "dropout"}


def _label(overrides: dict[str, Any]) -> str:
    if not overrides:
        return "default"
    return " ".join(f"{_SHORT.get(k, k.split('.')[-1])}={v}" for k, v in overrides.items())


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    if key.startswith("cv.grid."):  # grid keys are dotted themselves: cv.grid.model.depth=[2,3]
        cv = raw.setdefault("cv", {}) or {}
        raw["cv"] = cv
        cv.setdefault("grid", {})[key.removeprefix("cv.grid.")] = value
        return
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section; fix the override key")
        node = child
    node[parts[-1]] = value


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":  # our own validators: the message already names the field and the value
        return msg
    if err["type"] == "extra_forbidden":
        return f"unknown key {field!r} (value {err['input']!r}); check the spelling against configs/seed.yaml"
    if field:
        return f"{field}={err['input']!r}: {msg}"
    return msg


def resolve_preset(name_or_path: str | os.PathLike) -> Path:
    """A preset name (``seed``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist; presets: {', '.join(list_presets())}")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        raise ConfigError(f"unknown preset {str(name_or_path)!r}; choose one of: {', '.join(list_presets())}")
    return preset


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value; example: --set train.epochs=2")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override {text!r}: value is not valid YAML ({reason})") from None


def load_config(name_or_path: str | os.PathLike = "seed", overrides: list[str] | None = None) -> StudyConfig:
    """Load a preset or YAML file, apply ``key=value`` overrides, validate. Raises ConfigError (one line)."""
    if not PRESET_DIR.is_dir():  # e.g. `pip install .`: the code alone, copied into site-packages
        raise ConfigError(f"no presets folder at {PRESET_DIR}: vitflow runs from a checkout of its repository, "
                          f"installed in place (make install, or pip install -e .), and keeps its stores (mlflow/, "
                          f"models/, .vitflow/) in that checkout")
    path = resolve_preset(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> StudyConfig:
    raw = copy.deepcopy(raw)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_first_error(exc)}") from None
