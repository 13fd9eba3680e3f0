"""The model card (``README.md``, Hugging Face metadata in its YAML front matter) written into every
saved model folder, with the run's ``report.json`` beside it.

The card says what was done (method, sparsity, calibration), what it cost (the measured metrics
with the settings that decide them) and how to reload the folder. Numbers in the front matter's
``model-index`` are the report's own, unrounded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from ..eval.metric import FIT_SIDES, Metric
from ..eval.metrics import METRICS
from .machine import one_line
from .report import atomic_write, method_label, sides_of, upgrade, write_json

CARD = "README.md"
_SIDES = {"dense": "dense", "pruned": "pruned", "before": "before fine-tuning", "after": "after"}


def front_matter(text: str) -> Dict[str, Any]:
    """The YAML metadata block at the top of a model card ({} when there is none)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    if end < 0:
        return {}
    meta = yaml.safe_load(text[4:end])
    return meta if isinstance(meta, dict) else {}


def base_of(report: Mapping[str, Any]) -> Tuple[str, Optional[str]]:
    """(base model, its licence or None): an embedded asset's hub original; a folder's own card
    (one of ours names the original base again); else the name as given."""
    from ..assets.registry import REGISTRY

    name = str(report.get("model"))
    asset = REGISTRY.get(name)
    if asset is not None and asset.hub_id:
        return asset.hub_id, asset.license or None
    path = report.get("model_path")
    card = Path(path) / CARD if path else None
    meta = front_matter(card.read_text(errors="replace")) if card is not None and card.is_file() else {}
    if "wanda_pl" in (meta.get("tags") or []) and meta.get("base_model"):
        return str(meta["base_model"]), meta.get("license")
    return name, meta.get("license")


def _results(report: Mapping[str, Any]) -> Tuple[str, str, List[Tuple[Metric, Any, Any]]]:
    """(before label, after label, [(metric, before, after)]) for a prune or a fit report: each
    declared metric the report has an after (pruned) value of."""
    first, second = sides_of(report)
    pairs = upgrade(report).get("metrics") or {}
    rows = [(m, pairs[m.name].get(first), pairs[m.name][second]) for m in METRICS.values()
            if isinstance((pairs.get(m.name) or {}).get(second), (int, float))]
    return _SIDES[first], _SIDES[second], rows


def _evaluated_on(report: Mapping[str, Any]) -> str:
    if report.get("seqlen") is not None:
        return f"{report.get('evaluation')}, {report.get('eval_windows')} windows of {report.get('seqlen')} tokens"
    return f"{report.get('evaluation')}, {report.get('eval_images')} labelled images"


def model_card(report: Mapping[str, Any], where: str) -> str:
    """The card of the model saved by the run ``report`` describes, to be reloaded from ``where``."""
    base, licence = base_of(report)
    llm = "timm_name" not in report
    fit = sides_of(report) == FIT_SIDES
    stype = str(report.get("sparsity_type"))
    sparsity = report.get("sparsity_after", report.get("actual_sparsity"))
    pattern = stype.replace(":", "-") + ("-sparsity" if ":" in stype else "")
    label = method_label(report)
    shape = _structure(report)
    tags = ["wanda_pl", "pruned", *(["structured", report["structure"]] if shape else ["sparse", *label.split("+"), pattern])]
    tags += [f"sparsity-{round(100 * sparsity)}"] if isinstance(sparsity, (int, float)) and not shape else []
    tags += ["fine-tuned"] if fit else []
    before, after, rows = _results(report)
    metrics = [{"type": m.name, "name": f"{m.label} ({after})", "value": a} for m, _, a in rows]
    metrics += [{"type": m.name, "name": f"{m.label} ({before})", "value": b} for m, b, _ in rows if b is not None]
    meta: Dict[str, Any] = {"base_model": base, **({"license": licence} if licence else {}),
                            "library_name": "transformers" if llm else "timm",
                            "pipeline_tag": "text-generation" if llm else "image-classification", "tags": tags}
    if metrics:
        meta["model-index"] = [{"name": Path(where).parent.name or "model", "results": [{
            "task": {"type": meta["pipeline_tag"]},
            "dataset": {"name": str(report.get("evaluation")), "type": str(report.get("evaluation"))},
            "metrics": metrics}]}]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {Path(base).name}: " + (shape[0] if shape else f"{label} {stype}, sparsity {_pct(sparsity)}")
             + (" (fine-tuned)" if fit else ""), "",
             f"Pruned with wanda_pl {report.get('versions', {}).get('wanda_pl', '')} from "
             f"`{base}` (loaded from `{report.get('model_path')}`).", "",
             "| setting | value |", "| --- | --- |",
             *(shape[1:] if shape else [
                 f"| method | {label} (granularity {report.get('granularity')}, "
                 f"allocation {report.get('allocation')}) |",
                 f"| sparsity | target {report.get('sparsity_ratio')} {stype}; actual {_pct(sparsity)} of the "
                 f"prunable weights ({len(report.get('layers') or {})} layers) |",
                 f"| coverage | the prunable weights are {_pct(report.get('target_coverage'))} of the blocks' "
                 f"weights; sparsity {_pct(report.get('sparsity_block_weights'))} over all block weights, "
                 f"{_pct(report.get('sparsity_model'))} over every weight of the model |"]),
             f"| calibration | {report.get('nsamples')} samples"
             + (f" x {report.get('seqlen')} tokens" if report.get("seqlen") else "")
             + f" of {report.get('calibration')}, seed {report.get('seed')} |",
             f"| evaluated on | {_evaluated_on(report)} |",
             f"| hardware | {one_line(report.get('hardware'))} |", ""]
    if fit:
        lines[-1:] = [f"| fine-tuning | {report.get('finetune')}, {report.get('steps')} steps |", ""]
    if rows:
        lines += ["## Results", "", f"| metric | {before} | {after} |", "| --- | --- | --- |"]
        lines += [f"| {m.label} | {_num(b)} | {_num(a)} |" for m, b, a in rows] + [""]
    lines += ["## How to reload", "", "```python"]
    if llm:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"model = AutoModelForCausalLM.from_pretrained({where!r})",
                  f"tokenizer = AutoTokenizer.from_pretrained({where!r})"]
    else:
        lines += ["from wanda_pl.modules.classifier import Classifier", "",
                  f"module = Classifier(checkpoint_path={where!r})  # module.model: the timm network"]
    lines += ["```", "",
              f"A smaller model: its config states the new sizes, so stock code loads it. To recover what pruning "
              f"cost by distillation from the original: `python cli.py fit --model.name_or_path {where} "
              f"--distill.teacher {report.get('model')} ...`." if shape else
              "The pruned weights are zeros in dense tensors. To fine-tune with every zero kept: "
              f"`python cli.py fit --model.name_or_path {where} --pruning.masks_from zeros ...`.", "",
              "`report.json` beside this card holds every setting of the run (the full config, calibration, "
              "library versions, timings, per-layer sparsity).", ""]
    return "\n".join(lines)


def _structure(report: Mapping[str, Any]) -> List[str]:
    """A smaller model's title and table rows (what was removed, the parameters before and after);
    empty for weight sparsity."""
    if report.get("structure") not in ("width", "depth"):
        return []
    before, after = report.get("parameters_dense"), report.get("parameters")
    if report["structure"] == "width":
        what = (f"width by {report.get('method')}: {_pct(report.get('width_mlp'))} of every block's MLP channels "
                f"and {_pct(report.get('width_heads'))} of its KV groups removed"
                + (f" (kept MLP channels a multiple of {report['width_multiple']})" if report.get("width_multiple") else "")
                + f", compensation {report.get('compensate')}")
    else:
        removed = (report.get("structure_result") or {}).get("removed") or []
        what = f"depth: {report.get('blocks_removed')} blocks removed ({', '.join(removed)}), by influence"
    counts = f"{_count(before)} -> {_count(after)} ({after / before - 1:+.1%})" if before and after else "-"
    return [f"{report['structure']}-pruned, {counts} parameters", f"| structure | {what} |",
            f"| parameters | {counts} |"]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def write_card(folder, report: Mapping[str, Any], where) -> None:
    """``README.md`` and ``report.json`` into the saved model ``folder`` (reloaded later from ``where``)."""
    folder = Path(folder)
    write_json(folder / "report.json", report)
    atomic_write(folder / CARD, model_card(report, str(where)))


def _pct(x) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else "n/a"


def _num(x) -> str:
    if not isinstance(x, (int, float)):
        return "n/a"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.3f}"
