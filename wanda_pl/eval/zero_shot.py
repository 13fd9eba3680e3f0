"""Zero-shot accuracy of an in-memory causal LM with lm-eval's own task definitions.

The model is wrapped, not copied, in lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)`` and
scored by ``lm_eval.evaluator.evaluate`` on the stock task definitions of the installed lm-eval
(prompts, targets, metrics, task versions). Where the data comes from (``source``):

* ``"hub"``: lm-eval's normal path (its stock YAMLs, data sets from the Hugging Face hub);
* ``"embedded"``: the same stock YAMLs with only the data source swapped for the offline copies of
  :mod:`wanda_pl.assets.tasks` (the identical splits: validation for BoolQ/RTE/HellaSwag/WinoGrande/PIQA,
  test for ARC-Easy/ARC-Challenge/OpenBookQA);
* ``"auto"``: ``"embedded"`` when ``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) is set, else ``"hub"``.

Several processes: call :func:`run_zero_shot` on every rank with ``rank`` / ``world_size`` of an
already initialised ``torch.distributed`` process group (e.g. Lightning DDP, gloo or nccl). Each rank
scores every ``world_size``-th document (lm-eval's own sharding); the per-document metrics are gathered
back into single-process document order, so the result equals the one-process result; every rank
returns the same dict.

lm-eval is imported lazily, inside the functions.
"""
from __future__ import annotations

import copy
import os
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from ..assets.resolve import offline
from .ranks import lm_class
from .results import format_table, summarise

__all__ = ["PAPER_TASKS", "SOURCES", "FEWSHOT_SEED", "resolve_source", "task_manager", "load_tasks",
           "run_zero_shot", "format_table"]

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
SOURCES = ("auto", "embedded", "hub")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed (simple_evaluate / CLI)


def resolve_source(source: str = "auto") -> str:
    """``"embedded"`` or ``"hub"``; ``"auto"`` is embedded when the hub is switched off by env."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source != "auto":
        return source
    return "embedded" if offline("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") else "hub"


def _is_path(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) or os.sep in task


@contextmanager
def task_manager(tasks: Sequence[str], source: str = "auto") -> Iterator[object]:
    """An lm-eval ``TaskManager`` that resolves ``tasks`` for ``source`` (kept alive as a context).

    ``tasks`` are task names, or paths to task YAML files (any source).
    """
    from lm_eval.tasks import TaskManager

    source = resolve_source(source)
    names = [t for t in tasks if not _is_path(t)]
    if source == "hub":
        # indexing every stock task costs ~9 s: skip it when only YAML paths are asked for
        yield TaskManager(include_defaults=bool(names))
        return
    from . import tasks as embedded

    unknown = [t for t in names if t not in embedded.STOCK_YAML]
    if unknown:
        raise ValueError(
            f"no embedded data for {unknown}; embedded tasks: {', '.join(embedded.TASKS)} "
            "(use source='hub' for other tasks, or pass the path of a task YAML)"
        )
    with tempfile.TemporaryDirectory(prefix="wanda_pl_tasks.") as tmp:
        include = embedded.write_task_configs(tmp, names) if names else None
        # include_defaults=False: our YAMLs keep the stock names, and indexing every stock task costs ~9 s
        yield TaskManager(include_path=str(include) if include else None, include_defaults=False)


def load_tasks(tasks: Sequence[str], source: str = "auto") -> dict:
    """lm-eval's ``{"tasks": {name: Task}, "groups": ...}`` for ``tasks`` from ``source``."""
    with task_manager(tasks, source) as tm:
        return tm.load(list(tasks))


def _unwrap(model):
    # DistributedDataParallel / FSDP-style wrappers keep the HF model in `.module`
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


# ----------------------------------------------------------------------------- evaluation
def run_zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str] = PAPER_TASKS,
    source: str = "auto",
    limit: Optional[int] = None,
    batch_size: int = 1,
    num_fewshot: int = 0,
    device=None,
    rank: int = 0,
    world_size: int = 1,
    max_length: Optional[int] = None,
    log_samples: bool = False,
) -> dict:
    """Zero-shot accuracies of the in-memory ``model`` (a Hugging Face causal LM) on ``tasks``.

    Args:
        model: the HF model (e.g. ``LlamaForCausalLM``), pruned or not; a DDP wrapper is unwrapped.
            It is evaluated as it is (no copy) in eval mode; its train/eval mode is restored after.
        tokenizer: its tokenizer (a copy is used when it has no pad token, as lm-eval sets one).
        tasks: lm-eval task names (or paths of task YAML files).
        source: ``"embedded"``, ``"hub"`` or ``"auto"`` (see the module docstring).
        limit: score only the first ``limit`` documents of each task (``None``: all).
        batch_size: lm-eval's batch size (1 is exact; larger batches pad and are faster).
        num_fewshot: 0 for the paper. On ``"embedded"`` few-shot examples come from the validation
            split (there is no train split offline).
        device: run on this device (the model is moved there and back); ``None``: where it is.
        rank, world_size: this process and the number of processes of an initialised
            ``torch.distributed`` group; call on every rank. Every rank returns the full result.
        max_length: context length for lm-eval (``None``: from the model config).
        log_samples: also return per-document results under ``"samples"``.

    Returns:
        ``{"tasks": {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "version", "n"}},
        "mean_acc", "mean_acc_norm", "lm_eval_version", "limit", "num_fewshot", "source",
        "world_size"}``; accuracies are fractions in [0, 1]; ``acc_norm`` is ``None`` for tasks
        that do not define it (boolq, rte, winogrande), and ``mean_acc_norm`` uses ``acc`` there.
        ``mean_acc`` (the plain mean of ``acc`` over tasks) is the paper's "Mean" column.
    """
    import torch
    from importlib.metadata import version as pkg_version
    from lm_eval import evaluator

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if world_size > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"world_size={world_size} needs an initialised torch.distributed process group")
        if (dist.get_world_size(), dist.get_rank()) != (world_size, rank):
            raise ValueError(
                f"rank/world_size {rank}/{world_size} do not match the process group "
                f"({dist.get_rank()}/{dist.get_world_size()})"
            )
    source = resolve_source(source)
    model = _unwrap(model)
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer = copy.deepcopy(tokenizer)

    was_training = model.training
    home_device = next(model.parameters()).device
    target = torch.device(device) if device is not None else home_device
    if target.type == home_device.type and target.index is None:
        target = home_device  # "cuda" means the model's current cuda device
    try:
        if target != home_device:
            model.to(target)
        lm = lm_class()(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            rank=rank,
            world_size=world_size,
        )
        with task_manager(tasks, source) as tm:
            loaded = tm.load(tasks)
            for task_obj in loaded["tasks"].values():  # as lm_eval.simple_evaluate does
                if num_fewshot is not None:
                    if task_obj.get_config("num_fewshot") != 0:
                        task_obj.set_config(key="num_fewshot", value=num_fewshot)
                elif task_obj.get_config("num_fewshot") is None:
                    task_obj.set_config(key="num_fewshot", value=0)
                task_obj.set_fewshot_seed(seed=FEWSHOT_SEED)
            raw = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=log_samples)
    finally:
        model.train(was_training)
        if target != home_device:
            model.to(home_device)

    out = None
    if rank == 0:
        out = summarise(raw, log_samples)
        out.update(
            lm_eval_version=pkg_version("lm_eval"),
            limit=limit,
            num_fewshot=num_fewshot,
            source=source,
            world_size=world_size,
        )
    if world_size > 1:
        import torch.distributed as dist

        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    return out
