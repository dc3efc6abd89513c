"""Evaluation harnesses: mislabeled-sample detection (and, later, leave-one-out and LDS)."""

from influenciae.evaluation.mislabeling import (
    DetectionResult,
    EvaluationReport,
    MislabelingDetectorEvaluator,
    detection_curve,
    detection_metrics,
    flip_labels,
    load_tfds_arrays,
    roc_auc,
)

__all__ = [
    "DetectionResult",
    "EvaluationReport",
    "MislabelingDetectorEvaluator",
    "detection_curve",
    "detection_metrics",
    "flip_labels",
    "load_tfds_arrays",
    "roc_auc",
]
