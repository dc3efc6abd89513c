"""Testing with Concept Activation Vectors (TCAV, Kim et al. 2018) for Keras models.

For a layer with activations ``a(x)``, a target output ``h_t`` (a class logit) and a CAV ``v``
(:mod:`influenciae.concepts.cav`), the **directional derivative** of an input is ``S(x) = ∇_a h_t(a(x)) · v``,
the first-order change of the target output when the activation moves toward the concept. Over the inputs of a
class, ``sign_count = |{x : S(x) > 0}| / |X|`` (the TCAV score of the paper) and
``magnitude = Σ_{S>0} |S| / Σ |S|``. The significance test trains CAVs of the concept against several random
concepts, and of a random concept against the same ones, and compares the two score distributions with a
two-sided t-test.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from influenciae.concepts.cav import CAV, CAVClassifier, CAVStore, train_cav
from influenciae.concepts.concept import Concept, _as_batched_dataset
from influenciae.model.layer_probe import LayerProbe, keras_model_of, resolve_layer_names

__all__ = ["TCAV", "tcav_scores"]

_SCORES = ("sign_count", "magnitude")


def tcav_scores(derivatives: np.ndarray) -> dict[str, np.ndarray]:
    """TCAV scores from directional derivatives.

    Args:
        derivatives: ``[num_inputs, num_concepts]`` directional derivatives ``S``.

    Returns:
        ``{"sign_count": [num_concepts], "magnitude": [num_concepts], "mean_derivative": [num_concepts]}``:
        the fraction of inputs with ``S > 0``; ``Σ_{S>0} |S| / Σ |S|`` (0 where every ``S`` is 0); and the mean of
        ``S`` (what Captum 0.9 returns under the key ``"magnitude"``, although its docstring states the ratio).
    """
    values = np.asarray(derivatives, np.float64)
    positive = values > 0
    total = np.abs(values).sum(axis=0)
    positive_total = np.where(positive, np.abs(values), 0.0).sum(axis=0)
    magnitude = np.divide(positive_total, total, out=np.zeros_like(total), where=total > 0)
    return {"sign_count": positive.mean(axis=0), "magnitude": magnitude, "mean_derivative": values.mean(axis=0)}


def _progress(iterable: Iterable[Any], enabled: bool, description: str) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description)


class TCAV:
    """TCAV for a functional or Sequential Keras model (or an ``InfluenceModel``), at one or several layers.

    Args:
        model: the model; its single output holds the target scores (use logits, as the paper does).
        layers: layer name(s) or index(es) into ``model.layers``.
        classifier: settings of the CAV classifier; default :class:`~influenciae.concepts.CAVClassifier`.
        save_path: a directory to store CAVs in (see :class:`~influenciae.concepts.CAVStore`); ``None`` keeps
            them in memory only.
        overwrite: replace stored CAVs built from other examples, weights or settings (otherwise they raise).
        batch_size: batch size used for array inputs.
        show_progress: show tqdm progress bars over CAV trainings and random concepts.

    Example:
        >>> tcav = TCAV(model, layers=["block2"])
        >>> scores = tcav.interpret(zebras, target=zebra_class, experimental_sets=[[stripes, random_0]])
        >>> scores["stripes-random_0"]["block2"]["sign_count"]          # [2]: stripes, random_0
        >>> tcav.significance(zebras, zebra_class, stripes, random_concepts(pool, 11, 50))["block2"]["p_value"]
    """

    def __init__(
        self,
        model: Any,
        layers: int | str | Sequence[int | str],
        *,
        classifier: CAVClassifier | None = None,
        save_path: str | Path | None = None,
        overwrite: bool = False,
        batch_size: int = 64,
        show_progress: bool = False,
    ) -> None:
        self.model = keras_model_of(model)
        self.layers = resolve_layer_names(self.model, layers)
        if classifier is not None and not isinstance(classifier, CAVClassifier):
            raise TypeError(f"classifier must be a CAVClassifier, got {type(classifier).__name__}.")
        self.classifier = classifier or CAVClassifier()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.store = None if save_path is None else CAVStore(save_path, overwrite=overwrite)
        self.probe = LayerProbe(self.model, self.layers)
        self.cavs: dict[str, dict[str, CAV]] = {}
        self._concepts: dict[str, Concept] = {}
        self._activations: dict[str, dict[str, np.ndarray]] = {}
        self._weights: dict[str, str] = {}

    # -- concepts and CAVs -----------------------------------------------------------------------------------

    def _check_set(self, concepts: Any) -> list[Concept]:
        if isinstance(concepts, Concept) or not isinstance(concepts, Sequence) or len(concepts) < 2:
            raise ValueError(
                f"An experimental set is a list of at least two concepts, e.g. [stripes, random_0]; got {concepts!r}."
            )
        names = []
        for concept in concepts:
            if not isinstance(concept, Concept):
                raise TypeError(f"Experimental sets hold Concept objects, got {type(concept).__name__}.")
            known = self._concepts.setdefault(concept.name, concept)
            if known is not concept:
                raise ValueError(
                    f"Two different Concept objects are named {concept.name!r}; concept names must be unique "
                    "(they key the results and the stored CAVs)."
                )
            names.append(concept.name)
        if len(set(names)) != len(names):
            raise ValueError(f"An experimental set lists a concept twice: {names}.")
        return list(concepts)

    def _concept_activations(self, concept: Concept, layer: str) -> np.ndarray:
        memo = self._activations.setdefault(concept.name, {})
        if layer not in memo:
            memo.update(concept.activations(self.model, self.layers, probe=self.probe))
        return memo[layer]

    def _metadata(self, concepts: Sequence[Concept], layer: str) -> dict[str, Any]:
        return {
            "concepts": [concept.name for concept in concepts],
            "concept_fingerprints": [concept.fingerprint for concept in concepts],
            "layer": layer,
            "weights_fingerprint": self._weights[layer],
            "classifier": self.classifier.to_config(),
        }

    def cav(self, concepts: Sequence[Concept], layer: str | int | None = None) -> CAV:
        """The CAV of one experimental set at one layer (trained, loaded from ``save_path`` or memoized).

        Args:
            concepts: the experimental set, e.g. ``[stripes, random_0]``.
            layer: one of this TCAV's layers (name or index into ``model.layers``); optional with one layer.

        Returns:
            The :class:`~influenciae.concepts.CAV`.

        Raises:
            ValueError: for a bad set or layer, or a stored CAV built from other inputs (see ``overwrite``).
        """
        self._refresh()
        return self._cav(self._check_set(concepts), self._layer_name(layer))

    def _refresh(self) -> None:
        """Forgets memoized activations and CAVs of layers whose weights changed since they were computed."""
        for layer in self.layers:
            fingerprint = self.probe.weights_fingerprint(layer)
            if self._weights.get(layer) not in (None, fingerprint):
                for by_layer in self.cavs.values():
                    by_layer.pop(layer, None)
                for by_concept in self._activations.values():
                    by_concept.pop(layer, None)
            self._weights[layer] = fingerprint

    def _cav(self, concepts: list[Concept], layer_name: str) -> CAV:
        key = "-".join(concept.name for concept in concepts)
        cached = self.cavs.get(key, {}).get(layer_name)
        if cached is not None:
            return cached
        metadata = None if self.store is None else self._metadata(concepts, layer_name)
        cav = None if self.store is None or metadata is None else self.store.load(metadata)
        if cav is None:
            activations = [self._concept_activations(concept, layer_name) for concept in concepts]
            cav = train_cav(
                activations, concepts=[c.name for c in concepts], layer=layer_name, classifier=self.classifier
            )
            if self.store is not None and metadata is not None:
                self.store.save(cav, metadata)
        self.cavs.setdefault(key, {})[layer_name] = cav
        return cav

    def compute_cavs(self, experimental_sets: Sequence[Sequence[Concept]]) -> dict[str, dict[str, CAV]]:
        """CAVs of every experimental set at every layer.

        Args:
            experimental_sets: a list of experimental sets (lists of concepts).

        Returns:
            ``{set key: {layer: CAV}}``, the set key being ``"-".join(concept names)``.
        """
        sets = self._check_sets(experimental_sets)
        self._refresh()
        pairs = [(concepts, layer) for concepts in sets for layer in self.layers]
        result: dict[str, dict[str, CAV]] = {}
        for concepts, layer in _progress(pairs, self.show_progress, "CAVs"):
            cav = self._cav(concepts, layer)
            result.setdefault(cav.key, {})[layer] = cav
        return result

    def _check_sets(self, experimental_sets: Any) -> list[list[Concept]]:
        if not isinstance(experimental_sets, Sequence) or not experimental_sets:
            raise ValueError(
                "experimental_sets must be a non-empty list of experimental sets, e.g. [[stripes, random]]."
            )
        if isinstance(experimental_sets[0], Concept):
            raise ValueError(
                "experimental_sets is a list of lists of concepts: wrap a single set, e.g. [[stripes, random_0]]."
            )
        return [self._check_set(concepts) for concepts in experimental_sets]

    def _layer_name(self, layer: str | int | None) -> str:
        if layer is None:
            if len(self.layers) != 1:
                raise ValueError(f"This TCAV has layers {self.layers}: name the layer.")
            return self.layers[0]
        [name] = resolve_layer_names(self.model, layer)
        if name not in self.layers:
            raise ValueError(f"Layer {name!r} is not one of this TCAV's layers {self.layers}.")
        return name

    # -- sensitivities and scores ----------------------------------------------------------------------------

    def sensitivities(self, inputs: Any, target: int | None) -> dict[str, np.ndarray]:
        """Gradients of the target output with respect to each layer's activations.

        Args:
            inputs: the class examples: an array ``[N, ...]`` or a batched ``tf.data.Dataset`` of inputs.
            target: the output unit (class index); ``None`` for a one-unit output.

        Returns:
            ``{layer: [N, F_layer]}`` (float64).
        """
        target_index = self.probe.check_target(target)
        dataset = _as_batched_dataset(inputs, self.batch_size, "inputs")
        parts: list[list[np.ndarray]] = [[] for _ in self.layers]
        for batch in dataset:
            _, gradients = self.probe.sensitivities(batch, target_index)
            for slot, gradient in enumerate(gradients):
                parts[slot].append(gradient.numpy().astype(np.float64))
        if not parts[0]:
            raise ValueError("inputs is empty; give the examples of the target class.")
        return {layer: np.concatenate(chunks) for layer, chunks in zip(self.layers, parts, strict=True)}

    def directional_derivatives(
        self, inputs: Any, target: int | None, concepts: Sequence[Concept], layer: str | int | None = None
    ) -> np.ndarray:
        """Directional derivatives ``S = ∇_a h_target · v`` of each input along each CAV of a set.

        Args:
            inputs: the class examples (array ``[N, ...]`` or batched dataset).
            target: the output unit.
            concepts: the experimental set.
            layer: the layer (optional with one layer).

        Returns:
            ``[N, num_concepts]``.
        """
        cav = self.cav(concepts, layer)
        gradients = self.sensitivities(inputs, target)[cav.layer]
        return self._derivatives(gradients, cav)

    @staticmethod
    def _derivatives(gradients: np.ndarray, cav: CAV) -> np.ndarray:
        if gradients.shape[1] != cav.vectors.shape[1]:
            raise ValueError(
                f"The layer {cav.layer!r} has {gradients.shape[1]} features but the CAV has {cav.vectors.shape[1]}."
            )
        return gradients @ cav.vectors.T

    def interpret(
        self, inputs: Any, target: int | None, experimental_sets: Sequence[Sequence[Concept]]
    ) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        """TCAV scores of each experimental set at each layer, as Captum's ``TCAV.interpret``.

        Args:
            inputs: the examples of the class being explained: an array ``[N, ...]`` or a batched dataset.
            target: the class (output unit) whose logit is differentiated; ``None`` for a one-unit output.
            experimental_sets: a list of experimental sets, each a list of concepts ``[concept, random...]``.

        Returns:
            ``{set key: {layer: {"sign_count": [C], "magnitude": [C], "mean_derivative": [C], "accuracy": [C]}}}``
            with one entry per concept of the set, in the set's order (see :func:`tcav_scores`); ``accuracy`` is
            the held-out accuracy of each concept's CAV classifier.
        """
        sets = self._check_sets(experimental_sets)
        cavs = self.compute_cavs(sets)
        gradients = self.sensitivities(inputs, target)
        scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for concepts in sets:
            key = "-".join(concept.name for concept in concepts)
            scores[key] = {}
            for layer in self.layers:
                cav = cavs[key][layer]
                result = tcav_scores(self._derivatives(gradients[layer], cav))
                result["accuracy"] = cav.accuracies
                scores[key][layer] = result
        return scores

    def significance(
        self,
        inputs: Any,
        target: int | None,
        concept: Concept,
        random_concepts: Sequence[Concept],
        *,
        random_counterpart: Concept | None = None,
        null: str = "counterpart",
        score: str = "sign_count",
        alpha: float = 0.05,
    ) -> dict[str, dict[str, Any]]:
        """The paper's statistical test: is the concept's TCAV score different from random ones'?

        The concept's scores are those of the sets ``[concept, R_i]`` for each random concept ``R_i``. The random
        (null) scores are, with ``null="counterpart"`` (the paper's and tensorflow/tcav's), those of ``[R_0, R_i]``
        for a random counterpart ``R_0`` (default: ``random_concepts[0]``, the others being the ``R_i``); with
        ``null="cyclic"``, those of ``[R_i, R_{i+1 mod N}]`` over all the random concepts, so that the null scores
        do not all share one counterpart's sampling noise (see ``docs/concepts.md``). The two samples are compared
        with a two-sided Student t-test (``scipy.stats.ttest_ind``). Two constant, equal samples give
        ``p_value = 1``.

        Args:
            inputs: the class examples (array ``[N, ...]`` or batched dataset).
            target: the class (output unit).
            concept: the concept under test.
            random_concepts: random concepts ``R_i`` (at least two besides the counterpart).
            random_counterpart: with ``null="counterpart"``, the random concept playing the concept's role.
            null: ``"counterpart"`` or ``"cyclic"``.
            score: ``"sign_count"`` (the paper's) or ``"magnitude"``.
            alpha: significance level for ``"significant"``.

        Returns:
            ``{layer: {"p_value", "t_statistic", "concept_scores" [R], "random_scores" [R], "concept_mean",
            "random_mean", "significant"}}``, ``R`` being the number of random concepts compared against.

        Raises:
            ValueError: for too few random concepts, an unknown score or null, or the concept among the randoms.
        """
        if score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES}, got {score!r}.")
        if null not in ("counterpart", "cyclic"):
            raise ValueError(f"null must be 'counterpart' or 'cyclic', got {null!r}.")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}.")
        randoms = list(random_concepts)
        if null == "cyclic":
            if random_counterpart is not None:
                raise ValueError("null='cyclic' uses no random counterpart; drop random_counterpart.")
            if len(randoms) < 2:
                raise ValueError(f"significance needs at least two random concepts, got {len(randoms)}.")
            null_sets = [[randoms[i], randoms[(i + 1) % len(randoms)]] for i in range(len(randoms))]
        else:
            if random_counterpart is None:
                if len(randoms) < 3:
                    raise ValueError(
                        "significance needs at least three random concepts (one counterpart and two to compare "
                        f"against), got {len(randoms)}; random_concepts(pool, num_concepts, size) draws them."
                    )
                random_counterpart, randoms = randoms[0], randoms[1:]
            if len(randoms) < 2:
                raise ValueError(
                    f"significance needs at least two random concepts to compare against, got {len(randoms)}."
                )
            null_sets = [[random_counterpart, random_concept] for random_concept in randoms]
        if concept in randoms or concept is random_counterpart:
            raise ValueError("The concept must not be among the random concepts or be the random counterpart.")
        self._check_set([concept, *randoms] + ([] if random_counterpart is None else [random_counterpart]))
        self._refresh()
        gradients = self.sensitivities(inputs, target)
        concept_scores: dict[str, list[float]] = {layer: [] for layer in self.layers}
        random_scores: dict[str, list[float]] = {layer: [] for layer in self.layers}
        jobs = list(zip(randoms, null_sets, strict=True))
        for random_concept, null_set in _progress(jobs, self.show_progress, "random concepts"):
            for layer in self.layers:
                for sink, concepts in ((concept_scores, [concept, random_concept]), (random_scores, null_set)):
                    cav = self._cav(concepts, layer)
                    sink[layer].append(float(tcav_scores(self._derivatives(gradients[layer], cav))[score][0]))
        results: dict[str, dict[str, Any]] = {}
        for layer in self.layers:
            ours, theirs = np.asarray(concept_scores[layer]), np.asarray(random_scores[layer])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                test = stats.ttest_ind(ours, theirs)
            statistic, p_value = float(test.statistic), float(test.pvalue)
            if np.isnan(p_value):  # both samples constant and equal: no evidence of a difference
                statistic, p_value = 0.0, 1.0
            results[layer] = {
                "p_value": p_value,
                "t_statistic": statistic,
                "concept_scores": ours,
                "random_scores": theirs,
                "concept_mean": float(ours.mean()),
                "random_mean": float(theirs.mean()),
                "significant": bool(p_value < alpha),
            }
        return results

    def __repr__(self) -> str:
        return f"TCAV(layers={self.layers}, classifier={self.classifier})"
