"""lm-eval task YAMLs that read the embedded task data (:mod:`wanda_pl.assets.tasks`).

Each YAML ``include:``s the stock lm-eval YAML of the installed version and swaps only the data
source (absolute paths), so prompts, targets, metrics and task versions stay lm-eval's own and
only where the rows come from differs. It lives with evaluation: the data does not need lm-eval.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

from ..assets.registry import AssetError
from ..assets.tasks import ARROW_TASKS, TASKS, zero_shot_tasks

# the stock lm-eval YAML each task includes, relative to lm_eval/tasks
STOCK_YAML: Dict[str, str] = {
    "boolq": "super_glue/boolq/default.yaml",
    "rte": "glue/rte/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


def _data_files(task: str, data_dir: Path) -> dict:
    if task in ARROW_TASKS:
        return {
            "dataset_path": "arrow",
            "dataset_kwargs": {"data_files": {"validation": str((data_dir / f"{task}.validation.arrow").resolve())}},
        }
    return {
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {
                split: str((data_dir / f"{task}.{split}.jsonl").resolve()) for split in ("validation", "test")
            }
        },
    }


def stock_yaml(task: str) -> Path:
    """The installed lm-eval's own YAML for ``task``."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / STOCK_YAML[task]
    if not path.is_file():
        raise AssetError(f"the installed lm-eval has no {STOCK_YAML[task]} (task {task!r})")
    return path


def task_config(task: str, data_dir: Path) -> dict:
    """The YAML content of our ``task``: the stock YAML with only the data source swapped."""
    if task not in STOCK_YAML:
        raise ValueError(f"no embedded data for task {task!r}; embedded: {', '.join(TASKS)}")
    cfg = {
        "include": str(stock_yaml(task)),
        "task": task,
        "tag": None,  # keep our copies out of the stock groups (glue, ai2_arc, super-glue-lm-eval-v1, ...)
        "dataset_name": None,
        "training_split": None,  # no train split offline: few-shot examples come from validation
        **_data_files(task, data_dir),
    }
    if task == "boolq":
        # the stock YAML reads super_glue's int `label`; google/boolq (the embedded one) has a bool `answer`
        cfg["doc_to_target"] = "{{answer | int}}"
    return cfg


def write_task_configs(out_dir, tasks: Sequence[str] = TASKS, data_dir=None) -> Path:
    """Write lm-eval task YAMLs for ``tasks`` reading the embedded data; returns the include path.

    Use it as ``TaskManager(include_path=str(path), include_defaults=False)``: the tasks keep their
    stock names (``boolq``, ``arc_easy``, ...). Paths in the YAMLs are absolute (lm-eval resolves
    ``data_files`` against the working directory, not the YAML).
    """
    import yaml

    data_dir = Path(data_dir) if data_dir is not None else zero_shot_tasks()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        text = yaml.safe_dump(task_config(task, data_dir), sort_keys=False)
        (out / f"{task}.yaml").write_text(text, encoding="utf-8")
    return out
