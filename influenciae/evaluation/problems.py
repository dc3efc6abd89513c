"""The problems the evaluation harnesses share: the bundled digits (and breast cancer), their splits and models.

:func:`digits` is the one place the digits are loaded (flat pixels, 2×2-pooled pixels or images);
:func:`seeded_split` draws a seeded train/test split; :func:`digits_problem` and :func:`train_digits_mlp` are the
mislabeled-detection problem; :func:`load_problem`, :func:`build_model`, :func:`per_example_loss` and
:class:`FullBatchTrainer` are the faithfulness problems (float64 models trained to a real optimum).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from influenciae.model.training import (
    REGULARIZATION,
    FullBatchTrainer,
    build_model,
    digits_loss,
    per_example_loss,
    train_digits_mlp,
)

__all__ = [
    "BATCH_SIZE",
    "DIGITS_FORMS",
    "FullBatchTrainer",
    "HIDDEN_UNITS",
    "Problem",
    "REGULARIZATION",
    "SPLITS",
    "build_model",
    "digits",
    "digits_loss",
    "digits_problem",
    "load_problem",
    "per_example_loss",
    "seeded_split",
    "train_digits_mlp",
]

BATCH_SIZE = 128
"""Batch size of the evaluation's datasets and training."""
DIGITS_FORMS = ("flat", "pooled", "images")
"""The forms of :func:`digits`."""


def digits(form: str = "flat") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1,797 images, no network): ``(inputs, labels [1797] int64)``.

    Args:
        form: ``"flat"``: inputs ``[1797, 64]`` float32 in ``[0, 1]``; ``"pooled"``: ``[1797, 16]`` float64, the
            8×8 images 2×2 average-pooled to 4×4, in ``[0, 1]``; ``"images"``: ``[1797, 8, 8, 1]`` float32 in
            ``[0, 1]``.

    Raises:
        ValueError: If ``form`` is not one of :data:`DIGITS_FORMS`.
    """
    from sklearn.datasets import load_digits

    if form not in DIGITS_FORMS:
        raise ValueError(f"form must be one of {DIGITS_FORMS}, got {form!r}.")
    data = load_digits()
    labels = data.target.astype(np.int64)
    if form == "pooled":
        # 2×2 average pooling of the 8×8 images: 16 features keep the exact Hessians small (170 and 442 parameters)
        return data.data.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16) / 16.0, labels
    if form == "images":
        return (data.images / 16.0).astype(np.float32)[..., None], labels
    return (data.data / 16.0).astype("float32"), labels


def seeded_split(
    inputs: np.ndarray, labels: np.ndarray, *, seed: int, num_train: int, num_test: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded random split: ``(inputs, labels, test_inputs, test_labels)`` of ``num_train`` and ``num_test`` rows.

    The rows are a permutation by ``np.random.default_rng(seed)``: the first ``num_train`` train, the next
    ``num_test`` test.
    """
    order = np.random.default_rng(seed).permutation(len(inputs))
    train, test = order[:num_train], order[num_train : num_train + num_test]
    return inputs[train], labels[train], inputs[test], labels[test]


def digits_problem() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as ``(inputs [1797, 64] float32 in [0, 1], labels [1797])``."""
    return digits("flat")


HIDDEN_UNITS = {"digits": 16, "breast_cancer": 8}
"""Hidden units of the faithfulness MLP, per problem."""


SPLITS = {"digits": (400, 100), "breast_cancer": (400, 100)}
"""``(training, test)`` examples of each faithfulness problem."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """A classification problem of the faithfulness section, split into training and test examples."""

    name: str
    inputs: np.ndarray
    labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def num_outputs(self) -> int:
        """One logit for a binary problem (sigmoid), one per class otherwise (softmax)."""
        return 1 if self.num_classes == 2 else self.num_classes


def load_problem(name: str, *, seed: int = 0) -> Problem:
    """``"digits"`` (4×4 pooled pixels in [0, 1]) or ``"breast_cancer"`` (standardized), a seeded split."""
    from sklearn.datasets import load_breast_cancer

    if name == "digits":
        inputs, labels = digits("pooled")
    elif name == "breast_cancer":
        data = load_breast_cancer()
        inputs = (data.data - data.data.mean(axis=0)) / data.data.std(axis=0)
        labels = data.target.astype(np.int64)
    else:
        raise ValueError(f"Unknown problem {name!r}: choose 'digits' or 'breast_cancer'.")
    num_train, num_test = SPLITS[name]
    split = seeded_split(inputs, labels, seed=seed, num_train=num_train, num_test=num_test)
    return Problem(name, *split, int(labels.max()) + 1)
