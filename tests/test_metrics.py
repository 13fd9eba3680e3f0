"""Declared metrics: one shape for every pair in a report, old reports read in that shape, and a
metric declared once reaching the headline, the loggers, the sweep's table and plots and the card."""
import csv
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from wanda_pl.commands.card import front_matter, model_card
from wanda_pl.commands.steps import Evaluation
from wanda_pl.commands.loggers import run_metrics
from wanda_pl.commands.report import FIT_SIDES, assemble, headline, measured, upgrade
from wanda_pl.commands.sweep_files import row_of, write_summary
from wanda_pl.eval.metric import Metric, compare_line
from wanda_pl.eval.metrics import METRICS

ZD = {"tasks": {"boolq": {"acc": 0.6}}, "mean_acc": 0.6, "mean_acc_norm": 0.6}  # zero-shot results
ZP = {"tasks": {"boolq": {"acc": 0.5}}, "mean_acc": 0.5, "mean_acc_norm": 0.5}
DENSE = {"top1": 0.9, "top5": 1.0, "images": 10, "labelled": 7, "top1_correct": 6, "agreement": 1.0,
         "agreement_unlabelled": 1.0}
PRUNED = {"top1": 0.7, "top5": 0.9, "images": 10, "labelled": 7, "top1_correct": 5, "agreement": 0.8,
          "agreement_unlabelled": 2 / 3}
UNLABELLED = {"top1": None, "top5": None, "images": 4, "labelled": 0, "top1_correct": 0, "agreement": 0.75,
              "agreement_unlabelled": 0.75}


def counts(metrics):
    return {"eval_counts": {"images": metrics["images"], "labelled": metrics["labelled"]}}


def report(results):
    """A report around ``results`` as the commands assemble it (sections listed)."""
    return assemble(model={"model": "m"}, results={"actual_sparsity": 0.5, **results}, timing={"time_s": {"total": 1.0}})


def pair(dense, pruned):
    return {k: {"dense": dense.get(k), "pruned": pruned.get(k)} for k in ("top1", "top5", "agreement",
                                                                            "agreement_unlabelled")}


# (what the code before declared metrics wrote, what is written now from the same measurements)
OLD_AND_NEW = {
    "llm": ({"ppl_dense": 19.1, "ppl": 42.1}, measured(Evaluation({"ppl": 19.1}), Evaluation({"ppl": 42.1}))),
    "llm without dense": ({"ppl_dense": None, "ppl": 42.1}, measured(None, Evaluation({"ppl": 42.1}))),
    "llm zero-shot": ({"ppl_dense": 19.1, "ppl": 42.1, "zero_shot": {"dense": ZD, "pruned": ZP}},
                      measured(Evaluation({"ppl": 19.1}, ZD), Evaluation({"ppl": 42.1}, ZP))),
    "llm zero-shot without dense": ({"ppl_dense": None, "ppl": 42.1, "zero_shot": {"dense": None, "pruned": ZP}},
                                    measured(None, Evaluation({"ppl": 42.1}, ZP))),
    "classifier": ({"accuracy": pair(DENSE, PRUNED), **counts(PRUNED)},
                   {**measured(Evaluation(DENSE), Evaluation(PRUNED)), **counts(PRUNED)}),
    "classifier, unlabelled images": ({"accuracy": pair(UNLABELLED, UNLABELLED), **counts(UNLABELLED)},
                                      {**measured(Evaluation(UNLABELLED), Evaluation(UNLABELLED)), **counts(UNLABELLED)}),
    "fit": ({"sparsity_before": 0.5, "sparsity_after": 0.5, "metrics_before": {"ppl": 40.0, "zero_shot": ZD},
             "metrics_after": {"ppl": 30.0, "zero_shot": ZP}},
            {"sparsity_before": 0.5, "sparsity_after": 0.5,
             **measured(Evaluation({"ppl": 40.0}, ZD), Evaluation({"ppl": 30.0}, ZP), FIT_SIDES)}),
    "fit resumed (nothing before)": ({"sparsity_before": 0.5, "sparsity_after": 0.5, "metrics_before": None,
                                      "metrics_after": {"ppl": 30.0}},
                                     {"sparsity_before": 0.5, "sparsity_after": 0.5,
                                      **measured(None, Evaluation({"ppl": 30.0}), FIT_SIDES)}),
    "fit classifier": ({"sparsity_before": 0.5, "sparsity_after": 0.5, "metrics_before": DENSE, "metrics_after": PRUNED},
                       {"sparsity_before": 0.5, "sparsity_after": 0.5,
                        **measured(Evaluation(DENSE), Evaluation(PRUNED), FIT_SIDES), **counts(PRUNED)}),
}


@pytest.mark.parametrize("shape", list(OLD_AND_NEW))
def test_an_old_report_reads_as_the_new_one(shape):
    old, new = (report(results) for results in OLD_AND_NEW[shape])
    assert upgrade(old) == new
    assert list(upgrade(old)["sections"]["results"]) == list(new["sections"]["results"])
    assert upgrade(new) == new
    assert headline(old) == headline(new)


def test_the_new_shape_and_the_csv_columns_of_before():
    llm, zero_shot, classifier, unlabelled, fit = (report(OLD_AND_NEW[k][1]) for k in (
        "llm", "llm zero-shot", "classifier", "classifier, unlabelled images", "fit"))
    assert llm["metrics"] == {"ppl": {"dense": 19.1, "pruned": 42.1}}
    assert zero_shot["metrics"]["zero_shot_mean_acc"] == {"dense": 0.6, "pruned": 0.5}
    assert zero_shot["zero_shot"] == {"dense": ZD, "pruned": ZP}  # the per-task tables stay whole
    assert fit["metrics"] == {"ppl": {"before": 40.0, "after": 30.0}, "zero_shot_mean_acc": {"before": 0.6, "after": 0.5}}
    assert headline(llm) == {"ppl": 42.1, "ppl_dense": 19.1}
    assert headline(zero_shot) == {"ppl": 42.1, "ppl_dense": 19.1, "zero_shot_mean_acc": 0.5,
                                   "zero_shot_mean_acc_dense": 0.6}
    assert list(headline(classifier)) == ["top1", "top1_dense", "top5", "top5_dense", "agreement", "agreement_dense",
                                          "agreement_unlabelled", "agreement_unlabelled_dense"]
    assert "top1" not in unlabelled["metrics"]  # nothing to measure it on: not a measurement
    assert headline(fit) == {"ppl": 30.0, "ppl_before": 40.0, "zero_shot_mean_acc": 0.5, "zero_shot_mean_acc_before": 0.6}


def test_every_declared_metric_is_in_the_table_once_and_every_module_declares_its_own():
    from wanda_pl.modules.classifier import Classifier
    from wanda_pl.modules.protocol import MEMBERS

    assert all(name == m.name for name, m in METRICS.items())
    assert "measures" in MEMBERS
    assert set(Classifier.measures) <= set(METRICS.values())
    from wanda_pl.modules.causal_lm import CausalLM

    assert set(CausalLM.measures) <= set(METRICS.values())


def test_the_console_line_of_a_language_model_is_as_before():
    ppl = METRICS["ppl"]
    assert compare_line([ppl], {"ppl": 19.1}, {"ppl": 42.10849}) == "perplexity dense 19.100, pruned 42.108"
    assert compare_line([ppl], None, {"ppl": 42.1}) == "perplexity dense n/a, pruned 42.100"


@dataclass
class _Grid:
    methods: list


def test_a_metric_declared_once_reaches_headline_loggers_sweep_and_card(monkeypatch, tmp_path):
    """KL divergence to the dense model, as a new metric would come: its declaration in the table,
    a module producing it by name; nothing else edited."""
    kl = Metric("kl", "KL divergence to the dense model", lower_is_better=True, log_scale=True)
    monkeypatch.setitem(METRICS, kl.name, kl)
    runs = []
    for ratio, value in ((0.5, 0.25), (0.7, 0.5)):
        results = measured(Evaluation({"ppl": 19.1, "kl": 0.0}), Evaluation({"ppl": 42.1, "kl": value}))
        runs.append(assemble(model={"model": "m", "nsamples": 4},
                             results={"sparsity_type": "unstructured", "sparsity_ratio": ratio,
                                      "actual_sparsity": ratio, **results}))
    one = runs[0]
    assert one["metrics"]["kl"] == {"dense": 0.0, "pruned": 0.25}
    assert headline(one)["kl"] == 0.25 and headline(one)["kl_dense"] == 0.0
    assert run_metrics(one)["kl"] == 0.25 and run_metrics(one)["kl_dense"] == 0.0
    points = [SimpleNamespace(name=f"wanda-{r['sparsity_ratio']}", method="wanda") for r in runs]
    summary = write_summary(tmp_path, _Grid(["wanda"]), [row_of(p, r) for p, r in zip(points, runs)], None, runs[-1])
    with open(tmp_path / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"ppl", "ppl_dense", "kl", "kl_dense"} <= set(rows[0]) and float(rows[1]["kl"]) == 0.5
    assert "kl_vs_sparsity.png" in summary["files"] and (tmp_path / "kl_vs_sparsity.png").is_file()
    card = model_card(one, "x/model")
    assert "| KL divergence to the dense model | 0.0000 | 0.2500 |" in card
    values = {m["name"]: m["value"] for m in front_matter(card)["model-index"][0]["results"][0]["metrics"]}
    assert values["KL divergence to the dense model (pruned)"] == 0.25
