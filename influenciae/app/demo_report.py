"""The demo's report: ``cleaning.csv``'s rows, the figures and ``report.html`` with its headline numbers.

:func:`influenciae.app.demo.run_demo` calls these with the metrics it measured; nothing here computes influence.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from influenciae.app.demo_digits import CSV_FILES, RANKING_NAMES, NoisyDigits
from influenciae.app.report import CSS, html_table, image_tag


def _cleaning_csv_rows(cleaning: dict[str, Any]) -> list[list[Any]]:
    """One row per trained configuration: before/clean per seed, then ranking × budget × seed."""
    seeds = cleaning["retrain_seeds"]
    rows: list[list[Any]] = []
    for name in ("before", "clean"):
        fixed = 0 if name == "before" else cleaning["num_flipped"]  # labels changed, all of them flipped ones
        summary = cleaning[name]
        for position, seed in enumerate(seeds):
            rows.append(
                [
                    name,
                    0.0,
                    fixed,
                    seed,
                    fixed,
                    summary["per_seed"][position],
                    summary["test_loss"]["per_seed"][position],
                ]
            )
    for name, ranking in cleaning["rankings"].items():
        for index, (budget, count) in enumerate(zip(cleaning["budgets"], cleaning["num_cleaned"], strict=True)):
            for position, seed in enumerate(seeds):
                rows.append(
                    [
                        name,
                        budget,
                        count,
                        seed,
                        ranking["flipped_cleaned"][index][position],
                        ranking["per_seed"][index][position],
                        ranking["test_loss"]["per_seed"][index][position],
                    ]
                )
    return rows


def _cleaning_figure(plots: Any, cleaning: dict[str, Any]) -> Any:
    """Test accuracy (left) and test cross-entropy (right) against the budget, one line per ranking."""
    figure = plots.new_figure((11.5, 4.4))
    left, right = figure.subplots(1, 2)
    rankings = cleaning["rankings"]

    def pick(summary: dict[str, Any], key: str | None) -> dict[str, Any]:
        return summary if key is None else summary[key]

    for axis, key, label in ((left, None, "test accuracy"), (right, "test_loss", "test cross-entropy")):
        plots.plot_cleaning_curve(
            cleaning["budgets"],
            {
                RANKING_NAMES[name]: (pick(ranking, key)["mean"], pick(ranking, key)["std"])
                for name, ranking in rankings.items()
            },
            before=(pick(cleaning["before"], key)["mean"], pick(cleaning["before"], key)["std"]),
            ceiling=pick(cleaning["clean"], key)["mean"],
            title=label,
            ylabel=label,
            axis=axis,
        )
    right.legend(loc="center right")  # the random line runs along the top
    verb = "Fixing the labels of" if cleaning["action"] == "fix" else "Dropping"
    figure.suptitle(
        f"{verb} the top-ranked training examples and retraining (mean ± std over {len(cleaning['retrain_seeds'])} "
        "seeds; dashed black: every label clean)"
    )
    return figure


def _proponents_figure(plots: Any, data: NoisyDigits, examples: list[dict[str, Any]]) -> Any:
    columns = max(len(examples[0]["proponents"]), 1)
    figure = plots.new_figure(figsize=(1.3 * (columns + 1.3), 3.4 * len(examples)))
    panels = figure.subfigures(len(examples), 1, squeeze=False)[:, 0]
    for panel, example in zip(panels, examples, strict=True):

        def titles(items: list[dict[str, Any]]) -> list[str]:
            return [f"#{it['train_index']} y={it['given_label']}" + ("*" if it["flipped"] else "") for it in items]

        plots.plot_proponents_opponents(
            data.x_test[example["test_index"]],
            data.x_train[[it["train_index"] for it in example["proponents"]]],
            data.x_train[[it["train_index"] for it in example["opponents"]]],
            ([it["score"] for it in example["proponents"]], [it["score"] for it in example["opponents"]]),
            test_title=f"{'ERROR' if example['misclassified'] else 'correct'} test #{example['test_index']}\n"
            f"true {example['true_label']}, pred {example['predicted_label']}\n"
            f"{example['flipped_proponents']}/{len(example['proponents'])} proponents flipped",
            proponent_titles=titles(example["proponents"]),
            opponent_titles=titles(example["opponents"]),
            figure=panel,
        )
    figure.suptitle(
        "Why this prediction? Proponents of the predicted class (green, top rows) and opponents (red, bottom rows); "
        "* = flipped label"
    )
    return figure


def _pm(summary: dict[str, Any]) -> str:
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _headline(metrics: dict[str, Any]) -> list[str]:
    """The findings in plain sentences, shared by the report and the terminal summary (numbers, not adjectives)."""
    cleaning, errors, detection = metrics["cleaning"], metrics["test_errors"], metrics["detection"]
    verb = "fixing the labels of" if cleaning["action"] == "fix" else "dropping"
    middle = len(cleaning["budgets"]) // 2
    budget, count = cleaning["budgets"][middle], cleaning["num_cleaned"][middle]
    rankings = cleaning["rankings"]
    after = {
        name: f"{ranking['mean'][middle]:.3f} ± {ranking['std'][middle]:.3f}" for name, ranking in rankings.items()
    }
    after_loss = {
        name: f"{ranking['test_loss']['mean'][middle]:.3f} ± {ranking['test_loss']['std'][middle]:.3f}"
        for name, ranking in rankings.items()
    }
    found = {name: float(np.mean(ranking["flipped_cleaned"][middle])) for name, ranking in rankings.items()}
    seeds = len(cleaning["retrain_seeds"])
    lines = [
        f"Cleaning: {verb} the top {budget:.0%} ({count} examples) of each ranking and retraining gives a test "
        f"accuracy of {after['self_influence']} by self-influence, {after['loss']} by training loss and "
        f"{after['random']} by random picks, against {_pm(cleaning['before'])} before cleaning and "
        f"{_pm(cleaning['clean'])} with every label clean (mean ± std over {seeds} retraining seeds); test "
        f"cross-entropy {after_loss['self_influence']}, {after_loss['loss']} and {after_loss['random']} against "
        f"{_pm(cleaning['before']['test_loss'])} before and {_pm(cleaning['clean']['test_loss'])} clean. Those "
        f"picks hold {found['self_influence']:.0f}, {found['loss']:.0f} and {found['random']:.0f} of the "
        f"{cleaning['num_flipped']} flipped labels.",
    ]
    gap = cleaning["clean"]["mean"] - cleaning["before"]["mean"]
    if abs(gap) <= cleaning["clean"]["std"] + cleaning["before"]["std"]:
        lines.append(
            f"Caution: with every label clean the test accuracy changes by {gap:+.3f}, no more than the spread "
            f"between training seeds (± {cleaning['before']['std']:.3f} before, ± {cleaning['clean']['std']:.3f} "
            "clean), so accuracy differences between rankings are within seed noise here."
        )
    before_loss, clean_loss = cleaning["before"]["test_loss"], cleaning["clean"]["test_loss"]
    if before_loss["mean"] - clean_loss["mean"] > before_loss["std"] + clean_loss["std"]:
        lines.append(
            f"The test cross-entropy separates noisy from clean training beyond the seed spread "
            f"({_pm(before_loss)} vs {_pm(clean_loss)}): it is the finer measure of what cleaning buys here."
        )
    influence, relatif = errors["influence"], errors["relatif"]
    if errors["num_errors"]:
        sentence = (
            f"Test errors: {errors['num_errors']} of {errors['num_test']} test images are misclassified. Among the "
            f"top-{errors['k']} proponents of each wrong prediction (the training images that pushed the model most "
            f"towards the wrong class), {_percent(influence['errors']['flipped_fraction'])} carry a flipped label, "
            f"{_percent(influence['errors']['flipped_to_predicted_fraction'])} flipped to the predicted class; "
            f"{_percent(influence['errors']['with_a_flipped_proponent'])} of the errors have at least one. For "
            f"correct predictions the same lists hold {_percent(influence['correct']['flipped_fraction'])} flipped "
            f"labels (training base rate {errors['train_flipped_rate']:.0%}): plain influence favours high-loss "
            "training images for every test image."
        )
        if relatif is not None:
            sentence += (
                " RelatIF (training side normalized by ‖H⁻¹∇ℓ(z)‖): "
                f"{_percent(relatif['errors']['flipped_fraction'])} flipped among the proponents of errors, "
                f"{_percent(relatif['correct']['flipped_fraction'])} for correct predictions; "
                f"{_percent(relatif['errors']['with_a_flipped_proponent'])} of the errors have at least one, against "
                f"{_percent(relatif['correct']['with_a_flipped_proponent'])} of the correct predictions."
            )
        lines.append(sentence)
    else:
        lines.append(f"Test errors: none of the {errors['num_test']} test images is misclassified.")
    auc = detection["auc"]
    if auc["loss"] >= auc["self_influence"]:
        lines.append(
            f"Detection: at this noise level the training loss ranks the flipped labels as well as or better than "
            f"self-influence (ROC AUC {auc['loss']:.4f} vs {auc['self_influence']:.4f}), and costs nothing; what "
            "influence adds is the explanation of each test error above, which a per-example loss cannot give."
        )
    else:
        lines.append(
            f"Detection: self-influence ranks the flipped labels better than the training loss (ROC AUC "
            f"{auc['self_influence']:.4f} vs {auc['loss']:.4f})."
        )
    return lines


def _cleaning_rows(cleaning: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for name, ranking in cleaning["rankings"].items():
        for position, budget in enumerate(cleaning["budgets"]):
            flipped = ranking["flipped_cleaned"][position]
            rows.append(
                [
                    RANKING_NAMES[name],
                    f"{budget:.0%} ({cleaning['num_cleaned'][position]})",
                    f"{float(np.mean(flipped)):.3g} of {cleaning['num_flipped']}",
                    f"{ranking['mean'][position]:.3f} ± {ranking['std'][position]:.3f}",
                    f"{ranking['mean'][position] - cleaning['before']['mean']:+.3f}",
                    f"{ranking['test_loss']['mean'][position]:.3f} ± {ranking['test_loss']['std'][position]:.3f}",
                ]
            )
    return rows


def _report_html(metrics: dict[str, Any], suspicious: list[dict[str, Any]], images: dict[str, bytes]) -> str:
    detection, model, data, config = metrics["detection"], metrics["model"], metrics["data"], metrics["config"]
    cleaning, errors = metrics["cleaning"], metrics["test_errors"]
    found = detection["fraction_found"]
    difference = detection["auc"]["self_influence"] - detection["auc"]["loss"]
    names = {"self_influence": "self-influence", "loss": "training loss", "random": "random (expected)"}
    headline = "".join(f"<li>{html.escape(line)}</li>" for line in _headline(metrics))
    cleaning_table = html_table(
        [
            "ranking",
            "budget (examples)",
            "flipped labels cleaned",
            "test accuracy (mean ± std)",
            "accuracy gain",
            "test cross-entropy",
        ],
        [
            [
                "before cleaning (noisy labels)",
                "0 %",
                "0",
                _pm(cleaning["before"]),
                "+0.000",
                _pm(cleaning["before"]["test_loss"]),
            ],
            *_cleaning_rows(cleaning),
            [
                "all labels clean (ceiling)",
                "",
                str(cleaning["num_flipped"]),
                _pm(cleaning["clean"]),
                f"{cleaning['clean']['mean'] - cleaning['before']['mean']:+.3f}",
                _pm(cleaning["clean"]["test_loss"]),
            ],
        ],
    )
    statistics_rows = []
    for method, label in (("influence", "first-order influence"), ("relatif", "RelatIF")):
        stats = errors[method]
        if stats is None:
            continue
        for kind in ("errors", "correct"):
            statistics_rows.append(
                [
                    label,
                    "misclassified" if kind == "errors" else "correctly classified",
                    _percent(stats[kind]["flipped_fraction"]),
                    _percent(stats[kind]["flipped_to_predicted_fraction"]),
                    _percent(stats[kind]["with_a_flipped_proponent"]),
                ]
            )
    error_statistics = html_table(
        [
            "scores",
            "test images",
            f"top-{errors['k']} proponents flipped",
            "flipped to the predicted class",
            "images with ≥ 1 flipped proponent",
        ],
        statistics_rows,
    )
    error_rows, error_classes = [], []
    for example in metrics["test_examples"]:
        top = example["proponents"][0]
        error_rows.append(
            [
                example["test_index"],
                example["true_label"],
                example["predicted_label"],
                "error" if example["misclassified"] else "correct",
                f"{example['flipped_proponents']} of {len(example['proponents'])}",
                example["flipped_to_predicted_proponents"],
                f"#{top['train_index']} (given {top['given_label']}, true {top['true_label']})",
            ]
        )
        error_classes.append("flipped" if example["misclassified"] else "")
    errors_table = html_table(
        [
            "test index",
            "true",
            "predicted",
            "",
            "proponents flipped",
            "… to the predicted class",
            "top proponent",
        ],
        error_rows,
        error_classes,
    )
    summary = html_table(
        ["ranking", "ROC AUC", "found @ 10 % inspected", "found @ 20 % inspected", "detection-curve AUC"],
        [
            [label, detection["auc"][key], found[key]["0.1"], found[key]["0.2"], detection["curve_auc"][key]]
            for key, label in names.items()
        ],
    )
    setup = html_table(
        ["setting", "value"],
        [
            ["training / test examples", f"{data['num_train']} / {data['num_test']}"],
            ["flipped training labels", f"{data['num_flipped']} ({config['flip_fraction']:.0%})"],
            [
                "train accuracy (given labels / true labels)",
                f"{model['train_accuracy_given_labels']:.3f} / {model['train_accuracy_true_labels']:.3f}",
            ],
            ["test accuracy", model["test_accuracy"]],
            ["watched weights", ", ".join(model["watched_weights"])],
            ["watched parameters P (of all)", f"{model['num_watched_params']} (of {model['num_params']})"],
            ["method / solver / damping", f"{config['method']} / {config['solver']} / {config['damping']:g}"],
            ["rank correlation self-influence vs loss", detection["rank_correlation_self_influence_loss"]],
            ["seed / epochs", f"{config['seed']} / {config['epochs']}"],
            [
                "cleaning: action / retraining seeds",
                f"{cleaning['action']} / {', '.join(str(seed) for seed in cleaning['retrain_seeds'])}",
            ],
        ],
    )
    suspicious_table = html_table(
        ["rank", "train index", "self-influence", "loss", "given", "predicted", "true", "flipped"],
        [
            [r["rank"], r["index"], r["self_influence"], r["loss"], r["given"], r["predicted"], r["true"], r["flipped"]]
            for r in suspicious
        ],
        ["flipped" if r["flipped"] else "" for r in suspicious],
    )
    test_sections = []
    for example in metrics["test_examples"]:
        rows, classes = [], []
        for kind in ("proponent", "opponent"):
            for rank, item in enumerate(example[f"{kind}s"], start=1):
                rows.append(
                    [
                        kind,
                        rank,
                        item["train_index"],
                        item["score"],
                        item["given_label"],
                        item["true_label"],
                        item["flipped"],
                    ]
                )
                classes.append("flipped" if item["flipped"] else "")
        status = "misclassified" if example["misclassified"] else "correct"
        test_sections.append(
            f"<h3>Test image #{example['test_index']} ({status}): true {example['true_label']}, "
            f"predicted {example['predicted_label']}</h3>"
            + html_table(["kind", "rank", "train index", "influence", "given", "true", "flipped"], rows, classes)
        )
    action = "fixes the labels of" if cleaning["action"] == "fix" else "drops"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>influenciae demo: digits with flipped labels</title>
<style>{CSS}</style></head><body>
<h1>Influence functions on digits with flipped labels</h1>
<p class="note">{data["num_flipped"]} of {data["num_train"]} training labels were flipped to another class before
training. Influence answers two questions here: which training images caused each test error, and which labels to
fix first. Positive influence on a test prediction means the training example is a <b>proponent</b> (it pushed the
model towards that prediction: removing it would raise the loss of the predicted label); negative means an
<b>opponent</b>.</p>
<h2>Summary</h2>
<ul>{headline}</ul>
<h2>What cleaning buys</h2>
<p class="note">For each budget the experiment {action} the top-ranked training examples of each ranking, retrains the
same model (same epochs, same seeds {", ".join(str(seed) for seed in cleaning["retrain_seeds"])}) and measures the test
accuracy and cross-entropy; random picks use one permutation per seed. Mean ± sample standard deviation over the
seeds; the dashed line is the model trained with every label clean. {cleaning["num_models_trained"]} models were trained
(a training set met twice with the same seed is trained once: training is deterministic).</p>
{image_tag(images, "cleaning.png")}
{cleaning_table}
<h2>Why did the model get these test images wrong?</h2>
<p class="note">Every misclassified test image (red rows), then {config["num_test_images"]} correct ones for contrast.
Scores are influence on the loss of the <i>predicted</i> label, so the proponents of an error are the training images
that pushed the model towards the wrong class. "Flipped to the predicted class": a training image of another class
labeled as the (wrong) prediction.</p>
{error_statistics}
{image_tag(images, "proponents_opponents.png")}
{errors_table}
<h2>Detecting flipped labels</h2>
<p class="note">Every training example ranked by its self-influence ∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) (high = atypical or likely
mislabeled) and, as a baseline, by its training loss.</p>
{summary}
<p>Self-influence AUC minus training-loss AUC: <b>{difference:+.4f}</b>; rank correlation between the two scores:
{detection["rank_correlation_self_influence_loss"]:.3f}.</p>
{setup}
{image_tag(images, "detection_curve.png")}
<h2>The {len(suspicious)} most suspicious training images</h2>
<p class="note">Highest self-influence first; red rows and frames are flipped labels.</p>
{image_tag(images, "suspicious.png")}
{suspicious_table}
<h2>Proponents and opponents of each explained test image</h2>
{"".join(test_sections)}
<p class="note">Files: {", ".join(html.escape(name) for name in [*images, *CSV_FILES, "metrics.json"])}. Timings and
every number above are in metrics.json.</p>
</body></html>
"""
