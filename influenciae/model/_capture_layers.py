"""The layers LayerCapture records, and how each maps to a Kronecker block of the flat parameter vector.

Which layers are captured (found anywhere in the model, nested ones included: MultiHeadAttention's projections,
KerasHub blocks, layers of a subclassed model):

* ``Dense`` (Kronecker block): every leading position of an N-D input (``[B, T, D]``: every token).
* ``EinsumDense`` (Kronecker block): "a Dense over the contracted axes": rows = the kernel axes shared with the
  input, columns = the kernel's output axes, tokens = the input's other non-batch axes (MultiHeadAttention's
  ``"abc,cde->abde"`` and ``"abcd,cde->abe"``, ``"...b,bc->...c"``). A bias on exactly the column axes is the
  appended row; any other bias (broadcast over a column axis, or per token) gets a diagonal block.
* ``Conv1D``, ``Conv2D`` (Kronecker block): every output position, ``a`` = the unfolded patch (``same``, ``valid``,
  ``causal``; strides, dilation; channels-last, ``groups=1``).
* ``Embedding`` (Kronecker block with a diagonal ``A``): every token, ``a`` = its one-hot (never formed); padding
  tokens count as tokens.
* Anything else (``LayerNormalization``, ``BatchNormalization``, custom layers, LoRA or quantized layers, EinsumDense
  equations with a kernel axis shared by the input and the output): not captured, a **diagonal** block ``E[g²]``
  from a vectorized Jacobian (no error). Leave such weights out with ``InfluenceModel(weights_to_watch=...)``.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any, NamedTuple

import numpy as np

from influenciae.model._backend import is_keras3_object, keras, tf


@dataclasses.dataclass(frozen=True)
class CapturedLayer:
    """A watched Dense, EinsumDense, Conv1D, Conv2D or Embedding layer and its slice of the flat parameter vector.

    The layer's weights are seen as one matrix ``W [num_rows, num_columns]``: the kernel reshaped to
    ``[-1, c_out]`` (an EinsumDense kernel transposed to ``[contracted axes..., output axes...]`` first) with the bias
    (when watched) appended as a last row, so a layer input gets an appended 1. For an Embedding, rows are vocabulary
    entries and ``a`` is a one-hot token.

    Attributes:
        name: The layer's name.
        kind: ``"dense"``, ``"einsum_dense"``, ``"conv1d"``, ``"conv2d"`` or ``"embedding"``.
        num_rows: ``d_in`` (+1 with a bias), or the vocabulary size for an Embedding.
        num_columns: ``d_out`` (units, filters or embedding dimension).
        has_bias: Whether the last row is the bias.
        parameter_indices: ``[num_rows * num_columns]`` positions in the flat parameter vector of the matrix
            entries, row-major (``W[r, c]`` is ``parameter_indices[r * num_columns + c]``).
        weight_names: Names of the watched weights of the block (kernel, then bias).
        layer: The Keras layer.
        einsum: For an EinsumDense, the einsum transposes ``(input -> [B, tokens, rows], output -> [B, tokens,
            columns], back)``; None otherwise.
    """

    name: str
    kind: str
    num_rows: int
    num_columns: int
    has_bias: bool
    parameter_indices: np.ndarray = dataclasses.field(repr=False)
    weight_names: tuple[str, ...]
    layer: Any = dataclasses.field(repr=False, compare=False)
    einsum: tuple[str, str, str] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def num_params(self) -> int:
        """Parameters in the block, ``num_rows × num_columns``."""
        return self.num_rows * self.num_columns


class LayerStatistics(NamedTuple):
    """What one capture pass records for one layer, every call of the layer concatenated along positions.

    Attributes:
        activations: ``[B, T, num_rows]`` layer inputs ``a`` (with the appended 1 when there is a bias) for Dense,
            EinsumDense and convolutions; ``[B, T]`` int64 token ids for an Embedding.
        gradients: ``[K, B, T, num_columns]`` pre-activation pseudo-gradients ``g``, one slice per backward pass
            (``K = 1`` except for ``fisher="expected"``).
    """

    activations: tf.Tensor
    gradients: tf.Tensor


def supported_layer_kind(layer: Any) -> str | None:
    """``"dense"``, ``"einsum_dense"``, ``"conv1d"``, ``"conv2d"`` or ``"embedding"`` when captured exactly, else None.

    Subclasses that override ``call``, LoRA-enabled or quantized layers, channels-first or grouped convolutions,
    EinsumDense equations that are not "a Dense over the contracted axes" (a kernel axis shared with the input and the
    output, an input axis summed without the kernel, repeated letters) and legacy ``tf_keras`` layers are not
    captured: their weights get diagonal curvature blocks.
    """
    if not is_keras3_object(layer) or getattr(layer, "lora_enabled", False):
        return None
    if getattr(layer, "quantization_mode", None) is not None:
        return None
    klass = type(layer)
    if isinstance(layer, keras.layers.Dense) and klass.call is keras.layers.Dense.call:
        return "dense"
    if isinstance(layer, keras.layers.EinsumDense) and klass.call is keras.layers.EinsumDense.call:
        return "einsum_dense" if _einsum_plan(layer) is not None else None
    for kind, base in (("conv1d", keras.layers.Conv1D), ("conv2d", keras.layers.Conv2D)):
        if isinstance(layer, base) and klass.call is base.call:
            if layer.data_format == "channels_last" and getattr(layer, "groups", 1) == 1:
                return kind
            return None
    if isinstance(layer, keras.layers.Embedding) and klass.call is keras.layers.Embedding.call:
        return "embedding"
    return None


class _EinsumPlan(NamedTuple):
    """How an EinsumDense ``x, W -> y`` is a Dense ``W [rows, columns]`` applied at every "token" position.

    ``to_rows``: einsum ``x -> [batch, tokens..., contracted...]``; ``to_canonical``/``from_canonical``: between
    ``y`` and ``[batch, tokens..., columns...]``; ``kernel_axes``: the transpose of the kernel to
    ``[contracted..., columns...]``; ``bias_is_column``: the bias spans exactly the column axes (no broadcast over
    columns, no per-token bias), so it is the appended row.
    """

    to_rows: str
    to_canonical: str
    from_canonical: str
    kernel_axes: tuple[int, ...]
    num_contracted: int
    bias_is_column: bool


def _einsum_plan(layer: Any) -> _EinsumPlan | None:
    """The Dense view of a built EinsumDense layer, or None when its equation has no Kronecker structure."""
    if not getattr(layer, "built", False) or getattr(layer, "input_spec", None) is None:
        return None
    rank = getattr(layer.input_spec, "ndim", None)
    match = re.fullmatch(r"([a-zA-Z.]+),([a-zA-Z]+)->([a-zA-Z.]+)", layer.equation.replace(" ", ""))
    if match is None or rank is None:
        return None
    inputs, kernel, outputs = match.groups()
    if inputs.count("...") != outputs.count("...") or inputs.count("...") > 1:
        return None
    if "..." in inputs:  # resolve the ellipsis with fresh letters, as many as the built input rank needs
        elided = rank - (len(inputs) - 3)
        fresh = "".join(c for c in string.ascii_letters if c not in layer.equation)[: max(elided, 0)]
        inputs, outputs = inputs.replace("...", fresh), outputs.replace("...", fresh)
    if "." in inputs + outputs or len(inputs) != rank:
        return None
    if any(len(set(spec)) != len(spec) for spec in (inputs, kernel, outputs)):
        return None
    batch = inputs[0]
    contracted = [c for c in kernel if c in inputs and c not in outputs]
    columns = [c for c in outputs if c in kernel and c not in inputs]
    tokens = [c for c in inputs[1:] if c in outputs and c not in kernel]
    if batch in kernel or batch not in outputs or not contracted or not columns:
        return None
    if len(contracted) + len(tokens) + 1 != len(inputs) or len(contracted) + len(columns) != len(kernel):
        return None  # an input axis summed without the kernel, or a kernel axis shared with the input and output
    if len(columns) + len(tokens) + 1 != len(outputs):
        return None
    canonical = batch + "".join(tokens) + "".join(columns)
    order = contracted + columns
    bias_axes = getattr(layer, "bias_axes", None) or ""
    return _EinsumPlan(
        to_rows=f"{inputs}->{batch}{''.join(tokens)}{''.join(contracted)}",
        to_canonical=f"{outputs}->{canonical}",
        from_canonical=f"{canonical}->{outputs}",
        kernel_axes=tuple(kernel.index(c) for c in order),
        num_contracted=len(contracted),
        bias_is_column=sorted(bias_axes) == sorted(columns),
    )


def _einsum_equations(layer: Any) -> tuple[str, str, str]:
    plan = _einsum_plan(layer)
    assert plan is not None  # noqa: S101 -- supported_layer_kind checked it
    return plan.to_rows, plan.to_canonical, plan.from_canonical


def _kernel_view(kind: str, layer: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, int, bool]:
    """``(order, columns, bias_is_column)``: ``order[r * columns + c]`` is the kernel's flat index of ``W[r, c]``."""
    flat = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    if kind == "einsum_dense":
        plan = _einsum_plan(layer)
        assert plan is not None  # noqa: S101 -- supported_layer_kind checked it
        columns = int(np.prod([shape[axis] for axis in plan.kernel_axes[plan.num_contracted :]]))
        return np.transpose(flat, plan.kernel_axes).reshape(-1), columns, plan.bias_is_column
    return flat.reshape(-1), int(shape[-1]), True


def _gradient_positions(gradients: tf.Tensor, columns: int) -> tf.Tensor:
    """``[K, B, ..., d_out] -> [K, B, T, d_out]`` (``d_out`` may span several trailing axes of an EinsumDense)."""
    shape = tf.shape(gradients)
    return tf.reshape(gradients, [shape[0], shape[1], -1, columns])


def block_gradients(block: CapturedLayer, statistics: LayerStatistics) -> tf.Tensor:
    """Per-example (pseudo-)gradients of a block ``[K, B, num_rows, num_columns]``: ``Σ_t a_t g_tᵀ``.

    For an Embedding the rows are the vocabulary (one-hot ``a``), so this is ``[K, B, vocabulary, d]``: use it on
    small vocabularies only (the K-FAC code never forms it).
    """
    activations, gradients = statistics
    if block.kind == "embedding":
        one_hot = tf.one_hot(activations, block.num_rows, dtype=gradients.dtype)  # [B, T, V]
        return tf.einsum("btv,kbtd->kbvd", one_hot, gradients)
    return tf.einsum("btr,kbtc->kbrc", tf.cast(activations, gradients.dtype), gradients)


def _all_layers(model: Any) -> list[Any]:
    """Every layer inside a Keras 3 model, nested ones included, without duplicates."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is None:
        return list(getattr(model, "layers", []))
    return list(flatten(include_self=False, recursive=True))


def traced_error_message(error: Exception) -> str:
    """The message of an error raised inside a traced function, without autograph's "in user code" frames."""
    text = str(error)
    if "in user code:" not in text:
        return text
    marker = f"{type(error).__name__}: "
    tail = text.rsplit(marker, 1)[-1] if marker in text else text
    return " ".join(line.strip() for line in tail.strip().splitlines())


for _public in (CapturedLayer, LayerStatistics, supported_layer_kind, block_gradients, traced_error_message):
    _public.__module__ = "influenciae.model.capture"  # documented (and imported) from there
