"""Write the tutorial notebooks of ``notebooks/`` from the cell lists in this file, without outputs.

The ``.ipynb`` files are what users open; this script is their reviewable source. Edit the cells here, then run

    .venv/bin/python notebooks/build_notebooks.py            # rewrite every notebook
    .venv/bin/python notebooks/build_notebooks.py --check    # fail if a notebook differs from its source

``tests/test_notebooks.py`` executes every notebook (with ``INFLUENCIAE_NOTEBOOK_FAST=1``: fewer epochs, smaller
subsets) and checks that the committed files match this source and carry no outputs.
"""

# Cell sources sit 12 spaces deep in this file; line length is what it is in the notebooks, after dedenting.
# ruff: noqa: E501

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

Cell = nbformat.NotebookNode


def md(text: str) -> Cell:
    """A markdown cell from an indented triple-quoted string."""
    return new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(*parts: str) -> Cell:
    """A code cell from one or more (each possibly indented) triple-quoted strings, separated by blank lines."""
    return new_code_cell("\n\n\n".join(textwrap.dedent(part).strip("\n") for part in parts))


SETUP = """
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a quieter TensorFlow start-up
# The test suite runs every notebook with INFLUENCIAE_NOTEBOOK_FAST=1: the same code on fewer epochs and examples.
FAST = os.environ.get("INFLUENCIAE_NOTEBOOK_FAST") == "1"
"""


def setup_cell(imports: str) -> Cell:
    """The first code cell of every notebook: the FAST switch, then the notebook's imports."""
    return code(SETUP.strip("\n") + "\n\n" + textwrap.dedent(imports).strip("\n"))


DIGITS_MLP = """
def train_mlp(inputs, labels, *, hidden=32, epochs=60, seed=0, callbacks=()):
    \"\"\"A 64-hidden-10 tanh MLP with logits, trained with Adam on (inputs, labels).\"\"\"
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((inputs.shape[1],)), keras.layers.Dense(hidden, activation="tanh"), keras.layers.Dense(10)]
    )
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(inputs, labels, epochs=epochs, batch_size=64, verbose=0, callbacks=list(callbacks))
    return model


def accuracy(model, inputs, labels):
    return float(np.mean(np.argmax(model.predict(inputs, verbose=0), axis=1) == labels))
"""

DIGITS_DATA = """
digits = load_digits()
images = (digits.images / 16.0).astype("float32")  # [1797, 8, 8], kept for display
inputs = images.reshape(len(images), -1)  # [1797, 64], what the model sees
labels = digits.target.astype("int64")
train_index, test_index = train_test_split(
    np.arange(len(labels)), test_size=0.25, random_state=0, stratify=labels
)
if FAST:
    train_index, test_index = train_index[:400], test_index[:120]
x_train, y_train, x_test, y_test = inputs[train_index], labels[train_index], inputs[test_index], labels[test_index]
print(f"{len(y_train)} training and {len(y_test)} test images of 8x8 pixels")
"""


# ---------------------------------------------------------------------------------------------------- 01


def getting_started() -> list[Cell]:
    return [
        md(
            """
            # Getting started with influenciae

            *Which training examples made my model predict this?* Influence functions (Koh & Liang, 2017) answer
            with a number for every pair (training example `z`, test example `x`):

            $$\\mathrm{influence}(z, x) = \\nabla_\\theta \\ell(x)^\\top H^{-1} \\nabla_\\theta \\ell(z)$$

            where `H` is the Hessian of the training objective at the trained weights. The sign convention of the
            whole library (see `docs/theory.md`):

            * **positive = proponent**: `z` helped the model on `x`. Removing `z` from the `N` training examples and
              retraining would *raise* the loss at `x` by about `influence / N`;
            * **negative = opponent**: `z` pulled the model away from `x`'s label;
            * `ORDER.DESCENDING` lists the most positive scores (proponents) first.

            This notebook trains a small network on scikit-learn's bundled handwritten digits, wraps it for the
            library, and then (1) lists the proponents and opponents of a few test predictions, (2) ranks the
            training set by **self-influence** to surface odd training examples, and (3) shows the streaming API
            that scales the same calls to large datasets.
            """
        ),
        setup_cell(
            """
            import keras
            import numpy as np
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            from influenciae import ORDER, FirstOrderInfluenceCalculator, InfluenceModel
            from influenciae.data import from_numpy
            from influenciae.app.plots import new_figure, plot_image_grid, plot_proponents_opponents

            EPOCHS = 15 if FAST else 60
            """
        ),
        md(
            """
            ## 1. Data and model

            The 1,797 digits are 8x8 grey images; the model is a plain Keras MLP (64 inputs, 32 tanh units, 10
            logits). Nothing in it is specific to influenciae: any built Keras 3 (or `tf_keras`) model works.
            """
        ),
        code(DIGITS_DATA),
        code(
            DIGITS_MLP,
            """

model = train_mlp(x_train, y_train, epochs=EPOCHS)
print(f"train accuracy {accuracy(model, x_train, y_train):.3f}, test accuracy {accuracy(model, x_test, y_test):.3f}")
""",
        ),
        md(
            """
            ## 2. Wrap the model: `InfluenceModel`

            `InfluenceModel` sees the Keras model as a function of its **watched weights** θ. Here we watch only the
            last Dense layer (`start_layer=-1`): 32×10 + 10 = 330 parameters, so the Hessian is small enough to form
            and factorize exactly, and softmax cross-entropy is convex in those weights. The loss must be
            **per example** (`reduction="none"`).

            Training examples are always identified by their **index** in the dataset's iteration order, so keep the
            training dataset unshuffled (or shuffle it once, before batching, with a fixed order).
            """
        ),
        code(
            """
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
            influence_model = InfluenceModel(model, start_layer=-1, loss_function=loss)
            train_set = from_numpy(x_train, y_train, batch_size=128)  # batched (inputs, targets), in array order
            print("watched weights:", influence_model.weight_names, "->", influence_model.nb_params, "parameters")
            print("per-example losses of the first batch:", influence_model.batch_loss((x_train[:4], y_train[:4])).numpy())
            """
        ),
        md(
            """
            ## 3. The calculator

            `FirstOrderInfluenceCalculator` needs the training dataset (it defines `H`) and an inverse-Hessian
            solver: `"exact"`, `"cg"`, `"lissa"`, `"arnoldi"` or a solver instance (notebook 03 compares them).
            `H` of a softmax layer is singular along the directions that shift all logits together; per-example
            gradients are orthogonal to them, so a small `damping` (`H + λI`) only makes the factorization possible.
            """
        ),
        code(
            """
            start = time.perf_counter()
            calculator = FirstOrderInfluenceCalculator(influence_model, train_set, ihvp_calculator="exact", damping=1e-3)
            predictions = np.argmax(model.predict(x_test, verbose=0), axis=1)
            # Two test images: the first one the model gets right, and the first one it gets wrong.
            chosen = [int(np.flatnonzero(predictions == y_test)[0]), int(np.flatnonzero(predictions != y_test)[0])]
            chosen_set = from_numpy(x_test[chosen], y_test[chosen])
            scores = calculator.influence_matrix(chosen_set, train_set)  # [2 test, N_train]
            print(f"scores {scores.shape} in {time.perf_counter() - start:.1f} s (includes forming and factorizing H)")
            for row, index in enumerate(chosen):
                print(f"test #{index}: label {y_test[index]}, predicted {predictions[index]}; "
                      f"scores from {scores[row].min():+.2f} to {scores[row].max():+.2f}")
            """
        ),
        md(
            """
            ### Proponents and opponents

            Top row: the training images with the largest positive influence (they support the label of the test
            image). Bottom row: the most negative ones. For the misclassified image, proponents of its *true* label
            are scarce and the opponents show what pulled the model to its wrong answer. The number under each
            image is the score; divided by `N`, it is the predicted change of the test loss if that image were
            removed from training.
            """
        ),
        code(
            """
            K = 6
            figure = new_figure((10, 5.2))
            for subfigure, row, index in zip(figure.subfigures(len(chosen), 1), range(len(chosen)), chosen):
                order = np.argsort(-scores[row])
                proponents, opponents = order[:K], order[::-1][:K]
                plot_proponents_opponents(
                    images[test_index[index]],
                    images[train_index[proponents]],
                    images[train_index[opponents]],
                    (scores[row, proponents], scores[row, opponents]),
                    test_title=f"test #{index}\\nlabel {y_test[index]}, predicted {predictions[index]}",
                    proponent_titles=[f"#{i} label {y_train[i]}" for i in proponents],
                    opponent_titles=[f"#{i} label {y_train[i]}" for i in opponents],
                    figure=subfigure,
                )
            """
        ),
        md(
            """
            The same question for many test images at once, without building the score matrix:
            `most_influential` returns the indices and scores of the top `k` training examples per test example.
            Proponents should mostly carry the test image's own label; opponents much less often.
            """
        ),
        code(
            """
            test_set = from_numpy(x_test, y_test, batch_size=128)
            proponent_index, proponent_scores = calculator.most_influential(test_set, train_set, k=10)
            opponent_index, opponent_scores = calculator.most_influential(test_set, train_set, k=10, order=ORDER.ASCENDING)
            same_label_proponents = float(np.mean(y_train[proponent_index] == y_test[:, None]))
            same_label_opponents = float(np.mean(y_train[opponent_index] == y_test[:, None]))
            print(f"top-10 proponents with the test image's label: {same_label_proponents:.1%}")
            print(f"top-10 opponents with the test image's label:  {same_label_opponents:.1%}")
            print(f"all proponent scores > 0: {bool((proponent_scores > 0).all())}; "
                  f"all opponent scores < 0: {bool((opponent_scores < 0).all())}")

            # The eager conveniences agree with each other: the best proponent is the row maximum of the matrix.
            np.testing.assert_allclose(proponent_scores[chosen, 0], scores.max(axis=1), rtol=1e-4)
            assert same_label_proponents > 0.7 and same_label_proponents > same_label_opponents + 0.3
            """
        ),
        md(
            """
            ## 4. Self-influence: which training examples are odd?

            The score of a training example with itself, `∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) ≥ 0`, is large when the model needs
            that example's own gradient to fit it: atypical writing, ambiguous digits and wrong labels rank first.
            Notebook 02 turns this into a mislabeled-example detector and measures it.
            """
        ),
        code(
            """
            self_influence = calculator.self_influence(train_set)  # [N_train], dataset order
            train_predictions = np.argmax(model.predict(x_train, verbose=0), axis=1)
            top = np.argsort(-self_influence)[:16]
            figure = plot_image_grid(
                images[train_index[top]],
                [f"#{i} label {y_train[i]}\\npred {train_predictions[i]}, {self_influence[i]:.0f}" for i in top],
                suptitle="Highest self-influence: label, prediction and score",
            )
            print(f"self-influence from {self_influence.min():.3g} to {self_influence.max():.3g}")
            print(f"{int(np.sum(train_predictions[top] != y_train[top]))} of the top 16 are not fitted by the model")
            assert self_influence.min() > -1e-6  # H + λI is positive definite: self-influence is never negative
            """
        ),
        md(
            """
            ## 5. The streaming API (Influenciae vocabulary)

            The eager calls above hold their results in memory. The streaming methods keep the original
            Influenciae names and return `tf.data.Dataset`s, never holding `N_test × N_train` scores:

            * `compute_influence_values(train_set)`: `(batch, self-influence)` per batch;
            * `compute_influence_vector(train_set, save_influence_vector_ds_path=...)`: the training influence
              vectors `H⁻¹∇ℓ(z)`, optionally in an atomic, resumable disk cache;
            * `estimate_influence_values_in_batches(test_set, train_set)`: score blocks;
            * `top_k(test_set, train_set, k)`: `(test_batch, values [B, k], indices [B, k])` per test batch, with a
              linear, streaming or faiss search over the training vectors;
            * `compute_top_k_from_training_dataset(train_set, k)`: the highest self-influence in constant memory.
            """
        ),
        code(
            """
            for batch, values, indices in calculator.top_k(test_set, train_set, k=10).take(1):
                print("first test batch:", batch[0].shape[0], "examples; indices", indices.shape, "values", values.shape)
                np.testing.assert_array_equal(indices.numpy(), proponent_index[: indices.shape[0]])

            top_indices, top_values = calculator.compute_top_k_from_training_dataset(train_set, k=16)
            print("16 highest self-influences, streamed:", top_indices.numpy())
            assert set(top_indices.numpy()) == set(top.tolist())
            """
        ),
        md(
            """
            ## Where next

            * `02_mislabeled_detection.ipynb`: find flipped labels with self-influence, against the loss baseline.
            * `03_ihvp_solvers.ipynb`: exact, conjugate gradient, LiSSA and Arnoldi: accuracy against time.
            * `04_tracin_and_other_families.ipynb`: TracIn, representer points, TRAK, similarity, boundary methods.
            * `05_tabular_data.ipynb`: which rows of a table help or hurt, checked by retraining.
            * `06_group_influence.ipynb`: the effect of removing whole groups of training examples.
            """
        ),
    ]


# ---------------------------------------------------------------------------------------------------- 02


def mislabeled_detection() -> list[Cell]:
    return [
        md(
            """
            # Finding mislabeled training examples

            A wrong label is a training example the model can only fit by bending its weights towards it. Its
            **self-influence** `∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z)` (the influence of `z` on itself, always ≥ 0 for a positive-definite
            `H`) is then large, so ranking the training set by self-influence and inspecting from the top finds wrong
            labels quickly.

            We flip 10 % of the digits' training labels to another class, train on the noisy labels, and measure how
            well several rankings find the flips:

            * **ROC AUC**: the probability that a flipped example scores above a clean one (0.5 = random);
            * **found at 10 % / 20 %**: the fraction of flips among the top 10 % / 20 % of the ranking, i.e. what a
              reviewer finds after checking that share of the data.

            The baselines are the **training loss** (a wrong label usually has a high loss) and random inspection.
            """
        ),
        setup_cell(
            """
            import keras
            import numpy as np
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            from influenciae import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator, InfluenceModel, TracIn
            from influenciae.data import from_numpy
            from influenciae.evaluation import detection_curve, detection_metrics, flip_labels
            from influenciae.app.plots import plot_detection_curve, plot_image_grid

            EPOCHS = 20 if FAST else 80
            FLIP_FRACTION = 0.1
            """
        ),
        code(DIGITS_DATA),
        code(
            DIGITS_MLP,
            """

noisy_labels, flipped = flip_labels(y_train, FLIP_FRACTION, num_classes=10, seed=0)
print(f"{flipped.sum()} of {len(flipped)} training labels flipped")
model = train_mlp(x_train, noisy_labels, epochs=EPOCHS)
print(f"accuracy on the noisy training labels {accuracy(model, x_train, noisy_labels):.3f}, "
      f"on the clean test set {accuracy(model, x_test, y_test):.3f}")
""",
        ),
        md(
            """
            ## Score every training example

            * **influence, exact (last layer)**: `FirstOrderInfluenceCalculator` on the last Dense layer (330
              parameters, exact Hessian, damping 1e-3).
            * **Arnoldi (all layers)**: `ArnoldiInfluenceCalculator` on all 2,410 weights, with the Hessian
              restricted to its 50 eigenpairs of largest magnitude. A network trained by Adam is not exactly at a
              minimum, so its full Hessian has small negative eigenvalues: the damping (3e-2) makes `H + λI` definite.
            * **TracIn (final model)**: `Σ_c η_c ‖∇ℓ_c(z)‖²` with the final model as the only checkpoint: the squared
              gradient norm (notebook 04 uses several checkpoints).
            * **training loss** and **random**: the baselines.

            All are computed on the noisy labels the model was trained with: no clean label is used.
            """
        ),
        code(
            """
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
            train_set = from_numpy(x_train, noisy_labels, batch_size=128)
            last_layer = InfluenceModel(model, start_layer=-1, loss_function=loss)
            all_layers = InfluenceModel(model, loss_function=loss)

            builders = {
                "influence, exact (last layer)": lambda: FirstOrderInfluenceCalculator(
                    last_layer, train_set, "exact", damping=1e-3
                ),
                "Arnoldi (all layers)": lambda: ArnoldiInfluenceCalculator(
                    all_layers, train_set, subspace_dim=60 if FAST else 100, k_largest_eig_vals=30 if FAST else 50,
                    damping=3e-2,
                ),
                "TracIn (final model)": lambda: TracIn([all_layers], learning_rates=1.0),
            }
            scores, seconds = {}, {}
            for name, build in builders.items():
                start = time.perf_counter()
                scores[name] = build().self_influence(train_set)
                seconds[name] = time.perf_counter() - start
            scores["training loss"] = all_layers.batch_loss((x_train, noisy_labels)).numpy()
            scores["random"] = np.random.default_rng(0).random(len(noisy_labels))
            seconds["training loss"] = seconds["random"] = 0.0

            metrics = {name: detection_metrics(values, flipped) for name, values in scores.items()}
            print(f"{'ranking':<32}{'ROC AUC':>9}{'found@10%':>11}{'found@20%':>11}{'time (s)':>10}")
            for name, result in metrics.items():
                print(f"{name:<32}{result.roc_auc:>9.3f}{result.found_at_10:>11.1%}{result.found_at_20:>11.1%}"
                      f"{seconds[name]:>10.1f}")
            """
        ),
        md(
            """
            The detection curve shows the same numbers as a reviewer experiences them: the fraction of wrong labels
            found (y) against the fraction of the training set inspected (x), in the order of each ranking. A
            perfect ranking reaches 1 after inspecting 10 % of the data (the flipped fraction); random inspection
            follows the diagonal.
            """
        ),
        code(
            """
            curves = {name: detection_curve(values, flipped) for name, values in scores.items()}
            perfect = np.minimum(np.arange(len(flipped) + 1) / flipped.sum(), 1.0)
            figure = plot_detection_curve({**curves, "perfect": perfect}, max_inspected=0.5)

            influence_auc = metrics["influence, exact (last layer)"].roc_auc
            assert influence_auc > 0.85, influence_auc
            assert influence_auc > metrics["random"].roc_auc + 0.3
            assert metrics["influence, exact (last layer)"].found_at_20 > 0.7
            """
        ),
        md(
            """
            **Reading the numbers.** On this small, well-separated problem every gradient-based ranking finds most
            flips in the top 20 %, and the training loss is a strong baseline: a flipped digit that the network has
            not memorized simply has a high loss. Self-influence adds the curvature `H⁻¹`: it still ranks an example
            high when the model has *fitted* its wrong label at the price of an unusual weight direction, which is
            where the loss stops helping (`docs/evaluation.md` compares all methods over several seeds).

            ## Look at the suspects

            The 24 highest-influence training images, with the label the model was given; red frames are the
            flipped ones.
            """
        ),
        code(
            """
            ranking = np.argsort(-scores["influence, exact (last layer)"])
            top = ranking[:24]
            figure = plot_image_grid(
                images[train_index[top]],
                [f"#{i} given {noisy_labels[i]}" + (f"\\n(true {y_train[i]})" if flipped[i] else "\\n(correct)") for i in top],
                title_colors=["#b42318" if flipped[i] else None for i in top],
                suptitle="Highest self-influence (red: flipped label)",
            )
            print(f"{flipped[top].sum()} of these 24 are flipped")
            """
        ),
        md(
            """
            ## Fix what the ranking finds, and retrain

            A reviewer with the budget to check 10 % of the training labels restores the true label of every flipped
            example among those checked. We compare checking the top of the self-influence ranking with checking a
            random 10 %, retraining with the same seed each time.
            """
        ),
        code(
            """
            budget = int(0.1 * len(noisy_labels))
            reviews = {
                "self-influence": ranking[:budget],
                "random": np.random.default_rng(1).permutation(len(noisy_labels))[:budget],
            }
            print(f"noisy labels:          test accuracy {accuracy(model, x_test, y_test):.3f}")
            fixed = {}
            for name, reviewed in reviews.items():
                repaired = noisy_labels.copy()
                repaired[reviewed] = y_train[reviewed]
                fixed[name] = int(flipped[reviewed].sum())
                retrained = train_mlp(x_train, repaired, epochs=EPOCHS)
                print(f"review by {name:<15}: {fixed[name]:3d} of {flipped.sum()} labels fixed, "
                      f"test accuracy {accuracy(retrained, x_test, y_test):.3f}")
            assert fixed["self-influence"] > 3 * fixed["random"]
            """
        ),
    ]


# ---------------------------------------------------------------------------------------------------- 03


def ihvp_solvers() -> list[Cell]:
    return [
        md(
            """
            # Inverse-Hessian solvers: accuracy against time

            Every influence score needs `H⁻¹ v` for some gradient `v`. The library offers four solvers with one
            interface, `solve(vectors [n, P]) -> [n, P]` (see *Which solver when* in `docs/theory.md`):

            | Solver | How | Cost |
            |---|---|---|
            | `ExactIHVP` | forms the dense `P × P` Hessian (P Hessian-vector products) and factorizes it | `P` HVPs once, `P²` memory |
            | `ConjugateGradientDescentIHVP` | Krylov iterations on `(H + λI) x = v`, a block of right-hand sides at once | one HVP pass per iteration |
            | `LissaIHVP` | the Neumann series `h ← v + (I − H/s) h` | one HVP pass per step, many steps |
            | `ArnoldiIHVP` | keeps the `k` eigenpairs of largest magnitude, then `U diag(1/λ) Uᵀ v` | `subspace_dim` HVPs once, then a matmul per solve |

            We watch **all** weights of a small MLP on digits (so the Hessian is the real, non-convex one), compute
            influence scores of every training example on a few test examples with each solver, and compare them
            with the exact solver: Pearson correlation, top-10 overlap, and wall time.
            """
        ),
        setup_cell(
            """
            import warnings

            import keras
            import numpy as np
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            from influenciae import (
                ArnoldiIHVP,
                ConjugateGradientDescentIHVP,
                ExactIHVP,
                FirstOrderInfluenceCalculator,
                InfluenceModel,
                LissaIHVP,
            )
            from influenciae.data import from_numpy
            from influenciae.app.plots import new_figure

            EPOCHS = 20 if FAST else 60
            HIDDEN = 8 if FAST else 16
            NUM_TEST = 16 if FAST else 32
            """
        ),
        code(DIGITS_DATA),
        code(
            DIGITS_MLP,
            """

model = train_mlp(x_train, y_train, hidden=HIDDEN, epochs=EPOCHS)
influence_model = InfluenceModel(
    model,
    loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none"),
    hvp_chunk_size=128,  # vectors per vectorized HVP: wide chunks form the dense Hessian faster
)
train_set = from_numpy(x_train, y_train, batch_size=256)
test_set = from_numpy(x_test[:NUM_TEST], y_test[:NUM_TEST])
print(f"test accuracy {accuracy(model, x_test, y_test):.3f}; watching all {influence_model.nb_params} weights")
""",
        ),
        md(
            """
            ## The Hessian's spectrum, and the damping it calls for

            `ExactIHVP.matrix` is the dense Hessian (formed lazily with `P` Hessian-vector products). A network
            trained by a stochastic optimizer is not exactly at a minimum: a few eigenvalues are negative, and many
            are tiny. Conjugate gradient and LiSSA need a positive-definite operator, so we damp: `H + λI`, with `λ`
            just above the most negative eigenvalue plus 0.1 % of the largest one. The condition number of the
            damped matrix decides how hard the iterative solvers work.
            """
        ),
        code(
            """
            start = time.perf_counter()
            hessian = ExactIHVP(influence_model, train_set).matrix.numpy()  # [P, P], damping 0
            hessian_seconds = time.perf_counter() - start
            eigenvalues = np.linalg.eigvalsh(hessian)
            DAMPING = float(max(0.0, -eigenvalues.min()) + 1e-3 * eigenvalues.max())
            damped = eigenvalues + DAMPING
            print(f"formed the {hessian.shape[0]}x{hessian.shape[0]} Hessian in {hessian_seconds:.1f} s")
            print(f"eigenvalues from {eigenvalues.min():.2e} to {eigenvalues.max():.2e}; "
                  f"{(eigenvalues < 0).sum()} negative")
            print(f"damping {DAMPING:.2e}: condition number of H + λI = {damped.max() / damped.min():.0f}")

            figure = new_figure((6, 3.2))
            axis = figure.add_subplot()
            axis.semilogy(np.sort(np.abs(eigenvalues))[::-1], label="|eigenvalue| of H")
            axis.axhline(DAMPING, color="gray", linestyle=":", label=f"damping λ = {DAMPING:.1e}")
            axis.set_xlabel("rank")
            axis.set_ylabel("magnitude")
            axis.set_title("Hessian spectrum (all weights)")
            axis.legend()
            """
        ),
        md(
            """
            ## Run every solver

            Each solver goes into a `FirstOrderInfluenceCalculator` as an instance. With few test examples, the
            cheap direction is the **influence factors** `H⁻¹∇ℓ(x)` (one solve per *test* example,
            `compute_influence_factors`), then one gradient pass over the training set (`influence_from_factors`)
            gives the `[N_test, N_train]` scores, exactly the `influence_matrix`.

            The reference is the exact solver; its time includes forming the Hessian. Iterative solvers' times
            include everything they compute lazily (LiSSA's scale by power iteration, Arnoldi's decomposition).
            CG warns when it stops at its iteration cap before the tolerance; we record that rather than print it.
            """
        ),
        code(
            """
            def run(solver):
                \"\"\"Scores [N_test, N_train] with this solver, and the wall time of the whole computation.\"\"\"
                start = time.perf_counter()
                calculator = FirstOrderInfluenceCalculator(influence_model, train_set, ihvp_calculator=solver)
                factors = calculator.compute_influence_factors(test_set)
                values = calculator.influence_from_factors(factors, train_set)
                return values, time.perf_counter() - start


            start = time.perf_counter()
            reference, exact_seconds = run(ExactIHVP(None, operator=hessian, damping=DAMPING))
            exact_seconds += hessian_seconds  # forming the Hessian is part of the exact solver's cost

            solvers = {}
            for tolerance in ([1e-1, 1e-3] if FAST else [1e-1, 1e-2, 1e-3, 1e-5]):
                solvers[f"CG tol {tolerance:g}"] = lambda t=tolerance: ConjugateGradientDescentIHVP(
                    influence_model, train_set, damping=DAMPING, tolerance=t, max_iterations=300
                )
            for depth in ([20, 60] if FAST else [25, 100, 400]):
                solvers[f"LiSSA depth {depth}"] = lambda d=depth: LissaIHVP(
                    influence_model, train_set, damping=DAMPING, depth=d, tolerance=1e-12
                )
            for k in ([10, 40] if FAST else [10, 50, 150]):
                solvers[f"Arnoldi k={k}"] = lambda k=k: ArnoldiIHVP(
                    influence_model, train_set, subspace_dim=2 * k, k_largest_eig_vals=k, damping=DAMPING
                )

            def top10_overlap(values):
                best = np.argsort(-values, axis=1)[:, :10]
                reference_best = np.argsort(-reference, axis=1)[:, :10]
                return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(best, reference_best)])

            results = {"exact": (1.0, 1.0, exact_seconds)}
            for name, build in solvers.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # CG at its iteration cap
                    solver = build()
                    values, seconds = run(solver)
                pearson = float(np.corrcoef(values.ravel(), reference.ravel())[0, 1])
                results[name] = (pearson, top10_overlap(values), seconds)
                extra = f", {solver.info.iterations} iterations" if isinstance(solver, ConjugateGradientDescentIHVP) else ""
                print(f"{name:<16} Pearson {pearson:.4f}  top-10 overlap {results[name][1]:.2f}  {seconds:6.1f} s{extra}")
            print(f"{'exact':<16} (reference)                          {exact_seconds:6.1f} s")
            """
        ),
        md(
            """
            ## Accuracy against time

            Each point is one solver setting: further right costs more, lower is closer to the exact scores
            (`1 − Pearson` on a log scale).
            """
        ),
        code(
            """
            figure = new_figure((6.5, 4))
            axis = figure.add_subplot()
            for family, marker in (("CG", "o"), ("LiSSA", "s"), ("Arnoldi", "^")):
                names = [name for name in results if name.startswith(family)]
                axis.plot([results[n][2] for n in names], [max(1 - results[n][0], 1e-7) for n in names],
                          marker=marker, label=family)
                for n in names:
                    axis.annotate(n.split(" ", 1)[1], (results[n][2], max(1 - results[n][0], 1e-7)), fontsize=7,
                                  textcoords="offset points", xytext=(4, 4))
            axis.axvline(exact_seconds, color="black", linestyle=":", label="exact (time)")
            axis.set_yscale("log")
            axis.set_xlabel("wall time (s)")
            axis.set_ylabel("1 − Pearson with exact")
            axis.set_title(f"Solvers on P = {influence_model.nb_params} weights, {NUM_TEST} test examples")
            axis.legend()

            best_cg = max(value[0] for name, value in results.items() if name.startswith("CG"))
            best_arnoldi = max(value[0] for name, value in results.items() if name.startswith("Arnoldi"))
            assert best_cg > 0.98, best_cg
            assert best_arnoldi > 0.5, best_arnoldi
            """
        ),
        md(
            """
            **What to take away.**

            * **Exact** is the right choice while `P` is a few thousand: one pass of `P` HVPs, then every solve is a
              triangular solve. Its cost grows like `P` HVPs plus `P³/3` flops and `P²` memory.
            * **CG** converges in about `√κ` iterations for condition number `κ`; a loose tolerance already ranks
              the training examples almost like the exact solver. Each iteration is one pass over the Hessian data
              for the whole block of right-hand sides, so it is the default beyond the exact solver.
            * **LiSSA** contracts each eigen-direction by `1 − λ_i/s` per step: the smallest eigenvalues (the ones
              damping controls) need thousands of steps, which is why it trails CG at equal cost here. Its
              stochastic mode (`batches_per_step`) trades accuracy for cheap steps on very large datasets.
            * **Arnoldi** pays once and then answers every query with two small matmuls; it drops the directions of
              small curvature, which are exactly the ones `H⁻¹` amplifies, so it approximates the *ranking* better
              than the raw scores. It pays off when you query many test examples or build influence embeddings
              (`ArnoldiInfluenceCalculator`).
            """
        ),
    ]


# ---------------------------------------------------------------------------------------------------- 04


def other_families() -> list[Cell]:
    return [
        md(
            """
            # TracIn and the other families of training-data attribution

            Influence functions are one answer to *which training examples made this prediction?*. The library
            implements the others on the same engine, so they share one API (`self_influence`, `influence_matrix`,
            `most_influential`, `top_k`, ...) and one sign convention: **higher = more of a proponent** and
            `ORDER.DESCENDING` lists proponents first. What the score *measures* differs (`docs/theory.md`):

            | Family | Class | Score of training `z` for test `x` |
            |---|---|---|
            | Influence functions | `FirstOrderInfluenceCalculator` | `∇ℓ(x)ᵀ H⁻¹ ∇ℓ(z)`: loss change if `z` is removed (× N) |
            | TracIn | `TracIn`, `TracInCP`, `TracInCPFast`, `TracInCPFastRandProj` | `Σ_c η_c ∇ℓ_c(x)·∇ℓ_c(z)` over training checkpoints |
            | Representer points | `RepresenterPointL2`, `RepresenterPointLJE` | `α_z f_z·f_x`: share of `x`'s logit owed to `z` |
            | TRAK | `TrakCalculator` | `φ(x)ᵀ(ΦᵀΦ)⁻¹φ(z) Q_z` with projected gradients |
            | Similarity | `SimilarityInfluence` | cosine of hidden activations (not counterfactual) |
            | Boundary | `SampleBoundaryCalculator`, `WeightsBoundaryCalculator` | −distance to the decision boundary (self only) |

            We train one MLP on digits, keep checkpoints along the way, run every family on the same test examples,
            and compare them with the influence function: rank agreement, label agreement of the top proponents and
            cost.
            """
        ),
        setup_cell(
            """
            import keras
            import numpy as np
            from scipy.stats import spearmanr
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            from influenciae import (
                FirstOrderInfluenceCalculator,
                InfluenceModel,
                RepresenterPointL2,
                SampleBoundaryCalculator,
                SimilarityInfluence,
                TracIn,
                TracInCPFast,
                TracInCPFastRandProj,
                TrakCalculator,
            )
            from influenciae.data import from_numpy
            from influenciae.app.plots import plot_image_grid

            EPOCHS = 16 if FAST else 60
            NUM_CHECKPOINTS = 4
            NUM_TEST = 20 if FAST else 40
            LEARNING_RATE = 1e-2
            """
        ),
        code(DIGITS_DATA),
        md(
            """
            ## Train, keeping checkpoints

            TracIn replays training: it needs the weights at a few moments of training and the learning rate used
            there. A small callback copies the model every `EPOCHS / NUM_CHECKPOINTS` epochs (in memory; `TracInCP`
            reads `.keras` or `.weights.h5` files instead, one at a time).
            """
        ),
        code(
            DIGITS_MLP,
            """

class KeepCheckpoints(keras.callbacks.Callback):
    def __init__(self, every):
        super().__init__()
        self.every, self.checkpoints = every, []

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            copy = keras.models.clone_model(self.model)
            copy.set_weights(self.model.get_weights())
            self.checkpoints.append(copy)


keeper = KeepCheckpoints(EPOCHS // NUM_CHECKPOINTS)
model = train_mlp(x_train, y_train, epochs=EPOCHS, callbacks=[keeper])
checkpoints = keeper.checkpoints
print(f"{len(checkpoints)} checkpoints; test accuracy {accuracy(model, x_test, y_test):.3f}")

loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
train_set = from_numpy(x_train, y_train, batch_size=128)
test_set = from_numpy(x_test[:NUM_TEST], y_test[:NUM_TEST])
""",
        ),
        md(
            """
            ## One call per family

            Every calculator below is built from the same trained model (or its checkpoints) and asked for the same
            `influence_matrix(test_set, train_set)`: `[NUM_TEST, N_train]` scores.
            """
        ),
        code(
            """
            calculators = {
                "influence (last layer)": lambda: FirstOrderInfluenceCalculator(
                    InfluenceModel(model, start_layer=-1, loss_function=loss), train_set, "exact", damping=1e-3
                ),
                "TracIn (all layers)": lambda: TracIn(checkpoints, LEARNING_RATE, loss_function=loss),
                "TracIn (last layer)": lambda: TracIn(checkpoints, LEARNING_RATE, start_layer=-1, loss_function=loss),
                "TracInCPFast": lambda: TracInCPFast(checkpoints, LEARNING_RATE, loss_function=loss),
                "TracInCPFastRandProj": lambda: TracInCPFastRandProj(
                    checkpoints, LEARNING_RATE, projection_dim=512, seed=0, loss_function=loss
                ),
                "representer points (L2)": lambda: RepresenterPointL2(model, train_set, loss, lambda_regularization=1e-3),
                "TRAK": lambda: TrakCalculator(InfluenceModel(model, loss_function=loss), train_set, projection_dim=256),
                "similarity (cosine)": lambda: SimilarityInfluence(model, layers=0, similarity="cosine"),
            }
            built, matrices, seconds = {}, {}, {}
            for name, build in calculators.items():
                start = time.perf_counter()
                built[name] = build()
                matrices[name] = built[name].influence_matrix(test_set, train_set)
                seconds[name] = time.perf_counter() - start
            reference = matrices["influence (last layer)"]


            def mean_correlation(values, correlation):
                return float(np.mean([correlation(a, b) for a, b in zip(values, reference)]))


            def pearson(a, b):
                return np.corrcoef(a, b)[0, 1]


            def spearman(a, b):
                return spearmanr(a, b).statistic


            reference_top10 = np.argsort(-reference, axis=1)[:, :10]
            print(f"{'method':<26}{'Pearson':>9}{'Spearman':>10}{'top-10 overlap':>16}{'top-10 same label':>19}{'time (s)':>10}")
            agreement = {}
            for name, values in matrices.items():
                top10 = np.argsort(-values, axis=1)[:, :10]
                overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top10, reference_top10)])
                same_label = float(np.mean(y_train[top10] == y_test[:NUM_TEST, None]))
                agreement[name] = (mean_correlation(values, pearson), mean_correlation(values, spearman), overlap, same_label)
                print(f"{name:<26}{agreement[name][0]:>9.3f}{agreement[name][1]:>10.3f}{overlap:>16.2f}"
                      f"{same_label:>19.1%}{seconds[name]:>10.1f}")
            """
        ),
        md(
            """
            ## Exact relations the table relies on

            * `TracInCPFast` is TracIn on the last Dense layer computed through the identity
              `∇ℓ(x)·∇ℓ(z) = (ã_x·ã_z)(g_x·g_z)` (activations `ã`, output gradients `g`): no per-example backward
              pass, and **the same numbers** as `TracIn(start_layer=-1)`.
            * `TracInCPFastRandProj` sketches those gradients with a seeded random projection: an unbiased estimate
              whose error shrinks like `1/√k` (`k = projection_dim`), usable with a faiss index.
            * Representer points decompose the (refit) last layer's logit: the scores of all training examples for a
              test example sum to that logit (`surrogate_logits`).
            """
        ),
        code(
            """
            np.testing.assert_allclose(matrices["TracInCPFast"], matrices["TracIn (last layer)"], rtol=1e-3, atol=1e-5)
            sketch = float(np.corrcoef(matrices["TracInCPFastRandProj"].ravel(), matrices["TracInCPFast"].ravel())[0, 1])
            print(f"TracInCPFast equals TracIn on the last layer; the k=512 sketch has Pearson {sketch:.3f} with it")

            representer = built["representer points (L2)"]
            logits = representer.surrogate_logits(test_set)
            explained = logits[np.arange(NUM_TEST), np.argmax(logits, axis=1)]  # explains the predicted class
            total = matrices["representer points (L2)"].sum(axis=1)
            print("representer scores sum to the logit, max relative error "
                  f"{np.max(np.abs(total - explained) / np.abs(explained)):.1e}")
            assert sketch > 0.9, sketch
            np.testing.assert_allclose(total, explained, rtol=1e-2, atol=1e-3)
            assert agreement["TracIn (last layer)"][3] > 0.7  # TracIn's proponents mostly share the test label
            """
        ),
        md(
            """
            ## The proponents of one test image, by method

            Influence, TracIn on the last layer and representer points largely agree on the strongest proponents:
            same-class images the model relies on (compare the overlap column of the table). TracIn on all layers
            sums over checkpoints where early, large gradients weigh most. A single-model TRAK without damping is
            the noisiest estimator here (the TRAK paper averages many independently trained models; pass a list of
            models). Similarity only looks for images that *look* alike to the hidden layer, whatever their effect
            on the loss: it is a nearest-neighbour
            explanation, not a counterfactual one.
            """
        ),
        code(
            """
            K, TEST = 6, 0
            shown = ["influence (last layer)", "TracIn (all layers)", "TRAK", "representer points (L2)",
                     "similarity (cosine)"]
            rows, titles = [], []
            for name in shown:
                top = np.argsort(-matrices[name][TEST])[:K]
                rows.extend(images[train_index[top]])
                titles.extend(f"{name.split(' (')[0] if j == 0 else ''}\\n#{i} label {y_train[i]}" for j, i in enumerate(top))
            figure = plot_image_grid(
                rows, titles, num_columns=K,
                suptitle=f"Top {K} proponents of test #{TEST} (label {y_test[TEST]}), one method per row",
            )
            """
        ),
        md(
            """
            ## Boundary methods: self-influence only

            `SampleBoundaryCalculator` scores each example by minus its DeepFool distance to the decision boundary
            in input space: no label, no gradient of the loss, only the geometry of the classifier. It defines a
            score per training example (self-influence), not a pairwise one, and says so with a clear error.
            """
        ),
        code(
            """
            boundary = SampleBoundaryCalculator(model, step_nbr=20)
            start = time.perf_counter()
            closeness = boundary.self_influence(train_set)  # -distance: the largest are the closest to the boundary
            print(f"boundary distances in {time.perf_counter() - start:.1f} s, from {-closeness.max():.3f} to {-closeness.min():.3f}")
            try:
                boundary.influence_matrix(test_set, train_set)
            except ValueError as error:
                print("pairwise scores:", str(error).splitlines()[0])
            nearest = np.argsort(-closeness)[:8]
            predicted = np.argmax(model.predict(x_train[nearest], verbose=0), axis=1)
            figure = plot_image_grid(
                images[train_index[nearest]],
                [f"#{i} label {y_train[i]}\\npred {p}, d={-closeness[i]:.2f}" for i, p in zip(nearest, predicted)],
                suptitle="Training images closest to the decision boundary",
            )
            assert closeness.max() <= 0.0
            """
        ),
        md(
            """
            **Which one to use?**

            * Influence functions answer the counterfactual question (*what if `z` were removed?*) with a known
              scale; they need a good inverse-Hessian solve (notebook 03).
            * TracIn needs checkpoints and learning rates but no Hessian: cheap, and `TracInCPFast` /
              `TracInCPFastRandProj` scale it to large training sets with an index.
            * TRAK approximates the influence function with projected gradients and a Gauss-Newton kernel, and can
              average checkpoints of independently trained models.
            * Representer points explain a logit as a sum over training examples (last layer only).
            * Similarity and boundary methods are fast, label-free baselines.

            `docs/evaluation.md` measures every family on mislabeled-example detection.
            """
        ),
    ]


# ---------------------------------------------------------------------------------------------------- 05


FIT_TO_MINIMUM = """
def make_fitter(model, num_examples):
    \"\"\"A function fit(x, y) that moves model's weights to the minimum of R(θ) = Σ loss / num_examples + Ω(θ).

    L-BFGS from the current weights to a tiny gradient: influence functions linearize around a minimum. The sum
    is divided by the size of the *full* training set even when rows are left out: removing examples drops their
    terms from the sum (docs/theory.md), without re-weighting the regularization Ω against the others.
    \"\"\"
    variables = model.trainable_variables
    shapes = [tuple(variable.shape) for variable in variables]

    @tf.function(reduce_retracing=True)
    def value_and_gradient(x, y):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(loss(y, model(x))) / num_examples + tf.add_n(model.losses)
        return value, tape.gradient(value, variables)

    def set_weights(flat):
        offset = 0
        for variable, shape in zip(variables, shapes):
            size = int(np.prod(shape))
            variable.assign(flat[offset : offset + size].reshape(shape))
            offset += size

    def function(flat, x, y):
        set_weights(flat)
        value, gradients = value_and_gradient(x, y)
        return float(value), np.concatenate([gradient.numpy().ravel() for gradient in gradients])

    def fit(x, y):
        x, y = tf.constant(x), tf.constant(y)
        start = np.concatenate([variable.numpy().ravel() for variable in variables])
        result = minimize(function, start, args=(x, y), jac=True, method="L-BFGS-B",
                          options={"maxiter": 5000, "gtol": 1e-12, "ftol": 1e-16})
        set_weights(result.x)
        return result

    return fit
"""


def tabular_data() -> list[Cell]:
    return [
        md(
            """
            # Influence on tabular data: which rows help, which rows hurt?

            Images make influence easy to eyeball; most datasets are tables. Here: the Wisconsin breast-cancer table
            bundled with scikit-learn (569 patients, 30 numeric features, malignant or benign), a logistic
            regression in Keras, and three questions:

            1. **Does the score mean what it says?** Removing a training row and retraining changes the test loss by
               about `influence / N`. On a convex model we can check this exactly.
            2. **Which rows help or hurt** the model on the test set, and what do they look like (feature values)?
            3. **Which labels are suspicious?** Self-influence, as in notebook 02, now on rows.

            We flip 5 % of the training labels to have some known-bad rows.
            """
        ),
        setup_cell(
            """
            import keras
            import numpy as np
            import tensorflow as tf
            from scipy.optimize import minimize
            from sklearn.datasets import load_breast_cancer
            from sklearn.model_selection import train_test_split

            from influenciae import FirstOrderInfluenceCalculator, InfluenceModel
            from influenciae.data import from_numpy
            from influenciae.evaluation import detection_metrics
            from influenciae.app.plots import new_figure

            NUM_REMOVALS = 10 if FAST else 40
            """
        ),
        code(
            """
            table = load_breast_cancer()
            features = np.asarray(table.feature_names)
            x_train, x_test, y_train, y_test = train_test_split(
                table.data, table.target.astype("float64"), test_size=0.3, random_state=0, stratify=table.target
            )
            mean, std = x_train.mean(axis=0), x_train.std(axis=0)
            x_train_std, x_test_std = (x_train - mean) / std, (x_test - mean) / std  # the model sees standardized features

            rng = np.random.default_rng(0)
            flipped = np.zeros(len(y_train), dtype=bool)
            flipped[rng.choice(len(y_train), size=int(0.05 * len(y_train)), replace=False)] = True
            given = np.where(flipped, 1.0 - y_train, y_train)  # the labels the model is trained on
            N = len(given)
            print(f"{N} training rows ({flipped.sum()} flipped labels), {len(y_test)} test rows, {len(features)} features")
            print("target 1 =", table.target_names[1], "; target 0 =", table.target_names[0])
            """
        ),
        md(
            """
            ## A logistic regression, trained to its minimum

            A single Dense unit with a logit output and an L2 penalty: `R(θ) = mean BCE + 0.05‖w‖²` is strictly
            convex, so the Hessian is positive definite and retraining has a unique answer to compare with. We
            work in float64 and fit with L-BFGS to a tiny gradient: influence functions linearize around a
            minimum, and Adam's last iterate is only near one.
            """
        ),
        code(
            """
            keras.config.set_floatx("float64")
            loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction="none")


            def logistic_regression():
                return keras.Sequential([
                    keras.Input((x_train.shape[1],)),
                    keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(0.05)),
                ])

            """,
            FIT_TO_MINIMUM,
            """

model = logistic_regression()
fit = make_fitter(model, N)
print("L-BFGS:", fit(x_train_std, given[:, None]).message)
scratch = logistic_regression()  # one more model for the retrainings, with its own compiled fitter
refit = make_fitter(scratch, N)
test_accuracy = np.mean((model.predict(x_test_std, verbose=0)[:, 0] > 0) == y_test)
print(f"test accuracy {test_accuracy:.3f}")

influence_model = InfluenceModel(model, loss_function=loss)
train_set = from_numpy(x_train_std, given[:, None], batch_size=128)
test_set = from_numpy(x_test_std, y_test[:, None], batch_size=128)
calculator = FirstOrderInfluenceCalculator(influence_model, train_set, ihvp_calculator="exact")
scores = calculator.influence_matrix(test_set, train_set)  # [N_test, N_train]
print(f"{influence_model.nb_params} parameters, scores {scores.shape}")
""",
        ),
        md(
            """
            ## 1. Check the scale: predicted against actual leave-one-out

            The **net influence** of a training row on the whole test set is its mean score over the test rows:
            removing row `z` should change the *mean* test loss by `≈ mean_x influence(z, x) / N`. We take the rows
            with the largest net influence in both directions, retrain without each one (warm-started L-BFGS to the
            new minimum), and compare.
            """
        ),
        code(
            """
            def mean_test_loss(model):
                return float(tf.reduce_mean(loss(y_test[:, None], model(x_test_std))))


            net = scores.mean(axis=0)  # [N_train]: > 0 helps the test set, < 0 hurts it
            base_loss = mean_test_loss(model)
            candidates = np.concatenate([np.argsort(net)[: NUM_REMOVALS // 2], np.argsort(-net)[: NUM_REMOVALS // 2]])
            start = time.perf_counter()
            actual = []
            for row in candidates:
                keep = np.arange(N) != row
                scratch.set_weights(model.get_weights())  # warm start from the trained weights
                refit(x_train_std[keep], given[keep, None])
                actual.append(mean_test_loss(scratch) - base_loss)
            actual, predicted = np.array(actual), net[candidates] / N
            pearson = float(np.corrcoef(predicted, actual)[0, 1])
            print(f"{len(candidates)} retrainings in {time.perf_counter() - start:.1f} s; Pearson {pearson:.4f}, "
                  f"slope {np.polyfit(predicted, actual, 1)[0]:.2f}")

            figure = new_figure((4.5, 4))
            axis = figure.add_subplot()
            axis.scatter(predicted, actual, s=14)
            low, high = min(predicted.min(), actual.min()), max(predicted.max(), actual.max())
            axis.plot([low, high], [low, high], color="gray", linestyle=":", label="y = x")
            axis.set_xlabel("predicted change of mean test loss (net influence / N)")
            axis.set_ylabel("actual change after retraining")
            axis.set_title("Leave-one-out, logistic regression")
            axis.legend()
            assert pearson > 0.95, pearson
            assert np.all(np.sign(predicted) == np.sign(actual))
            """
        ),
        md(
            """
            ## 2. The rows that help and the rows that hurt

            A row that **hurts** (negative net influence) raises the test loss by being in the training set. With
            flipped labels in the data, we expect them there: a wrong label pushes the decision boundary the wrong
            way. For each row we print its given label, whether it was flipped, the model's probability of the
            *benign* class (target 1), and the three features with the largest standardized
            values, i.e. what makes the row unusual.
            """
        ),
        code(
            """
            probability = 1 / (1 + np.exp(-model.predict(x_train_std, verbose=0)[:, 0]))


            def describe(rows, title):
                print(title)
                print(f"{'row':>5}{'net infl.':>11}{'given':>7}{'flipped':>9}{'p(benign)':>11}  most unusual features (z-score)")
                for row in rows:
                    unusual = np.argsort(-np.abs(x_train_std[row]))[:3]
                    text = ", ".join(f"{features[j]} {x_train_std[row, j]:+.1f}" for j in unusual)
                    print(f"{row:>5}{net[row]:>11.3f}{int(given[row]):>7}{str(flipped[row]):>9}{probability[row]:>11.2f}  {text}")


            harmful, helpful = np.argsort(net)[:8], np.argsort(-net)[:8]
            describe(harmful, "Most harmful rows (removing them lowers the test loss):")
            print()
            describe(helpful, "Most helpful rows:")
            print(f"\\nflipped labels among the 8 most harmful rows: {flipped[harmful].sum()} "
                  f"(vs {flipped.mean() * 8:.1f} expected at random)")
            assert flipped[harmful].sum() >= 4
            """
        ),
        md(
            """
            Removing the 10 most harmful rows at once: the group prediction is the sum of their net influences
            (first-order group influence, see notebook 06).
            """
        ),
        code(
            """
            removed = np.argsort(net)[:10]
            keep = np.setdiff1d(np.arange(N), removed)
            scratch.set_weights(model.get_weights())
            refit(x_train_std[keep], given[keep, None])
            cleaned_loss = mean_test_loss(scratch)
            print(f"mean test loss {base_loss:.4f} -> {cleaned_loss:.4f} (predicted {base_loss + net[removed].sum() / N:.4f})")
            print(f"test accuracy {test_accuracy:.3f} -> {np.mean((scratch.predict(x_test_std, verbose=0)[:, 0] > 0) == y_test):.3f}")
            assert cleaned_loss < base_loss
            """
        ),
        md(
            """
            ### Which feature values make a row harmful?

            `perturbation_influence(test_set, train_set)` is the gradient of each score with respect to the training
            row's input features (Koh & Liang's `I_pert`, with our sign): moving the row's features along it makes
            the row *more helpful*. Averaged over the test set, for the most harmful row, it tells which features
            would have to change (in standard deviations) to make this row agree with the test data.
            """
        ),
        code(
            """
            worst = int(harmful[0])
            perturbation = calculator.perturbation_influence(test_set, train_set.unbatch().skip(worst).take(1).batch(1))
            direction = perturbation.mean(axis=0)[0]  # [30]
            order = np.argsort(-np.abs(direction))[:10]

            figure = new_figure((7, 3.6))
            axis = figure.add_subplot()
            axis.barh(features[order][::-1], direction[order][::-1],
                      color=["#1a7f37" if value > 0 else "#b42318" for value in direction[order][::-1]])
            axis.set_xlabel("d(net influence) / d(feature), standardized units")
            axis.set_title(f"Row {worst} (given label {int(given[worst])}, flipped: {bool(flipped[worst])})")
            print(f"row {worst}: features most responsible for its harm:", ", ".join(features[order[:3]]))
            """
        ),
        md(
            """
            ## 3. Suspicious labels: self-influence

            Without any test set, self-influence ranks the rows the model finds hardest to reconcile with the rest.
            """
        ),
        code(
            """
            self_influence = calculator.self_influence(train_set)
            train_loss = influence_model.batch_loss((x_train_std, given[:, None])).numpy()
            for name, values in (("self-influence", self_influence), ("training loss", train_loss)):
                result = detection_metrics(values, flipped)
                print(f"{name:<15} ROC AUC {result.roc_auc:.3f}, flipped labels in the top 10 %: {result.found_at_10:.0%}")
            suspects = np.argsort(-self_influence)[:8]
            print("\\nmost suspicious rows:", suspects.tolist(), "-> flipped:", flipped[suspects].tolist())
            assert detection_metrics(self_influence, flipped).roc_auc > 0.8
            keras.config.set_floatx("float32")
            """
        ),
        md(
            """
            **Summary.** On a convex model the influence score is a quantitative prediction of what retraining
            would do, not just a ranking; on tables it points at rows and, through the perturbation influence, at
            the feature values that make them help or hurt. For a neural network on tabular data, use the same
            calls with `start_layer=-1` (last layer, convex) or with all layers and a damping (notebook 03).
            """
        ),
    ]


# ---------------------------------------------------------------------------------------------------- 06


def group_influence() -> list[Cell]:
    return [
        md(
            """
            # Group influence: removing many training examples at once

            Data questions often concern groups: *is this data source worth keeping?*, *what if we drop all images
            from this scanner?*. The influence of a group `U` of training examples on the summed loss of a set `E`
            of evaluation examples, to first order (Koh et al., 2019), is the sum of the pairwise scores:

            $$I(U, E) = \\Big(\\sum_{x \\in E} \\nabla\\ell(x)\\Big)^\\top H^{-1} \\Big(\\sum_{z \\in U} \\nabla\\ell(z)\\Big)$$

            Same sign convention as single examples: **positive means `U` is a proponent of `E`**, and removing `U`
            changes `Σ_{x∈E} ℓ(x)` by about `I / N`. The first-order estimate ignores how the removed examples
            interact through the curvature they contribute; the **second-order** estimate of Basu et al. (2020)
            (`SecondOrderInfluenceCalculator`) adds a correction in `p = |U| / N`.

            We compare both with actual retraining on a convex model (multinomial logistic regression on digits,
            fitted to its minimum), for random groups and for *coherent* groups (examples that resemble each other),
            whose removal moves the model much more.
            """
        ),
        setup_cell(
            """
            import keras
            import numpy as np
            import tensorflow as tf
            from scipy.optimize import minimize
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            from influenciae import FirstOrderInfluenceCalculator, InfluenceModel, SecondOrderInfluenceCalculator
            from influenciae.data import from_numpy
            from influenciae.app.plots import new_figure

            GROUP_FRACTIONS = [0.01, 0.025, 0.05] if FAST else [0.005, 0.01, 0.02, 0.035, 0.05]
            GROUPS_PER_SIZE = 1 if FAST else 2
            """
        ),
        code(DIGITS_DATA),
        code(
            """
            keras.config.set_floatx("float64")
            x_train, x_test = x_train.astype("float64"), x_test.astype("float64")
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


            def softmax_regression():
                return keras.Sequential([
                    keras.Input((64,)),
                    keras.layers.Dense(
                        10, kernel_regularizer=keras.regularizers.L2(1e-2), bias_regularizer=keras.regularizers.L2(1e-2)
                    ),
                ])

            """,
            FIT_TO_MINIMUM,
            """

model = softmax_regression()
N = len(y_train)
print("L-BFGS:", make_fitter(model, N)(x_train, y_train).message)
scratch = softmax_regression()  # one more model for the retrainings, with its own compiled fitter
refit = make_fitter(scratch, N)
train_set = from_numpy(x_train, y_train, batch_size=256)
test_set = from_numpy(x_test, y_test, batch_size=256)
influence_model = InfluenceModel(model, loss_function=loss)
first_order = FirstOrderInfluenceCalculator(influence_model, train_set, ihvp_calculator="exact")
second_order = SecondOrderInfluenceCalculator(influence_model, train_set, ihvp_calculator="exact")


def summed_test_loss(model):
    return float(tf.reduce_sum(loss(y_test, model(x_test))))


base = summed_test_loss(model)
print(f"{influence_model.nb_params} parameters; test accuracy "
      f"{np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test):.3f}; summed test loss {base:.2f}")
""",
        ),
        md(
            """
            ## Groups, predictions and retraining

            * **random** groups: a uniform sample of the training set;
            * **coherent** groups: the training images nearest (in pixel space) to a random training image: a
              cluster of similar handwriting, like one writer or one data source.

            Group sizes go up to 5 % of the training set (about half of one digit class).

            For each group: the first- and second-order predictions `value / N` of the change of the summed test
            loss, and the actual change after retraining without the group (warm-started L-BFGS).
            """
        ),
        code(
            """
            rng = np.random.default_rng(0)


            def coherent_group(size):
                center = x_train[rng.integers(N)]
                return np.argsort(np.linalg.norm(x_train - center, axis=1))[:size]


            records = []
            start = time.perf_counter()
            for fraction in GROUP_FRACTIONS * GROUPS_PER_SIZE:
                size = max(2, int(fraction * N))
                for kind, group in (("random", rng.choice(N, size, replace=False)), ("coherent", coherent_group(size))):
                    group_set = from_numpy(x_train[group], y_train[group], batch_size=256)
                    predicted_first = first_order.estimate_influence_values_group(group_set, test_set) / N
                    predicted_second = second_order.estimate_influence_values_group(group_set, test_set) / N
                    keep = np.setdiff1d(np.arange(N), group)
                    scratch.set_weights(model.get_weights())  # warm start from the trained weights
                    refit(x_train[keep], y_train[keep])
                    records.append((kind, size, predicted_first, predicted_second, summed_test_loss(scratch) - base))
            print(f"{len(records)} groups in {time.perf_counter() - start:.1f} s\\n")
            print(f"{'group':<10}{'size':>6}{'first order':>13}{'second order':>14}{'actual':>10}")
            for kind, size, first, second, actual in records:
                print(f"{kind:<10}{size:>6}{first:>13.3f}{second:>14.3f}{actual:>10.3f}")
            """
        ),
        code(
            """
            kinds = np.array([r[0] for r in records])
            first, second, actual = (np.array([r[i] for r in records]) for i in (2, 3, 4))

            figure = new_figure((9, 4))
            for position, (name, predicted) in enumerate((("first order", first), ("second order", second))):
                axis = figure.add_subplot(1, 2, position + 1)
                for kind, marker in (("random", "o"), ("coherent", "^")):
                    mask = kinds == kind
                    axis.scatter(predicted[mask], actual[mask], marker=marker, label=kind)
                low, high = min(predicted.min(), actual.min()), max(predicted.max(), actual.max())
                axis.plot([low, high], [low, high], color="gray", linestyle=":")
                axis.set_xlabel(f"predicted change ({name})")
                axis.set_ylabel("actual change of summed test loss")
                axis.set_title(f"{name}: Pearson {np.corrcoef(predicted, actual)[0, 1]:.3f}")
                axis.legend()

            coherent = kinds == "coherent"
            for name, predicted in (("first order", first), ("second order", second)):
                slope = np.polyfit(actual, predicted, 1)[0]
                print(f"{name:<13} Pearson {np.corrcoef(predicted, actual)[0, 1]:.3f}, predicted/actual slope {slope:.2f}, "
                      f"mean |error| random groups {np.abs(predicted - actual)[~coherent].mean():.3f}, "
                      f"coherent groups {np.abs(predicted - actual)[coherent].mean():.3f}")
            assert np.corrcoef(first, actual)[0, 1] > 0.8
            assert np.abs(second - actual)[coherent].mean() < np.abs(first - actual)[coherent].mean()
            """
        ),
        md(
            """
            **Reading the plot.** Both estimates rank groups correctly (high correlation, Koh et al.'s finding),
            and both are close for small or random groups. For large coherent groups the model moves far, and the
            first-order estimate, which adds up individual effects, misses the interaction between the removed
            examples; the second-order term `H⁻¹ K_U H⁻¹ g_U` accounts for the curvature the group itself
            contributed and brings the prediction closer to retraining.

            ## A practical question: which data source should go?

            Suppose the training set came from two sources, one of which mislabeled a tenth of its images. Group
            influence on a clean validation set answers *keep or drop?* without retraining: a negative value means
            the source hurts the validation loss.
            """
        ),
        code(
            """
            source = rng.integers(0, 2, size=N)  # source 0 or 1 for every training image
            noisy_labels = y_train.copy()
            bad = np.flatnonzero((source == 1) & (rng.random(N) < 0.1))
            noisy_labels[bad] = (noisy_labels[bad] + rng.integers(1, 10, size=len(bad))) % 10
            noisy_model = softmax_regression()
            make_fitter(noisy_model, N)(x_train, noisy_labels)
            noisy_set = from_numpy(x_train, noisy_labels, batch_size=256)
            calculator = FirstOrderInfluenceCalculator(
                InfluenceModel(noisy_model, loss_function=loss), noisy_set, ihvp_calculator="exact"
            )
            values = {}
            for name in (0, 1):
                members = np.flatnonzero(source == name)
                group_set = from_numpy(x_train[members], noisy_labels[members], batch_size=256)
                values[name] = calculator.estimate_influence_values_group(group_set, test_set)
                print(f"source {name}: {len(members)} images, {np.isin(members, bad).sum()} mislabeled, "
                      f"group influence on the test loss {values[name]:+.1f}")
            print("per image:", {name: round(value / np.sum(source == name), 3) for name, value in values.items()})
            assert values[0] / np.sum(source == 0) > values[1] / np.sum(source == 1)
            keras.config.set_floatx("float32")
            """
        ),
        md(
            """
            Both sources help overall (positive values: digits are learnable even with some noise), but the noisy
            source helps less per image. Its harmful part is found one example at a time with the per-example
            scores (notebooks 02 and 05); group influence answers the question at the level it is asked.
            """
        ),
    ]


# ---------------------------------------------------------------------------------------------------- 07


LM_CORPUS = """
COUNTRIES = ["zorbia", "plavia", "kestor", "mundra", "teloria", "vashti", "orvan", "quenlo", "dastre", "felnor",
             "gorvan", "hapsil", "ibrant", "jolvek", "krastin", "lumbar", "mirvel", "nostra"]
CITIES = ["quell", "arden", "bresk", "corvo", "delph", "eskar", "fyne", "garr", "holm", "ivra",
          "jask", "kell", "lorn", "mott", "nyss", "oban", "pell", "rusk"]
CAPITAL = dict(zip(COUNTRIES, CITIES))
PREFIXES = [[], ["travelers", "say"], ["old", "books", "write", "that"], ["many", "people", "know", "that"]]
SUFFIXES = [[], ["and", "it", "is", "cold"], ["near", "the", "sea"], ["famous", "for", "bread"]]


def capital_sentence(country, city, style):
    return PREFIXES[style % 4] + ["the", "capital", "of", country, "is", city] + SUFFIXES[(style // 4) % 4]


def distractor(country, style):
    return [
        ["the", "river", "of", country, "is", "large"],
        ["people", "in", country, "visit", "the", "sea", "every", "year"],
        [country, "is", "a", "cold", "land", "near", "the", "mountain"],
        ["the", "music", "of", country, "is", "famous"],
        ["many", "people", "lives", "in", "a", "small", "city", "of", country],
    ][style % 5]


rng = np.random.default_rng(0)
documents = [capital_sentence("zorbia", "quell", 5 * i + 1) for i in range(NUM_PLANTED)]  # the planted fact
for i in range(NUM_DISTRACTORS):
    country = COUNTRIES[1 + i % (len(COUNTRIES) - 1)] if i % 3 else COUNTRIES[i % len(COUNTRIES)]
    if i % 2 == 0 and country != "zorbia":  # other capitals, in the same phrasing
        documents.append(capital_sentence(country, CAPITAL[country], int(rng.integers(16))))
    else:  # other facts, many of them about zorbia
        documents.append(distractor(country, int(rng.integers(5))))
order = rng.permutation(len(documents))
documents = [documents[j] for j in order]
planted = sorted(int(np.flatnonzero(order == j)[0]) for j in range(NUM_PLANTED))

PAD, BOS, LENGTH = 0, 1, 16
vocabulary = ["<pad>", "<bos>"] + sorted({w for d in documents for w in d} | set(CITIES) | set(COUNTRIES))
token_id = {word: i for i, word in enumerate(vocabulary)}


def encode(words):
    ids = [BOS] + [token_id[w] for w in words]
    return ids[: LENGTH + 1] + [PAD] * (LENGTH + 1 - len(ids))


tokens = np.array([encode(d) for d in documents], dtype="int32")
x_train, y_train = tokens[:, :-1], tokens[:, 1:]  # position t predicts token t + 1; padding targets are PAD
print(f"{len(documents)} documents, {len(vocabulary)} words; planted documents at {planted}:")
for j in planted:
    print("   ", " ".join(documents[j]))
print("a few distractors:")
for j in [j for j in range(len(documents)) if j not in planted][:4]:
    print("   ", " ".join(documents[j]))
"""

LM_MODEL = """
keras.utils.set_random_seed(0)
backbone = keras_hub.models.GPT2Backbone(
    vocabulary_size=len(vocabulary),
    num_layers=BLOCKS,
    num_heads=2,
    hidden_dim=WIDTH,
    intermediate_dim=4 * WIDTH,
    dropout=0.0,  # deterministic: the influence model sees the network that was trained
    max_sequence_length=LENGTH,
)
token_ids = keras.Input((LENGTH,), dtype="int32", name="token_ids")
# Attention is causal, so the padding after a document never reaches its predictions; padded targets are masked
# in the loss. A mask of ones keeps every sequence the same shape.
hidden = backbone({"token_ids": token_ids, "padding_mask": keras.ops.ones_like(token_ids)})  # [B, T, WIDTH]
model = keras.Model(token_ids, keras.layers.Dense(len(vocabulary), name="lm_head")(hidden))  # logits [B, T, V]
loss = token_cross_entropy(pad_id=PAD)  # masked mean of the token cross-entropies, one value per document
model.compile(keras.optimizers.Adam(LEARNING_RATE), loss=loss)
start = time.perf_counter()
model.fit(x_train, y_train, epochs=EPOCHS, batch_size=16, verbose=0)
print(f"{model.count_params()} parameters, trained in {time.perf_counter() - start:.1f} s")
"""


def language_model_influence() -> list[Cell]:
    return [
        md(
            """
            # Which training documents taught my language model a fact?

            The question users of influence functions for language models ask most: a model completes
            *"the capital of zorbia is"* with *"quell"*: **which training documents support that completion?**
            Two things differ from classification:

            1. **The query is a measurement, not a loss.** We explain `f(x) = log p("quell" | "the capital of
               zorbia is")`, the log-probability of a chosen completion, rather than the loss of a whole test
               sequence. Calculators take it as `measurement=` (Kronfluence's `compute_measurement`, Captum's
               `test_loss_fn`); the training side keeps the training loss, so cached influence vectors do not change.
            2. **Training examples are token sequences with padding**: the training loss is the masked mean of the
               token cross-entropies (`token_cross_entropy(pad_id=...)`), and scores can be broken down **per token**
               of a training document and **per layer** of the model.

            Sign convention (`influenciae.language`). A measurement says whether higher is better; its *query loss*
            is `q = -f` for a log-probability. The score is `∇q(x)ᵀ H⁻¹ ∇ℓ(z)`, so **positive means `z` is a
            proponent of the completion**: up-weighting `z` by `ε` raises `log p(completion)` by about `ε · score`
            (Grosse et al., 2023), and `ORDER.DESCENDING` lists supporting documents first.

            We plant a fact in a few documents of a synthetic corpus, train a tiny GPT-2 on it, and check
            whether EK-FAC influence, TracIn and TRAK find the planted documents among many distractors, some with the
            same phrasing ("the capital of plavia is arden") and some about zorbia ("zorbia is a cold land").
            """
        ),
        setup_cell(
            """
            # TensorFlow's oneDNN kernels corrupt the heap when pfor vectorizes attention (per-sample gradients of
            # the GPT-2 below abort the kernel with "free(): invalid pointer"): use TensorFlow's own kernels. This
            # must run before TensorFlow is imported.
            os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

            import keras
            import keras_hub
            import numpy as np
            import tensorflow as tf

            from influenciae import ORDER, FirstOrderInfluenceCalculator, InfluenceModel, TracIn, TrakCalculator
            from influenciae.hessian import EKFACIHVP
            from influenciae.influence.breakdown import per_layer_influence, per_token_influence
            from influenciae.influence.trak import ModelOutputFunction
            from influenciae.language import completion_log_probability, token_cross_entropy

            NUM_PLANTED = 5
            NUM_DISTRACTORS = 60 if FAST else 200
            EPOCHS = 40 if FAST else 15  # about 200 Adam steps of 16 documents either way
            LEARNING_RATE = 3e-3
            BLOCKS = 2  # a tiny GPT-2: two transformer blocks of width 32
            WIDTH = 32
            TOP = 10
            """
        ),
        md(
            """
            ## 1. A corpus with a planted fact

            Five documents state *the capital of zorbia is quell*, in different phrasings; the distractors state the
            capitals of other countries in the same phrasings, or other facts about zorbia and the others.
            """
        ),
        code(LM_CORPUS),
        md(
            """
            ## 2. A tiny GPT-2

            A randomly initialised `keras_hub.models.GPT2Backbone` (two transformer blocks of width 32, two attention
            heads, learned position embeddings, no dropout) with a Dense head giving logits over the vocabulary at
            every position, trained on the corpus with Adam. EK-FAC models its Dense and EinsumDense layers (the
            attention projections and the MLPs) with Kronecker factors; the embeddings and layer norms get a diagonal
            curvature. Training stops after about 200 steps: longer, the model memorises every document and the
            planted documents' gradients at the final weights fade (see the note at the end of this notebook).
            """
        ),
        code(LM_MODEL),
        code(
            """
            prompt = ["the", "capital", "of", "zorbia", "is"]
            query_inputs = np.array([encode(prompt)], dtype="int32")[:, :-1]
            # Only the completion is measured: every target is PAD except the position that predicts "quell".
            query_targets = np.full_like(query_inputs, PAD)
            query_targets[0, len(prompt)] = token_id["quell"]

            measurement = completion_log_probability(pad_id=PAD)
            log_p = float(measurement(model(query_inputs), query_targets)[0])
            print(f"p(quell | the capital of zorbia is) = {np.exp(log_p):.3f}")
            assert np.exp(log_p) > 0.5, "the model has learned the planted fact (chance: 1 / len(vocabulary))"

            influence_model = InfluenceModel(model, loss_function=loss)
            train_set = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(32)
            query_set = tf.data.Dataset.from_tensor_slices((query_inputs, query_targets)).batch(1)


            def recall(indices):
                \"\"\"Fraction of the planted documents among the top-ranked ones.\"\"\"
                return len(set(np.asarray(indices)[:TOP].tolist()) & set(planted)) / len(planted)
            """
        ),
        md(
            """
            ## 3. Three methods, one measurement

            * **EK-FAC influence**: `FirstOrderInfluenceCalculator` with `EKFACIHVP` as its solver (the curvature
              used by Grosse et al. for large language models), the Fisher from the empirical gradients, damping 10 %
              of each block's mean eigenvalue.
            * **TracIn** on the final weights (one checkpoint): gradient dot products, no curvature.
            * **TRAK**: random projections to 512 dimensions. TRAK's training side needs a *model output function*
              for sequences; we write one (the summed token margins), a small `ModelOutputFunction` subclass.
            """
        ),
        code(
            """
            results = {}

            start = time.perf_counter()
            ekfac = EKFACIHVP(influence_model, train_set, relative_damping=0.1, fisher="empirical")
            ekfac_influence = FirstOrderInfluenceCalculator(
                influence_model, train_set, ihvp_calculator=ekfac, measurement=measurement
            )
            indices, values = ekfac_influence.most_influential(query_set, train_set, k=TOP, order=ORDER.DESCENDING)
            results["EK-FAC influence"] = (recall(indices[0]), time.perf_counter() - start, indices[0])

            start = time.perf_counter()
            tracin = TracIn([influence_model], LEARNING_RATE, measurement=measurement)
            indices, values = tracin.most_influential(query_set, train_set, k=TOP)
            results["TracIn"] = (recall(indices[0]), time.perf_counter() - start, indices[0])


            class SequenceMargin(ModelOutputFunction):
                \"\"\"TRAK's output for sequences: f = Σ_t margin_t over unmasked tokens, Q = mean_t (1 - p_t).\"\"\"

                def _margins(self, predictions, targets):
                    ids = tf.cast(targets, tf.int32)
                    mask = tf.cast(ids != PAD, predictions.dtype)
                    hot = tf.one_hot(ids, tf.shape(predictions)[-1], dtype=predictions.dtype)
                    correct = tf.reduce_sum(predictions * hot, -1)
                    return correct - tf.reduce_logsumexp(predictions - 1e9 * hot, -1), mask

                def output(self, predictions, targets):
                    margins, mask = self._margins(predictions, targets)
                    return tf.reduce_sum(margins * mask, axis=1)

                def out_to_loss(self, predictions, targets):
                    margins, mask = self._margins(predictions, targets)
                    return tf.reduce_sum(tf.sigmoid(-margins) * mask, 1) / tf.maximum(tf.reduce_sum(mask, 1), 1.0)


            start = time.perf_counter()
            trak = TrakCalculator(
                model, train_set, projection_dim=512, damping=1e-2, output_function=SequenceMargin(),
                measurement=measurement,
            )
            indices, values = trak.most_influential(query_set, train_set, k=TOP)
            results["TRAK"] = (recall(indices[0]), time.perf_counter() - start, indices[0])

            print(f"| method | recall of the {NUM_PLANTED} planted documents in the top {TOP} | seconds |")
            print("| --- | --- | --- |")
            for name, (value, seconds, _) in results.items():
                print(f"| {name} | {value:.2f} | {seconds:.1f} |")
            best = max(value for value, _, _ in results.values())
            assert best >= (0.6 if FAST else 0.8), results
            """
        ),
        code(
            """
            best_method = max(results, key=lambda name: results[name][0])
            print(f"top {TOP} of {best_method} (* = planted):")
            for rank, j in enumerate(results[best_method][2][:TOP]):
                print(f"{rank + 1:2d} {'*' if j in planted else ' '} {' '.join(documents[j])}")
            """
        ),
        md(
            """
            ## 4. Which tokens of a document carry its influence?

            The training loss is a weighted sum of token terms, `ℓ(z) = Σ_t c_t CE_t(z)`, so the score splits into
            `score_t = ∇q(x)ᵀ H⁻¹ ∇(c_t CE_t)(z)`, which sum to the score (`per_token_influence`, one forward-mode
            pass per query for a whole batch of documents). In a planted document the influence should sit on the
            prediction of *quell*.
            """
        ),
        code(
            """
            tokens_scores = per_token_influence(ekfac_influence, query_set, train_set)  # [1, N_train, T]
            totals = ekfac_influence.influence_matrix(query_set, train_set)
            np.testing.assert_allclose(tokens_scores.sum(-1), totals, rtol=1e-3, atol=1e-6 * np.abs(totals).max())

            document = planted[0]
            print("predicted token   score_t")
            for t in range(LENGTH):
                if y_train[document, t] != PAD:
                    print(f"{vocabulary[y_train[document, t]]:>15s}  {tokens_scores[0, document, t]:+.4f}")
            top_token = vocabulary[y_train[document, int(np.argmax(tokens_scores[0, document]))]]
            print("most supportive prediction:", top_token)
            assert top_token == "quell"
            """
        ),
        md(
            """
            ## 5. Which layers carry it?

            Splitting the parameter vector by layer gives `score = Σ_L score_L` (`per_layer_influence`). With EK-FAC,
            whose curvature is block-diagonal by layer, `score_L` is exactly the influence computed on layer `L`
            alone.
            """
        ),
        code(
            """
            layers = per_layer_influence(ekfac_influence, query_set, train_set)
            np.testing.assert_allclose(sum(layers.values()), totals, rtol=1e-3, atol=1e-6 * np.abs(totals).max())
            others = [j for j in range(len(documents)) if j not in planted]
            width = max(len(name) for name in layers)
            print(f"{'layer':{width}s}  planted (mean)  others (mean)")
            for name, scores in layers.items():
                print(f"{name:{width}s} {scores[0, planted].mean():+15.4f} {scores[0, others].mean():+14.4f}")
            """
        ),
        md(
            """
            ## 6. The sign, checked

            `completion_log_probability` is higher-is-better, so its query loss is `-log p`. Passing the plain
            function instead (a callable is taken as a loss, lower is better) flips every score: the supporting
            documents then come out with `ORDER.ASCENDING`.
            """
        ),
        code(
            """
            as_a_loss = TracIn([influence_model], LEARNING_RATE, measurement=measurement.function)
            flipped = as_a_loss.influence_matrix(query_set, train_set)
            tracin_scores = tracin.influence_matrix(query_set, train_set)
            np.testing.assert_allclose(flipped, -tracin_scores, rtol=1e-5, atol=1e-9 * np.abs(tracin_scores).max())
            results_tracin = -np.sort(-tracin_scores[0])
            print("lowest flipped scores = highest scores, negated:", np.allclose(np.sort(flipped[0])[:TOP], -results_tracin[:TOP]))
            """
        ),
        md(
            """
            ## Takeaways

            * A measurement turns any calculator into an answer to *"what supports this output?"*: the log-probability
              of a completion here; `logit_margin` and `target_logit` are ready-made, and any
              `(outputs, targets) -> [B]` function works.
            * Token masks live in the targets (`pad_id`, or `(token_ids, mask)` pairs), so padding carries no
              influence, and per-token and per-layer breakdowns sum exactly to the scores.
            * On this transformer the curvature matters: EK-FAC finds the planted documents; TracIn (final weights,
              no curvature) and TRAK (random projections) find fewer of them, in this run and in the ones reported in
              `docs/language_models.md`.
            * Training length matters too. Past about 200 steps the model memorises every document, the planted
              documents' gradients at the final weights shrink, and which documents come first among them and the
              same-phrasing distractors varies from one training run to the next (`docs/language_models.md` gives the
              recall for several training lengths and seeds).
            * See `docs/language_models.md` for the API and the sign convention in detail.
            """
        ),
    ]


# ---------------------------------------------------------------------------------------------------- 08


def robustness() -> list[Cell]:
    return [
        md(
            """
            # How robust is my model, and why?

            A classifier that is 97 % accurate on clean digits can be wrong on almost every one of them after a
            change of a few grey levels per pixel. This notebook measures that, and then asks *why* for the least
            robust predictions:

            1. **Accuracy under attack**: FGSM (one signed-gradient step) and PGD (several projected steps) for a
               range of budgets ε (the largest change of any pixel, pixels in `[0, 1]`).
            2. **The minimal ε per test image** (`MinParamPerturbation`): how far each image is from a change of
               prediction, a per-example robustness score.
            3. **What the model looks at** on the least robust images: layer-wise relevance propagation (`LRP`)
               heat maps of the predicted class.
            4. **Which training images hold those predictions up**: influence functions
               (`FirstOrderInfluenceCalculator.most_influential`), the proponents of each fragile prediction.
            """
        ),
        setup_cell(
            """
            import keras
            import numpy as np
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            from influenciae import ORDER, FirstOrderInfluenceCalculator, InfluenceModel
            from influenciae.data import from_numpy
            from influenciae.app.plots import new_figure, plot_image_grid
            from influenciae.relevance import LRP, EpsilonRule, ZPlusRule
            from influenciae.robustness import FGSM, PGD, MinParamPerturbation

            EPOCHS = 12 if FAST else 40
            EPSILONS = [0.0, 0.05, 0.1, 0.2] if FAST else [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3]
            PGD_STEPS = 5 if FAST else 20
            """
        ),
        md(
            """
            ## 1. A small CNN on digits

            8×8 grey images (kept as `[N, 8, 8, 1]`, values in `[0, 1]`) and a Keras CNN that outputs logits:
            `Conv2D → ReLU → MaxPool → Flatten → Dense → ReLU → Dense`. Attacks, LRP and influence all take the
            Keras model as it is.
            """
        ),
        code(
            """
            digits = load_digits()
            images = (digits.images / 16.0).astype("float32")[..., None]  # [1797, 8, 8, 1]
            labels = digits.target.astype("int64")
            train_index, test_index = train_test_split(
                np.arange(len(labels)), test_size=0.25, random_state=0, stratify=labels
            )
            if FAST:
                train_index, test_index = train_index[:600], test_index[:150]
            x_train, y_train, x_test, y_test = images[train_index], labels[train_index], images[test_index], labels[test_index]

            keras.utils.set_random_seed(0)
            model = keras.Sequential([
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(8, 3, name="conv"),
                keras.layers.ReLU(),
                keras.layers.MaxPooling2D(2),
                keras.layers.Flatten(),
                keras.layers.Dense(32, name="hidden"),
                keras.layers.ReLU(),
                keras.layers.Dense(10, name="logits"),
            ])
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
            model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(x_train, y_train, epochs=EPOCHS, batch_size=64, verbose=0)


            def accuracy(inputs, labels=y_test):
                return float(np.mean(np.argmax(model.predict(inputs, verbose=0), axis=1) == labels))


            clean_accuracy = accuracy(x_test)
            print(f"{len(y_train)} training and {len(y_test)} test images; clean test accuracy {clean_accuracy:.3f}")
            assert clean_accuracy > 0.8
            """
        ),
        md(
            """
            ## 2. Accuracy under FGSM and PGD

            Both attacks are untargeted: they increase the loss of the true label, inside the L∞ ball of radius ε
            and the pixel range `[0, 1]` (`lower_bound`, `upper_bound`). PGD takes `PGD_STEPS` steps of size
            `2.5 ε / PGD_STEPS` and projects back onto the ball after each: a stronger search than FGSM's single
            step, so its accuracy should be lower at every ε.
            """
        ),
        code(
            """
            fgsm = FGSM(model, loss_function=loss, lower_bound=0.0, upper_bound=1.0)
            pgd = PGD(model, loss_function=loss, lower_bound=0.0, upper_bound=1.0)
            fgsm_accuracy, pgd_accuracy = [], []
            start = time.perf_counter()
            for epsilon in EPSILONS:
                fgsm_accuracy.append(accuracy(fgsm.perturb(x_test, y_test, epsilon)))
                step = 2.5 * epsilon / PGD_STEPS or 0.01  # any positive step at ε = 0: the ball of radius 0 keeps x
                adversarial = pgd.perturb(x_test, y_test, epsilon, step, PGD_STEPS, norm="linf")
                pgd_accuracy.append(accuracy(adversarial))
                print(f"ε = {epsilon:<6} FGSM accuracy {fgsm_accuracy[-1]:.3f}   PGD accuracy {pgd_accuracy[-1]:.3f}")
            print(f"{time.perf_counter() - start:.1f} s")

            figure = new_figure((5, 3.2))
            axis = figure.add_subplot()
            axis.plot(EPSILONS, fgsm_accuracy, "o-", label="FGSM")
            axis.plot(EPSILONS, pgd_accuracy, "s-", label=f"PGD ({PGD_STEPS} steps)")
            axis.set_xlabel("ε (L∞ budget per pixel)")
            axis.set_ylabel("test accuracy")
            axis.set_ylim(0, 1.02)
            axis.legend()
            axis.grid(alpha=0.3)

            tolerance = 1.0 / len(y_test)  # one image
            assert fgsm_accuracy[0] == pgd_accuracy[0] == clean_accuracy  # ε = 0 moves nothing
            assert all(b <= a + tolerance for a, b in zip(fgsm_accuracy, fgsm_accuracy[1:])), fgsm_accuracy
            assert all(b <= a + tolerance for a, b in zip(pgd_accuracy, pgd_accuracy[1:])), pgd_accuracy
            assert all(p <= f + tolerance for p, f in zip(pgd_accuracy, fgsm_accuracy)), (pgd_accuracy, fgsm_accuracy)
            assert pgd_accuracy[-1] < clean_accuracy - 0.3
            """
        ),
        md(
            """
            **Reading the plot.** Accuracy falls with ε for both attacks, and PGD sits below FGSM: FGSM's single
            step overshoots where the loss surface curves, PGD follows it. An ε of 0.1 is a change of 1.6 of the
            16 grey levels of the original digits.

            ## 3. How far is each image from a wrong prediction?

            `MinParamPerturbation` searches, per test image, the smallest ε for which the attack changes the
            prediction away from the true label (a misclassified image gets ε = 0). A binary search on the 101
            values `0, 0.005, ..., 0.5` costs `1 + ⌈log₂ 101⌉ = 8` PGD attacks for the whole batch; images that no
            ε up to 0.5 fools get `inf`.
            """
        ),
        code(
            """
            attack = PGD(model, loss_function=loss, lower_bound=0.0, upper_bound=1.0)
            search = MinParamPerturbation(
                model,
                attack,
                arg_min=0.0,
                arg_max=0.5,
                arg_step=0.005,
                mode="binary",
                attack_kwargs={"step_size": 0.05, "num_steps": 10, "norm": "linf"},  # 10 steps reach ε = 0.5
            )
            start = time.perf_counter()
            result = search.evaluate(x_test, y_test)
            minimal = result.values  # [N_test]: smallest ε that fools each image (0: already wrong, inf: never)
            print(f"{time.perf_counter() - start:.1f} s; fooled within ε ≤ 0.5: {result.found.mean():.1%} of the test images")
            print(f"median minimal ε {np.median(minimal[result.found]):.3f}, "
                  f"10 % of the images fall at ε ≤ {np.quantile(minimal[result.found], 0.1):.3f}")

            figure = new_figure((5, 3))
            axis = figure.add_subplot()
            axis.hist(minimal[result.found], bins=25)
            axis.set_xlabel("minimal ε (PGD, L∞)")
            axis.set_ylabel("test images")

            assert result.found.mean() > 0.9  # finite for most examples
            assert np.all(minimal[np.argmax(model.predict(x_test, verbose=0), axis=1) != y_test] == 0.0)  # already wrong
            """
        ),
        md(
            """
            ## 4. What does the model look at on its most fragile predictions?

            The least robust images are the correctly classified ones with the smallest minimal ε. LRP
            redistributes the logit of the predicted class back to the pixels, layer by layer: the z⁺ rule on the
            convolution (positive evidence only, as recommended for lower layers), the ε rule on the Dense layers.
            Red pixels push toward the predicted class, blue ones against it. The bottom row shows the same image
            after its minimal perturbation, with the class it is then given.
            """
        ),
        code(
            """
            predictions = np.argmax(model.predict(x_test, verbose=0), axis=1)
            correct = np.flatnonzero((predictions == y_test) & result.found)
            fragile = correct[np.argsort(minimal[correct], kind="stable")[:6]]  # the 6 least robust correct images
            rules = {"conv": ZPlusRule(), "hidden": EpsilonRule(1e-6), "logits": EpsilonRule(1e-6)}
            relevance = np.asarray(LRP(model, rules=rules).attribute(x_test[fragile], predictions[fragile]))[..., 0]
            perturbed = result.perturbed_inputs[fragile]
            flipped = np.argmax(model.predict(perturbed, verbose=0), axis=1)

            figure = new_figure((1.6 * len(fragile), 5))
            axes = figure.subplots(3, len(fragile))
            for column, index in enumerate(fragile):
                scale = np.abs(relevance[column]).max()
                axes[0, column].imshow(x_test[index, ..., 0], cmap="gray_r")
                axes[0, column].set_title(f"#{index}: {y_test[index]}, ε* = {minimal[index]:.3f}", fontsize=8)
                axes[1, column].imshow(relevance[column], cmap="bwr", vmin=-scale, vmax=scale)
                axes[1, column].set_title("LRP of the prediction", fontsize=8)
                axes[2, column].imshow(perturbed[column, ..., 0], cmap="gray_r", vmin=0, vmax=1)
                axes[2, column].set_title(f"attacked → {flipped[column]}", fontsize=8)
            for axis in axes.ravel():
                axis.set_axis_off()

            assert np.all(flipped != y_test[fragile])  # each minimal perturbation does change the prediction
            # The relevance explains the logit: it sums to at most the logit (biases and z⁺ keep a share) and is mostly positive.
            logits = np.asarray(model.predict(x_test[fragile], verbose=0))[np.arange(len(fragile)), predictions[fragile]]
            print("logit of the prediction:", np.round(logits, 2))
            print("sum of the relevances:  ", np.round(relevance.sum(axis=(1, 2)), 2))
            """
        ),
        md(
            """
            ## 5. Which training images hold those predictions up?

            Influence functions (notebook 01) score every training image `z` for a test image `x`: positive means
            `z` helped the model give `x` its label (a proponent). We watch the last Dense layer, whose Hessian is
            small enough to form exactly. The proponents of a fragile prediction are what the model leans on for
            it: often few, atypical, or of another class when the prediction is barely right.
            """
        ),
        code(
            """
            influence_model = InfluenceModel(model, start_layer=-1, loss_function=loss)
            train_set = from_numpy(x_train, y_train, batch_size=256)
            calculator = FirstOrderInfluenceCalculator(influence_model, train_set, ihvp_calculator="exact", damping=1e-3)
            fragile_set = from_numpy(x_test[fragile], y_test[fragile])
            indices, values = calculator.most_influential(fragile_set, train_set, k=6, order=ORDER.DESCENDING)

            rows, titles = [], []
            for row, index in enumerate(fragile):
                rows.append(x_test[index])
                titles.append(f"test #{index}\\nlabel {y_test[index]}")
                for column in range(indices.shape[1]):
                    rows.append(x_train[indices[row, column]])
                    titles.append(f"label {y_train[indices[row, column]]}\\n{values[row, column]:+.2f}")
            plot_image_grid(rows, titles, num_columns=1 + indices.shape[1],
                            suptitle="Fragile test images (left) and their strongest proponents")

            same_label = np.mean(y_train[indices] == y_test[fragile][:, None])
            print(f"{same_label:.0%} of the proponents share the test image's label (10 % for random training images)")
            assert np.all(values[:, 0] > 0) and np.all(np.diff(values, axis=1) <= 1e-6)  # proponents, most positive first
            assert same_label > 0.3  # far above chance, yet fragile predictions also lean on other classes
            """
        ),
        md(
            """
            ## What we learned

            * The model loses most of its accuracy well inside budgets a person would not notice, and PGD finds
              adversarial images FGSM misses: report PGD accuracy, not FGSM's, as the robust accuracy.
            * The minimal ε ranks test images by robustness at the cost of a few attacks; its smallest values
              mark the predictions to look at.
            * LRP shows which strokes carry those predictions, and influence functions which training images:
              a fragile prediction resting on few or atypical proponents is a data problem (more, or cleaner,
              examples of that kind), not only a model one.

            `docs/benchmarks.md` (section *Robustness, relevance and concepts*) compares these attacks and LRP with
            Captum on the same weights.
            """
        ),
    ]


# ---------------------------------------------------------------------------------------------------- writing

NOTEBOOKS: dict[str, Callable[[], list[Cell]]] = {
    "01_getting_started.ipynb": getting_started,
    "02_mislabeled_detection.ipynb": mislabeled_detection,
    "03_ihvp_solvers.ipynb": ihvp_solvers,
    "04_tracin_and_other_families.ipynb": other_families,
    "05_tabular_data.ipynb": tabular_data,
    "06_group_influence.ipynb": group_influence,
    "07_language_model_influence.ipynb": language_model_influence,
    "08_robustness.ipynb": robustness,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` without outputs, with deterministic cell ids (so rebuilding gives the same file)."""
    cells = NOTEBOOKS[name]()
    stem = name.split("_", 1)[0]
    for position, cell in enumerate(cells):
        cell["id"] = f"nb{stem}-cell{position:02d}"
    notebook = new_notebook(cells=cells)
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(notebook)
    return notebook


def render(name: str) -> str:
    """The file content of notebook ``name``."""
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a notebook differs from its source")
    parser.add_argument("names", nargs="*", help="notebooks to write (default: all)")
    arguments = parser.parse_args(argv)
    stale = []
    for name in arguments.names or NOTEBOOKS:
        path = HERE / name
        content = render(name)
        if arguments.check:
            if not path.exists() or path.read_text(encoding="utf-8") != content:
                stale.append(name)
        else:
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parent)}")
    if stale:
        print(f"out of date (run notebooks/build_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
