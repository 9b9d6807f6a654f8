"""Evaluation figures: calibration error and the report the gate and the model card use."""

from __future__ import annotations

import numpy as np

from app.ml.evaluate import classification_report, expected_calibration_error


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # 10 predictions at 0.8 for "positive", 8 of them right: stated 80 %, observed 80 %.
    labels = np.array([1] * 8 + [0] * 2)
    assert expected_calibration_error(labels, np.full(10, 0.8)) == 0.0


def test_ece_measures_overconfidence() -> None:
    # Stated 0.9 confidence, observed 50 % accuracy: a gap of 0.4 on every prediction.
    labels = np.array([1, 0] * 50)
    assert abs(expected_calibration_error(labels, np.full(100, 0.9)) - 0.4) < 1e-12


def test_ece_uses_the_confidence_of_negative_predictions_too() -> None:
    # P(positive)=0.1 means 90 % confident "negative"; all right -> gap 0.1.
    labels = np.zeros(20, dtype=np.int64)
    assert abs(expected_calibration_error(labels, np.full(20, 0.1)) - 0.1) < 1e-12


def test_report_has_every_figure_and_a_consistent_confusion_matrix() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    proba = np.array([0.2, 0.6, 0.7, 0.9, 0.4])
    report = classification_report(labels, proba)
    assert report["confusion_matrix"]["matrix"] == [[1, 1], [1, 2]]
    assert report["accuracy"] == 0.6
    assert abs(report["balanced_accuracy"] - (0.5 + 2 / 3) / 2) < 1e-12
    assert abs(report["roc_auc"] - 5 / 6) < 1e-12
    assert {"f1_macro", "f1_positive", "ece", "reliability", "n"} <= report.keys()
