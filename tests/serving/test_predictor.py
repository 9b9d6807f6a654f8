"""The prediction record a response is built from."""

from __future__ import annotations

from dataclasses import asdict

from app.serving.predictor import Prediction


def test_as_dict_has_every_field_asdict_has() -> None:
    prediction = Prediction("a" * 32, "positive", 0.8, {"negative": 0.2, "positive": 0.8}, "v1")
    assert prediction.as_dict() == asdict(prediction)
