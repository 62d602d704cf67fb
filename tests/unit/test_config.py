"""melanoma.config: MELANOMA_* variables parsed by each setting's type, and refused in one line naming the variable."""

from __future__ import annotations

import pytest

from melanoma import config
from melanoma.config import SettingsError, settings


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), (" Yes ", True), ("ON", True), ("0", False), ("false", False), ("No", False), ("off", False)],
)
def test_booleans_are_read_by_their_words(raw, expected):
    assert config.parse("MELANOMA_FLAG", raw, bool) is expected


def test_a_bad_boolean_names_the_variable():
    with pytest.raises(SettingsError, match=r"^MELANOMA_FLAG='maybe' is not a boolean \(one of 1, true, yes, on, 0, "):
        config.parse("MELANOMA_FLAG", "maybe", bool)


def test_environment_values_take_the_type_of_their_setting(monkeypatch):
    monkeypatch.setenv("MELANOMA_EPOCHS", " 7 ")
    monkeypatch.setenv("MELANOMA_LEARNING_RATE", "3e-4")
    monkeypatch.setenv("MELANOMA_ARCH", "seed-cnn")

    s = settings()

    assert (s.epochs, s.learning_rate, s.arch) == (7, 3e-4, "seed-cnn")
    assert type(s.epochs) is int and type(s.learning_rate) is float
    assert s.workers == config.Settings.workers  # unset variables keep the default


def test_explicit_overrides_beat_the_environment(monkeypatch):
    monkeypatch.setenv("MELANOMA_EPOCHS", "7")

    assert settings(epochs=2).epochs == 2
    assert settings(epochs=None).epochs == 7


@pytest.mark.parametrize(
    ("variable", "raw", "message"),
    [
        ("MELANOMA_EPOCHS", "2.5", "MELANOMA_EPOCHS='2.5' is not an integer"),
        ("MELANOMA_WORKERS", "", "MELANOMA_WORKERS='' is not an integer"),
        ("MELANOMA_S3_REQUEST_TIMEOUT", "30s", "MELANOMA_S3_REQUEST_TIMEOUT='30s' is not a number"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch, variable, raw, message):
    monkeypatch.setenv(variable, raw)

    with pytest.raises(SettingsError) as caught:
        settings()

    assert str(caught.value) == message
