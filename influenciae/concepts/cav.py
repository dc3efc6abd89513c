"""Concept activation vectors: linear classifiers on layer activations, and their on-disk store.

A CAV for a concept set ``[C_0, C_1, ...]`` at a layer is, for each concept ``C_i``, the unit normal of a linear
decision boundary separating the activations of ``C_i``'s examples from those of the other concepts of the set,
pointing **toward** ``C_i``. For the usual pair ``[concept, random]`` the two rows are ``v`` and ``-v``.

The default classifier is an L2-regularized logistic regression solved to convergence with L-BFGS (scipy, a core
dependency), deterministic given the seed of the train/test split; ``kind="sgd"`` uses scikit-learn's
``SGDClassifier(alpha=regularization)`` as Captum does (scikit-learn is imported only then).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize

from influenciae.cache import (
    atomic_write,
    canonical_configuration,
    fingerprint_arrays,
    read_manifest,
    write_manifest,
    write_npz,
)

__all__ = ["CAV", "CAVClassifier", "CAVStore", "train_cav"]

_CLASSIFIER_KINDS = ("logistic", "sgd")
_MANIFEST_KIND = "influenciae.concepts.cav"
_FORMAT_VERSION = 1
_OVERWRITE_HINT = "pass overwrite=True to retrain and replace it, or choose another save_path"


@dataclasses.dataclass(frozen=True)
class CAVClassifier:
    """Settings of the linear classifier that learns a CAV (stored with every cached CAV).

    Attributes:
        kind: ``"logistic"`` (L2 logistic regression with L-BFGS, no extra dependency) or ``"sgd"``
            (scikit-learn's ``SGDClassifier``, Captum's default; needs scikit-learn).
        regularization: L2 strength ``α`` of the objective ``mean log-loss + α/2 ‖w‖²`` (``alpha`` for sgd).
        test_fraction: fraction of each concept's examples held out to measure accuracy, in ``(0, 1)``.
        seed: seed of the train/test split (and of SGD).
        max_iter: iteration budget of the solver.
        tol: convergence tolerance of the solver.
    """

    kind: str = "logistic"
    regularization: float = 0.01
    test_fraction: float = 0.33
    seed: int = 0
    max_iter: int = 1000
    tol: float = 1e-8

    def __post_init__(self) -> None:
        if self.kind not in _CLASSIFIER_KINDS:
            raise ValueError(f"CAVClassifier.kind must be one of {_CLASSIFIER_KINDS}, got {self.kind!r}.")
        if not isinstance(self.regularization, numbers.Real) or not self.regularization >= 0:
            raise ValueError(f"regularization must be a non-negative number, got {self.regularization!r}.")
        if not isinstance(self.test_fraction, numbers.Real) or not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}.")
        for name in ("seed", "max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if not isinstance(self.tol, numbers.Real) or not self.tol > 0:
            raise ValueError(f"tol must be a positive number, got {self.tol!r}.")

    def to_config(self) -> dict[str, Any]:
        """The settings as a JSON-stable mapping (see :func:`influenciae.cache.canonical_configuration`)."""
        return canonical_configuration(dataclasses.asdict(self))

    def fit(self, features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        """Fits a binary linear classifier ``sign(w·a + b)``.

        Args:
            features: activations ``[n, F]``.
            labels: ``[n]`` booleans, ``True`` for the positive class.

        Returns:
            ``(w [F], b)``: the positive class is on the side ``w·a + b > 0``.
        """
        x = np.asarray(features, np.float64)
        y = np.asarray(labels, bool)
        if self.kind == "sgd":
            return self._fit_sgd(x, y)
        signs = np.where(y, 1.0, -1.0)
        num_examples, num_features = x.shape
        alpha = float(self.regularization)

        def objective(parameters: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = parameters[:-1], parameters[-1]
            margins = signs * (x @ w + b)
            loss = float(np.mean(np.logaddexp(0.0, -margins)) + 0.5 * alpha * w @ w)
            weights = -signs * _sigmoid(-margins) / num_examples
            gradient = np.concatenate([x.T @ weights + alpha * w, [weights.sum()]])
            return loss, gradient

        if alpha > 0 and num_features < 1024:
            return _newton_logistic(x, signs, alpha, int(self.max_iter), float(self.tol), objective)
        result = optimize.minimize(
            objective,
            np.zeros(num_features + 1),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": int(self.max_iter), "gtol": float(self.tol), "ftol": float(self.tol) * 1e-3},
        )
        return result.x[:-1], float(result.x[-1])

    def _fit_sgd(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        try:
            from sklearn.linear_model import SGDClassifier
        except ImportError as error:
            raise ImportError(
                "CAVClassifier(kind='sgd') needs scikit-learn: pip install scikit-learn, or use kind='logistic' "
                "(no extra dependency)."
            ) from error
        model = SGDClassifier(
            alpha=float(self.regularization), max_iter=int(self.max_iter), tol=1e-3, random_state=int(self.seed)
        )
        model.fit(x, y.astype(np.int64))
        sign = 1.0 if model.classes_[-1] == 1 else -1.0
        return sign * np.asarray(model.coef_[0], np.float64), sign * float(model.intercept_[0])


def _newton_logistic(
    x: np.ndarray, signs: np.ndarray, alpha: float, max_iter: int, tol: float, objective: Callable[..., Any]
) -> tuple[np.ndarray, float]:
    """Newton's method with backtracking for the (strongly convex) L2 logistic objective; few dense solves."""
    num_examples, num_features = x.shape
    design = np.concatenate([x, np.ones((num_examples, 1))], axis=1)
    ridge = np.full(num_features + 1, alpha)
    ridge[-1] = 1e-12 * alpha  # the intercept is not regularized; a tiny ridge keeps the system definite
    parameters = np.zeros(num_features + 1)
    loss, gradient = objective(parameters)
    for _ in range(max(1, max_iter)):
        if np.max(np.abs(gradient)) <= tol:
            break
        probabilities = _sigmoid(signs * (design @ parameters))
        curvature = probabilities * (1 - probabilities) / num_examples
        hessian = design.T @ (design * curvature[:, None]) + np.diag(ridge)
        step = np.linalg.solve(hessian, gradient)
        size = 1.0
        while True:
            candidate = parameters - size * step
            candidate_loss, candidate_gradient = objective(candidate)
            if candidate_loss <= loss - 1e-4 * size * gradient @ step or size < 1e-10:
                break
            size *= 0.5
        parameters, loss, gradient = candidate, candidate_loss, candidate_gradient
    return parameters[:-1], float(parameters[-1])


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -values))


@dataclasses.dataclass(frozen=True)
class CAV:
    """The concept activation vectors of one concept set at one layer.

    Attributes:
        concepts: names of the concepts of the set, in order.
        layer: the layer name.
        vectors: ``[num_concepts, F]`` unit vectors; row ``i`` is normal to the boundary between concept ``i``
            and the others, pointing toward concept ``i`` (for a pair, row 1 is minus row 0).
        accuracies: ``[num_concepts]`` held-out accuracy of each row's classifier.
        train_accuracies: ``[num_concepts]`` accuracy on the training split.
    """

    concepts: tuple[str, ...]
    layer: str
    vectors: np.ndarray
    accuracies: np.ndarray
    train_accuracies: np.ndarray

    @property
    def key(self) -> str:
        """The experimental-set key, ``"-".join(concepts)`` (as Captum's, with names instead of ids)."""
        return "-".join(self.concepts)

    @property
    def vector(self) -> np.ndarray:
        """The CAV of the first concept of the set ``[F]`` (a unit vector pointing toward it)."""
        return self.vectors[0]

    @property
    def accuracy(self) -> float:
        """Held-out accuracy of the first concept's classifier."""
        return float(self.accuracies[0])


def _split(num_examples: int, test_fraction: float, generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = generator.permutation(num_examples)
    num_test = int(np.clip(round(test_fraction * num_examples), 1, num_examples - 1))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def train_cav(
    activations: Sequence[np.ndarray],
    *,
    concepts: Sequence[str],
    layer: str,
    classifier: CAVClassifier | None = None,
) -> CAV:
    """Learns the CAVs of a concept set from its activations at one layer.

    Each concept's examples are split (seeded, ``test_fraction`` held out); for a pair one classifier separates
    concept 0 from concept 1, for more concepts one classifier per concept separates it from the rest.

    Args:
        activations: one array ``[n_i, F]`` per concept.
        concepts: the concept names (same order).
        layer: the layer name (recorded in the result).
        classifier: classifier settings; default :class:`CAVClassifier()`.

    Returns:
        The :class:`CAV`.

    Raises:
        ValueError: for fewer than two concepts, a concept with fewer than two examples, mismatched feature
            sizes, or concepts the classifier cannot tell apart (a zero normal vector).
    """
    classifier = classifier or CAVClassifier()
    if len(activations) < 2 or len(activations) != len(concepts):
        raise ValueError(f"A CAV needs at least two concepts with one activation array each, got {len(concepts)}.")
    arrays = [np.asarray(a, np.float64).reshape(len(a), -1) for a in activations]
    sizes = {a.shape[1] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"The concepts' activations at layer {layer!r} have different sizes {sorted(sizes)}.")
    for name, array in zip(concepts, arrays, strict=True):
        if array.shape[0] < 2:
            raise ValueError(f"Concept {name!r} has {array.shape[0]} example(s); a CAV needs at least two per concept.")
    generator = np.random.default_rng(classifier.seed)
    splits = [_split(len(array), classifier.test_fraction, generator) for array in arrays]
    x_train = np.concatenate([a[train] for a, (train, _) in zip(arrays, splits, strict=True)])
    x_test = np.concatenate([a[test] for a, (_, test) in zip(arrays, splits, strict=True)])
    label_train = np.concatenate([np.full(len(train), i) for i, (train, _) in enumerate(splits)])
    label_test = np.concatenate([np.full(len(test), i) for i, (_, test) in enumerate(splits)])
    positives = [0] if len(arrays) == 2 else list(range(len(arrays)))
    vectors, accuracies, train_accuracies = [], [], []
    for positive in positives:
        w, b = classifier.fit(x_train, label_train == positive)
        norm = float(np.linalg.norm(w))
        if not np.isfinite(norm) or norm == 0.0:
            raise ValueError(
                f"The classifier for concept {concepts[positive]!r} at layer {layer!r} found no direction (zero "
                "normal vector): the concepts' activations are indistinguishable there. Use other examples or "
                "another layer."
            )
        vectors.append(w / norm)
        accuracies.append(np.mean((x_test @ w + b > 0) == (label_test == positive)))
        train_accuracies.append(np.mean((x_train @ w + b > 0) == (label_train == positive)))
    if len(arrays) == 2:
        vectors.append(-vectors[0])
        accuracies.append(accuracies[0])
        train_accuracies.append(train_accuracies[0])
    return CAV(
        concepts=tuple(concepts),
        layer=layer,
        vectors=np.stack(vectors),
        accuracies=np.asarray(accuracies, np.float64),
        train_accuracies=np.asarray(train_accuracies, np.float64),
    )


class CAVStore:
    """CAVs on disk, one manifest per (concept set, layer), refused when anything they depend on changed.

    Each CAV is two files in ``directory``: ``<stem>.json`` (the manifest) and ``<stem>-<token>.npz`` (its
    arrays, pickle-free). The manifest records the concept names and the fingerprints of their examples, the
    layer, the fingerprint of the model weights up to that layer, the classifier settings (with the seed), the
    array file's name and a checksum of its arrays. Both files are written with the atomic write of
    :mod:`influenciae.cache` (temporary file, fsync, rename), the arrays first, so a crash never leaves a
    manifest pointing at a partial file.

    Policy on a mismatch: :meth:`load` raises a ``ValueError`` naming the fields that differ (a CAV is never
    silently retrained over, nor reused); with ``overwrite=True`` the stale CAV is retrained and replaced.

    Args:
        directory: the store directory (created if needed).
        overwrite: replace stored CAVs whose metadata differ instead of raising.
    """

    def __init__(self, directory: str | Path, *, overwrite: bool = False) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"CAV save_path {self.directory} exists and is not a directory; choose another path.")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.overwrite = overwrite

    @staticmethod
    def _stem(concepts: Sequence[str], layer: str) -> str:
        readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(concepts) + "--" + layer)[:80]
        digest = hashlib.sha256(json.dumps([list(concepts), layer]).encode()).hexdigest()[:16]
        return f"cav-{readable}-{digest}"

    def load(self, metadata: Mapping[str, Any]) -> CAV | None:
        """Returns the stored CAV with this metadata, ``None`` if none is stored (or a stale one is to be replaced).

        Args:
            metadata: the expected manifest fields (``concepts``, ``layer``, fingerprints, classifier).

        Raises:
            ValueError: if the stored CAV was built from other examples, weights or settings (and not
                ``overwrite``), or its array file is missing or modified.
        """
        expected = canonical_configuration(metadata)
        manifest_path = self.directory / f"{self._stem(expected['concepts'], expected['layer'])}.json"
        manifest = read_manifest(manifest_path, _MANIFEST_KIND, what="an influenciae CAV manifest")
        if manifest is None:
            return None
        differences = []
        if manifest.get("format_version") != _FORMAT_VERSION:
            differences.append(f"format_version: stored {manifest.get('format_version')!r}, code {_FORMAT_VERSION}")
        stored = manifest.get("metadata", {})
        for key in sorted(set(stored) | set(expected)):
            if stored.get(key) != expected.get(key):
                differences.append(f"{key}: stored {_short(stored.get(key))}, given {_short(expected.get(key))}")
        if differences:
            if self.overwrite:
                return None
            raise ValueError(
                f"The CAV stored in {manifest_path} was built with other inputs: {'; '.join(differences)}; "
                f"{_OVERWRITE_HINT}."
            )
        array_path = self.directory / str(manifest.get("file"))
        if not array_path.is_file():
            raise ValueError(f"The CAV array file {array_path} named by {manifest_path} is missing; {_OVERWRITE_HINT}.")
        with np.load(array_path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in ("vectors", "accuracies", "train_accuracies")}
        if fingerprint_arrays(arrays.values()) != manifest.get("checksum"):
            raise ValueError(f"The CAV array file {array_path} was modified since it was written; {_OVERWRITE_HINT}.")
        return CAV(
            concepts=tuple(expected["concepts"]),
            layer=str(expected["layer"]),
            vectors=arrays["vectors"],
            accuracies=arrays["accuracies"],
            train_accuracies=arrays["train_accuracies"],
        )

    def save(self, cav: CAV, metadata: Mapping[str, Any]) -> Path:
        """Writes ``cav`` with its metadata (atomically) and returns the manifest path."""
        expected = canonical_configuration(metadata)
        stem = self._stem(expected["concepts"], expected["layer"])
        manifest_path = self.directory / f"{stem}.json"
        previous = None
        if manifest_path.exists():
            try:
                previous = json.loads(manifest_path.read_text()).get("file")
            except (OSError, ValueError, AttributeError):
                previous = None
        arrays = {"vectors": cav.vectors, "accuracies": cav.accuracies, "train_accuracies": cav.train_accuracies}
        file_name = f"{stem}-{secrets.token_hex(8)}.npz"
        atomic_write(self.directory / file_name, lambda handle: write_npz(handle, arrays))
        fields = {"metadata": expected, "file": file_name, "checksum": fingerprint_arrays(arrays.values())}
        write_manifest(manifest_path, _MANIFEST_KIND, _FORMAT_VERSION, fields)
        if isinstance(previous, str) and previous != file_name and (self.directory / previous).is_file():
            (self.directory / previous).unlink()
        return manifest_path


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
