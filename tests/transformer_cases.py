"""Transformer-style models run through every influence path, in a subprocess (``tests/test_transformers.py``).

Run as ``python tests/transformer_cases.py CASE [CASE ...]``: for each case, builds one tiny model with its data,
runs the paths of that case (per-sample gradients against a per-example ``GradientTape`` loop, HVPs, the solvers and
calculators), and prints one ``RESULT {json}`` line per case with a status and numbers per path. A path that raises
a ``ValueError`` saying it does not apply to the model is recorded as ``"unsupported: ..."``; anything else that
raises is ``"error: ..."``. The parent test asserts the exit code (an abort of the interpreter is exit 134/139) and
the results. Each case builds its model with fixed seeds so that a failure reproduces with the same command.

The KerasHub BERT and GPT-2 cases use one transformer block: every op type of the two-block configurations that
aborted the interpreter, at half the tracing time (tracing dominates these runs); the two-block BERT runs through
EK-FAC in ``tests/test_kfac_layers.py``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import influenciae as inf  # noqa: E402

CASES = ("mha", "dict_mask", "cnn", "bert", "gpt2", "resnet")
NUM_TRAIN, NUM_TEST, BATCH = 10, 3, 4  # batches of 4, 4 and a partial 2
SEQUENCE, VOCABULARY = 12, 50


def _sparse_ce() -> Any:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def token_loss(y_true: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-sequence mean next-token cross-entropy over real tokens: labels ``-1`` mark padding ``[B, T] -> [B]``."""
    labels = tf.cast(y_true, tf.int32)
    mask = tf.cast(labels >= 0, logits.dtype)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(labels, 0), logits=logits)
    return tf.reduce_sum(losses * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


# ---------------------------------------------------------------------- models and data


def _tokens(rng: np.random.Generator, count: int, length: int, vocabulary: int) -> np.ndarray:
    return rng.integers(1, vocabulary, (count, length)).astype("int32")


def _padding_mask(rng: np.random.Generator, count: int, length: int) -> np.ndarray:
    """Right padding: each sequence keeps between half and all of its positions."""
    keep = rng.integers(length // 2, length + 1, count)
    return (np.arange(length)[None, :] < keep[:, None]).astype("int32")


def build_case(name: str) -> dict[str, Any]:
    """The model, loss, arrays (train + test rows) and options of one case."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    total = NUM_TRAIN + NUM_TEST
    case: dict[str, Any] = {"loss": _sparse_ce(), "classification": True, "padding": None, "float_inputs": False}
    if name == "mha":
        tokens = keras.Input((SEQUENCE,), dtype="int32")
        embedded = keras.layers.Embedding(VOCABULARY, 16)(tokens)
        attended = keras.layers.MultiHeadAttention(2, 8)(embedded, embedded)
        normalized = keras.layers.LayerNormalization()(attended)
        pooled = keras.layers.GlobalAveragePooling1D(name="pooled")(normalized)
        case["model"] = keras.Model(tokens, keras.layers.Dense(2)(pooled))
        case["x"] = _tokens(rng, total, SEQUENCE, VOCABULARY)
        case["y"] = rng.integers(0, 2, total)
        case["feature_layer"] = "pooled"
    elif name == "dict_mask":
        tokens = keras.Input((SEQUENCE,), dtype="int32", name="tokens")
        mask = keras.Input((SEQUENCE,), dtype="int32", name="mask")
        embedded = keras.layers.Embedding(VOCABULARY, 16)(tokens)
        keys = keras.ops.cast(mask, "bool")[:, None, :]
        attended = keras.layers.MultiHeadAttention(2, 8)(embedded, embedded, attention_mask=keys)
        normalized = keras.layers.LayerNormalization()(embedded + attended)
        pooled = keras.layers.GlobalAveragePooling1D(name="pooled")(normalized, mask=keras.ops.cast(mask, "bool"))
        case["model"] = keras.Model({"tokens": tokens, "mask": mask}, keras.layers.Dense(3)(pooled))
        padding = _padding_mask(rng, total, SEQUENCE)
        case["x"] = {"tokens": _tokens(rng, total, SEQUENCE, VOCABULARY) * padding, "mask": padding}
        case["y"] = rng.integers(0, 3, total)
        case["padding"] = ("tokens", "mask")
        case["feature_layer"] = "pooled"
    elif name == "cnn":
        images = keras.Input((8, 8, 1))
        stem = keras.layers.Conv2D(4, 3, padding="same")(images)
        branch = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, padding="same")(stem))
        merged = keras.layers.Activation("relu")(keras.layers.Add()([stem, branch]))
        pooled = keras.layers.GlobalAveragePooling2D(name="pooled")(merged)
        case["model"] = keras.Model(images, keras.layers.Dense(3)(pooled))
        case["x"] = rng.normal(size=(total, 8, 8, 1)).astype("float32")
        case["y"] = rng.integers(0, 3, total)
        case["feature_layer"] = "pooled"
        case["float_inputs"] = True
    elif name == "bert":
        import keras_hub

        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=100, num_layers=1, num_heads=2, hidden_dim=32, intermediate_dim=64, max_sequence_length=16
        )
        pooled = backbone.output["pooled_output"]
        case["model"] = keras.Model(backbone.input, keras.layers.Dense(2)(pooled))
        padding = _padding_mask(rng, total, 16)
        case["x"] = {
            "token_ids": _tokens(rng, total, 16, 100) * padding,
            "segment_ids": np.zeros((total, 16), "int32"),
            "padding_mask": padding,
        }
        case["y"] = rng.integers(0, 2, total)
        case["feature_layer"] = None
    elif name == "gpt2":
        import keras_hub

        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=100, num_layers=1, num_heads=2, hidden_dim=32, intermediate_dim=64, max_sequence_length=16
        )
        case["model"] = keras.Model(backbone.input, keras.layers.Dense(100)(backbone.output))
        padding = _padding_mask(rng, total, 16)
        sequences = _tokens(rng, total, 17, 100)
        case["x"] = {"token_ids": sequences[:, :16] * padding, "padding_mask": padding}
        case["y"] = np.where(padding == 1, sequences[:, 1:], -1).astype("int32")  # next tokens, -1 on padding
        case["loss"] = token_loss
        case["classification"] = False
        case["padding"] = ("token_ids", "padding_mask")
        case["feature_layer"] = None
    elif name == "resnet":
        import keras_hub

        backbone = keras_hub.models.ResNetBackbone(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64, 64],  # KerasHub requires 64 first
            stackwise_num_blocks=[1, 1],
            stackwise_num_strides=[1, 2],
            block_type="basic_block",
            use_pre_activation=False,
            image_shape=(8, 8, 3),
        )
        pooled = keras.layers.GlobalAveragePooling2D(name="pooled")(backbone.output)
        case["model"] = keras.Model(backbone.input, keras.layers.Dense(3)(pooled))
        case["x"] = rng.normal(size=(total, 8, 8, 3)).astype("float32")
        case["y"] = rng.integers(0, 3, total)
        case["feature_layer"] = "pooled"
        case["float_inputs"] = True
    else:
        raise SystemExit(f"unknown case {name!r}; choose one of {CASES}")
    return case


def _rows(structure: Any, start: int, stop: int) -> Any:
    return tf.nest.map_structure(lambda array: array[start:stop], structure)


def _dataset(x: Any, y: Any) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


# ---------------------------------------------------------------------- checks


def reference_gradients(im: inf.InfluenceModel, x: Any, y: Any) -> np.ndarray:
    """Per-sample gradients from an eager per-example GradientTape loop ``[N, P]``."""
    rows = []
    for index in range(len(y)):
        with tf.GradientTape() as tape:
            outputs = im.model(_rows(x, index, index + 1), training=False)
            loss = tf.reduce_sum(im.loss_function(y[index : index + 1], outputs))
        gradients = tape.gradient(loss, [w.value for w in im.weights])
        rows.append(np.concatenate([np.reshape(tf.convert_to_tensor(g).numpy(), -1) for g in gradients]))
    return np.stack(rows)


def _finite(values: Any) -> bool:
    return bool(np.all(np.isfinite(np.asarray(values, dtype=np.float64))))


def run_case(name: str) -> dict[str, Any]:
    case = build_case(name)
    model, loss, x, y = case["model"], case["loss"], case["x"], case["y"]
    x_train, y_train = _rows(x, 0, NUM_TRAIN), y[:NUM_TRAIN]
    x_test, y_test = _rows(x, NUM_TRAIN, NUM_TRAIN + NUM_TEST), y[NUM_TRAIN:]
    train, test = _dataset(x_train, y_train), _dataset(x_test, y_test)
    im = inf.InfluenceModel(model, loss_function=loss)
    results: dict[str, Any] = {"case": name, "nb_params": im.nb_params, "paths": {}}

    def record(path: str, compute: Callable[[], dict[str, Any]]) -> None:
        started = time.perf_counter()
        try:
            entry = {"status": "ok", **compute()}
        except ValueError as error:  # a clear refusal (the method does not apply to this model)
            entry = {"status": f"unsupported: {str(error).splitlines()[0][:300]}"}
        except Exception as error:  # noqa: BLE001 - reported to the parent test, which fails on it
            traceback.print_exc()
            entry = {"status": f"error: {type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        entry["seconds"] = round(time.perf_counter() - started, 2)
        results["paths"][path] = entry
        print(path, entry, file=sys.stderr, flush=True)

    def gradients() -> dict[str, Any]:
        reference = reference_gradients(im, x_train, y_train)
        batched = np.concatenate([im.batch_jacobian_tensor(batch).numpy() for batch in train])  # sizes 4, 4, 2
        whole = im.batch_jacobian_tensor((x_train, y_train)).numpy()  # a third batch size, 10
        scale = max(1.0, float(np.abs(reference).max()))
        out = {
            "max_error": float(max(np.abs(batched - reference).max(), np.abs(whole - reference).max()) / scale),
            "finite": _finite(batched) and _finite(whole),
        }
        if case["padding"] is not None:  # tokens under the padding mask must not change anything
            tokens, mask = case["padding"]
            changed = dict(x_train)
            changed[tokens] = np.where(x_train[mask] == 1, x_train[tokens], (x_train[tokens] + 7) % 50 + 1)
            moved = im.batch_jacobian_tensor((changed, y_train)).numpy()
            out["padding_invariance_error"] = float(np.abs(moved - whole).max() / scale)
        return out

    def hvp() -> dict[str, Any]:
        vectors = tf.random.stateless_normal([3, im.nb_params], seed=[1, 2])
        full = im.batch_hvp_sum((x_train, y_train), vectors).numpy()
        parts = sum(im.batch_hvp_sum(batch, vectors).numpy() for batch in train)
        gram = vectors.numpy() @ full.T  # uᵀHv must be symmetric
        scale = max(1e-6, float(np.abs(full).max()))
        return {
            "finite": _finite(full),
            "batching_error": float(np.abs(parts - full).max() / scale),
            "symmetry_error": float(np.abs(gram - gram.T).max() / max(1e-6, float(np.abs(gram).max()))),
        }

    def scores(calculator: Any) -> dict[str, Any]:
        self_influence = calculator.self_influence(train)
        matrix = calculator.influence_matrix(test, train)
        ok = self_influence.shape == (NUM_TRAIN,) and matrix.shape == (NUM_TEST, NUM_TRAIN)
        return {"finite": _finite(self_influence) and _finite(matrix) and ok}

    record("gradients", gradients)
    record("hvp", hvp)
    cg = {"max_iterations": 3}  # crash safety and finiteness, not accuracy (tested elsewhere)
    record(
        "cg_ggn",
        lambda: scores(
            inf.FirstOrderInfluenceCalculator(im, train, "cg", damping=1e-2, curvature="ggn", ihvp_options=cg)
        ),
    )
    lissa = {"depth": 2, "scale": 1e4}
    record(
        "lissa", lambda: scores(inf.FirstOrderInfluenceCalculator(im, train, "lissa", damping=1e-2, ihvp_options=lissa))
    )
    record(
        "arnoldi",
        lambda: scores(inf.ArnoldiInfluenceCalculator(im, train, subspace_dim=6, k_largest_eig_vals=3, damping=1e-2)),
    )
    record(
        "ekfac",
        # Per-token outputs of a language model are too wide for the expected Fisher's [C, C] output Hessian.
        lambda: scores(
            inf.FirstOrderInfluenceCalculator(
                im,
                train,
                inf.EKFACIHVP(im, train, damping=1e-2, fisher="expected" if case["classification"] else "empirical"),
            )
        ),
    )
    record("tracin", lambda: scores(inf.TracIn([model], 0.1, loss_function=loss)))
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "checkpoint.weights.h5")
        model.save_weights(path)
        record(
            "tracincp",
            lambda: scores(
                inf.TracInCP([path], 0.1, model_factory=lambda: build_case(name)["model"], loss_function=loss)
            ),
        )
    record("tracincp_fast", lambda: scores(inf.TracInCPFast([model], 0.1, loss_function=loss)))
    record(
        "tracincp_fast_randproj",
        lambda: scores(inf.TracInCPFastRandProj([model], 0.1, projection_dim=8, loss_function=loss)),
    )
    if case["classification"]:
        record("trak", lambda: scores(inf.TrakCalculator(im, train, projection_dim=8, damping=1e-2)))
        record("representer_l2", lambda: scores(inf.RepresenterPointL2(model, train, loss, lambda_regularization=0.1)))
    if case["feature_layer"] is not None:
        record("similarity", lambda: scores(inf.SimilarityInfluence(im, case["feature_layer"])))
    if case["float_inputs"]:

        def perturbation() -> dict[str, Any]:
            calculator = inf.FirstOrderInfluenceCalculator(
                im, train, "cg", damping=1e-2, curvature="ggn", ihvp_options=cg
            )
            values = calculator.perturbation_influence(test, train)
            return {"finite": _finite(values), "shape": list(np.shape(values))}

        record("perturbation", perturbation)
    return results


def main(argv: list[str]) -> int:
    if not argv or any(name not in CASES for name in argv):
        print(f"usage: python tests/transformer_cases.py {{{','.join(CASES)}}} [...]", file=sys.stderr)
        return 2
    for name in argv:  # one process for several cases: TensorFlow and KerasHub are imported once
        print(f"CASE {name}", file=sys.stderr, flush=True)
        results = run_case(name)
        print("RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
