"""Evaluation harnesses: mislabeled-sample detection, leave-one-out retraining and the linear datamodeling score."""

from influenciae.evaluation.evaluators import (
    LeaveOneOutEvaluator,
    LeaveOneOutReport,
    LinearDatamodelingEvaluator,
    LinearDatamodelingReport,
)
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
from influenciae.evaluation.retraining import (
    LeaveOneOutResult,
    LinearDatamodelingResult,
    datamodeling_correlations,
    leave_one_out,
    linear_datamodeling_score,
    pearson_correlation,
    random_subsets,
    retrain_on_subsets,
    scale_ratio,
    spearman_correlation,
)

__all__ = [
    "DetectionResult",
    "EvaluationReport",
    "LeaveOneOutEvaluator",
    "LeaveOneOutReport",
    "LeaveOneOutResult",
    "LinearDatamodelingEvaluator",
    "LinearDatamodelingReport",
    "LinearDatamodelingResult",
    "MislabelingDetectorEvaluator",
    "datamodeling_correlations",
    "detection_curve",
    "detection_metrics",
    "flip_labels",
    "leave_one_out",
    "linear_datamodeling_score",
    "load_tfds_arrays",
    "pearson_correlation",
    "random_subsets",
    "retrain_on_subsets",
    "roc_auc",
    "scale_ratio",
    "spearman_correlation",
]
