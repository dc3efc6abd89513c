"""Concepts: named sets of example inputs, and their activations at the layers of a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from influenciae._backend import tf
from influenciae.cache import combine_hashes, hash_batch
from influenciae.model.layer_probe import LayerProbe

__all__ = ["Concept", "random_concepts"]


def _as_batched_dataset(examples: Any, batch_size: int, what: str) -> tf.data.Dataset:
    """Turns arrays (or a nested structure of arrays) into a batched dataset; datasets pass through."""
    if isinstance(examples, tf.data.Dataset):
        for spec in tf.nest.flatten(examples.element_spec):
            if spec.shape.rank is not None and spec.shape.rank == 0:
                raise ValueError(
                    f"{what} is a dataset of scalars; it must yield batches of inputs [batch, ...]: call .batch(n)."
                )
        return examples
    leaves = tf.nest.flatten(examples)
    if not leaves:
        raise ValueError(f"{what} is empty; give at least two examples.")
    sizes = set()
    for leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"{what} must be arrays of examples [num_examples, ...], got a scalar.")
        sizes.add(int(shape[0]))
    if len(sizes) != 1:
        raise ValueError(f"The arrays of {what} have different numbers of examples: {sorted(sizes)}.")
    if sizes == {0}:
        raise ValueError(f"{what} is empty; give at least two examples.")
    return tf.data.Dataset.from_tensor_slices(examples).batch(batch_size)


class Concept:
    """A named concept, given by example inputs (e.g. images of stripes), as in TCAV (Kim et al., 2018).

    Args:
        name: a unique, non-empty name; the key of the concept in TCAV results.
        examples: the concept's example inputs: an array ``[num_examples, ...]`` (or a nested structure of
            arrays for multi-input models) or a batched ``tf.data.Dataset`` yielding inputs only (no targets).
            A dataset must yield the same examples in the same order every time it is iterated.
        batch_size: batch size used when ``examples`` are arrays.

    Example:
        >>> stripes = Concept("stripes", striped_images)          # [n, 32, 32, 3]
        >>> random_0 = Concept("random_0", tf.data.Dataset.from_tensor_slices(noise).batch(32))
    """

    def __init__(self, name: str, examples: Any, *, batch_size: int = 64) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"A concept name must be a non-empty string, got {name!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.name = name
        self.dataset = _as_batched_dataset(examples, batch_size, f"The examples of concept {name!r}")
        self._fingerprint: str | None = None
        self._num_examples: int | None = None

    def __repr__(self) -> str:
        size = "?" if self._num_examples is None else self._num_examples
        return f"Concept({self.name!r}, num_examples={size})"

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the concept's example batches (dtype, shape and bytes, in order); stored with its CAVs."""
        if self._fingerprint is None:
            self._record([hash_batch(batch) for batch in self.dataset], None)
        return str(self._fingerprint)

    @property
    def num_examples(self) -> int:
        """Number of examples (iterates the dataset once if needed)."""
        if self._num_examples is None:
            self._record([hash_batch(batch) for batch in self.dataset], None)
        return int(self._num_examples or 0)

    def _record(self, hashes: list[str], count: int | None) -> None:
        fingerprint = combine_hashes(hashes)
        if self._fingerprint is not None and fingerprint != self._fingerprint:
            raise ValueError(
                f"The examples of concept {self.name!r} changed between two iterations (a shuffled or random "
                "dataset?); a concept's dataset must yield the same examples every time."
            )
        self._fingerprint = fingerprint
        if count is None:
            count = 0
            for batch in self.dataset:
                count += int(tf.shape(tf.nest.flatten(batch)[0])[0])
        self._num_examples = count

    def activations(self, model: Any, layers: Sequence[str] | str, *, probe: LayerProbe | None = None) -> dict:
        """Activations of the concept's examples at some layers, flattened per example.

        Args:
            model: a functional or Sequential Keras model, or an ``InfluenceModel``.
            layers: a layer name or a list of layer names.
            probe: an already built :class:`~influenciae.model.layer_probe.LayerProbe` for these layers (reused
                by :class:`~influenciae.concepts.TCAV`).

        Returns:
            ``{layer name: numpy array [num_examples, F_layer]}``.

        Raises:
            ValueError: if the concept has no examples or a layer is unknown.
        """
        names = [layers] if isinstance(layers, str) else list(layers)
        if probe is None:
            probe = LayerProbe(model, names)
        positions = [probe.layer_names.index(name) for name in names]
        parts: list[list[np.ndarray]] = [[] for _ in names]
        hashes = []
        count = 0
        for batch in self.dataset:
            hashes.append(hash_batch(batch))
            outputs = probe.activations(batch)
            for slot, position in enumerate(positions):
                parts[slot].append(outputs[position].numpy())
            count += int(outputs[0].shape[0])
        if count == 0:
            raise ValueError(f"Concept {self.name!r} has no examples; give at least two.")
        self._record(hashes, count)
        return {name: np.concatenate(chunks, axis=0) for name, chunks in zip(names, parts, strict=True)}


def random_concepts(
    pool: Any,
    num_concepts: int,
    size: int,
    *,
    seed: int = 0,
    prefix: str = "random",
    batch_size: int = 64,
) -> list[Concept]:
    """Random concepts: disjointly seeded random subsets of a pool of inputs, for TCAV's significance test.

    Args:
        pool: an array of inputs ``[num_pool, ...]`` (or a nested structure of arrays).
        num_concepts: how many random concepts to draw.
        size: number of examples per concept (drawn without replacement within a concept).
        seed: seed of the draws.
        prefix: concept names are ``f"{prefix}_{i}"``.
        batch_size: batch size of each concept's dataset.

    Returns:
        ``num_concepts`` concepts.

    Raises:
        ValueError: if ``size`` exceeds the pool or the counts are not positive.

    Example:
        >>> randoms = random_concepts(x_pool, num_concepts=11, size=50, seed=0)
    """
    leaves = tf.nest.flatten(pool)
    if not leaves or len(np.shape(leaves[0])) == 0:
        raise ValueError("pool must be an array of inputs [num_pool, ...].")
    num_pool = int(np.shape(leaves[0])[0])
    if isinstance(num_concepts, bool) or not isinstance(num_concepts, int) or num_concepts <= 0:
        raise ValueError(f"num_concepts must be a positive integer, got {num_concepts!r}.")
    if isinstance(size, bool) or not isinstance(size, int) or not 2 <= size <= num_pool:
        raise ValueError(f"size must be an integer between 2 and the pool size {num_pool}, got {size!r}.")
    generator = np.random.default_rng(seed)
    concepts = []
    for index in range(num_concepts):
        chosen = np.sort(generator.choice(num_pool, size=size, replace=False))
        examples = tf.nest.map_structure(lambda leaf, chosen=chosen: np.asarray(leaf)[chosen], pool)
        concepts.append(Concept(f"{prefix}_{index}", examples, batch_size=batch_size))
    return concepts
