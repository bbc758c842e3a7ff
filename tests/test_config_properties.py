"""Property-based tests of the configuration parser: whatever a user types, the answer is a valid configuration
or one ConfigError line naming the field; never a traceback from deeper down."""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, DataConfig, ModelConfig, TrainConfig, CVConfig, load_config

FIELDS = ([f"model.{f}" for f in ModelConfig.model_fields] + [f"train.{f}" for f in TrainConfig.model_fields]
          + [f"data.{f}" for f in DataConfig.model_fields] + [f"cv.{f}" for f in CVConfig.model_fields if f != "grid"]
          + ["model.nope", "train", "nope.x", "cv.grid.model.depth", "cv.grid.train.lr", "cv.grid.model.heads"])

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-5, 40), max_size=4), st.lists(st.floats(-1, 1), max_size=3),
)


def _override(key, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=3))
def test_any_override_is_valid_or_one_clear_line(pairs):
    overrides = [_override(k, v) for k, v in pairs]
    try:
        cfg = load_config("seed", overrides)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and message
        assert any(key.split(".")[0] in message for key, _ in pairs) or "override" in message, message
        return
    # Accepted: the result is internally consistent and every grid point is buildable.
    assert cfg.model.dim % cfg.model.heads == 0 and cfg.model.image_size % cfg.model.patch_size == 0
    for cand in cfg.candidates():
        assert cand.model.dim % cand.model.heads == 0
        assert cand.train.lr > 0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_override_text_never_crashes(text):
    try:
        load_config("seed", [text])
    except ConfigError as exc:
        assert "\n" not in str(exc)
