"""The engine's input streams: a dataset (or held batches) validated once, as ``(indices, checked batch)`` passes.

:class:`IndexedStream` runs the checks of :func:`~influenciae.data.batches.with_checks` inside a ``tf.data``
pipeline; :class:`TensorStream` applies them to batches already held as tensors
(:class:`~influenciae.data.batches.TensorBatches`); :func:`stream_dataset` turns a generator back into a dataset
whose errors surface as the library's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from influenciae._backend import tf
from influenciae.data.batches import TensorBatches, _check_failure, checked_iteration, unpack_batch

__all__ = ["IndexedStream", "TensorStream", "check_first_batch", "stream_dataset"]


@dataclasses.dataclass(frozen=True)
class IndexedStream:
    """A dataset validated once, at the public method, and its checked, indexed pipeline.

    The engine's internals take this instead of the dataset: the structural checks (:func:`check_dataset`) and the
    first-batch check against the model ran when it was built, and every pass runs the cheap in-graph checks of
    :func:`with_checks` through :func:`checked_iteration`.

    Attributes:
        dataset: The user's batched dataset (``(inputs, targets[, sample_weight])``).
        pipeline: ``with_indices(with_checks(dataset))``: ``(indices [B] int64, batch)`` elements.
        name: The argument's name, for messages.
    """

    dataset: tf.data.Dataset
    pipeline: tf.data.Dataset
    name: str

    def batches(self, wrap: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> Iterator[tuple[tf.Tensor, Any]]:
        """One pass: ``(indices [B] int64, batch)`` in dataset order; a failed check raises a ``ValueError``.

        Args:
            wrap: Wraps the pipeline before iteration (e.g. a progress bar).
        """
        pipeline = self.pipeline if wrap is None else wrap(self.pipeline)
        yield from checked_iteration(pipeline, name=self.name)


@dataclasses.dataclass(frozen=True)
class TensorStream:
    """:class:`IndexedStream`'s twin for :class:`TensorBatches`: the same ``(indices, checked batch)`` pass, the
    checks applied to each held batch by ``check`` (a traced :func:`batch_checks`) instead of a pipeline."""

    dataset: TensorBatches
    check: Callable[..., Any]
    name: str

    def batches(self, wrap: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> Iterator[tuple[tf.Tensor, Any]]:
        """One pass, as :meth:`IndexedStream.batches`."""
        start = 0
        for position, batch in enumerate(self.dataset if wrap is None else wrap(self.dataset)):
            count = int(tf.nest.flatten(unpack_batch(batch).targets)[0].shape[0])
            try:
                checked = self.check(*batch)
            except tf.errors.InvalidArgumentError as error:
                raise _check_failure(error, self.name, position, start) from None
            yield tf.range(start, start + count, dtype=tf.int64), checked
            start += count


Stream = IndexedStream | TensorStream
"""What the engine's internals take: the validated stream of a dataset or of held batches."""


def check_first_batch(dataset: tf.data.Dataset, function: Callable[[Any], Any], what: str) -> None:
    """Run ``function`` on the first two examples of ``dataset`` and turn a failure into an error naming the fix."""
    for batch in dataset.take(1):
        probe = tf.nest.map_structure(lambda t: t[:2], tuple(batch))
        try:
            function(probe)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            shapes = tf.nest.map_structure(lambda t: tuple(t.shape), unpack_batch(probe).inputs)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(
                f"Computing {what} failed on a batch with input shapes {shapes}: {message}. Check that the dataset "
                "is batched (`dataset.batch(batch_size)`) and that its inputs fit the model."
            ) from error


def stream_dataset(generate: Callable[[], Iterator[Any]], output_signature: Any) -> tf.data.Dataset:
    """``tf.data.Dataset.from_generator`` whose iteration raises the generator's own ``ValueError``/``TypeError``.

    ``from_generator`` reports an exception of the generator as a ``tf.errors.InvalidArgumentError`` quoting its
    traceback; iterating the returned dataset directly re-raises the original exception instead (the library's
    message, naming the batch and the fix). Datasets derived from it (``.map``, ``.take``) keep TensorFlow's error.

    Args:
        generate: A function starting one pass of the generator.
        output_signature: The ``tf.TensorSpec`` structure of its elements.

    Returns:
        A ``tf.data.Dataset`` of the generated elements.
    """
    errors: list[BaseException] = []

    def recording() -> Iterator[Any]:
        try:
            yield from generate()
        except (ValueError, TypeError) as error:
            errors.append(error)
            raise

    return _SurfacingDataset(tf.data.Dataset.from_generator(recording, output_signature=output_signature), errors)


class _SurfacingDataset(tf.data.Dataset):
    """The dataset of :func:`stream_dataset`: a generator dataset whose eager iteration re-raises its errors."""

    def __init__(self, inner: tf.data.Dataset, errors: list[BaseException]) -> None:
        self._inner = inner
        self._errors = errors
        super().__init__(inner._variant_tensor)  # our own generator dataset, not a user's

    def _inputs(self) -> list[tf.data.Dataset]:
        return [self._inner]

    @property
    def element_spec(self) -> Any:
        return self._inner.element_spec

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        errors = self._errors

        def surfacing() -> Iterator[Any]:
            while True:
                try:
                    element = next(iterator)
                except StopIteration:
                    return
                except tf.errors.InvalidArgumentError:
                    if errors:
                        raise errors.pop() from None
                    raise
                yield element

        return surfacing()
