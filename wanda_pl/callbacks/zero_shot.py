"""Zero-shot Callback: lm-eval accuracy of the in-memory model at the end of each validation.

Runs on every rank (requests are split between ranks and gathered) and keeps the result of the
last validation as its own ``result``, which the commands read beside the module's metrics
(``prune`` reports dense vs pruned). Off unless ``enabled``: seven tasks take a while on a CPU
(use ``limit``)."""
from __future__ import annotations

from typing import List, Optional

from lightning.pytorch.callbacks import Callback


class ZeroShot(Callback):
    """Args:
        enabled: run the zero-shot evaluation in every validation.
        tasks: lm-eval task names (unset: the paper's seven: boolq rte hellaswag winogrande arc_easy arc_challenge openbookqa).
        limit: documents per task (unset: all).
        batch_size: lm-eval batch size.
        num_fewshot: 0 as the paper.
        source: ``embedded`` (offline copies), ``hub``, or ``auto`` (embedded when HF_HUB_OFFLINE is set).
    """

    def __init__(
        self,
        enabled: bool = False,
        tasks: Optional[List[str]] = None,
        limit: Optional[int] = None,
        batch_size: int = 1,
        num_fewshot: int = 0,
        source: str = "auto",
    ) -> None:
        from ..eval.zero_shot import PAPER_TASKS, SOURCES

        if source not in SOURCES:
            raise ValueError(f"zero_shot.source must be one of {SOURCES}, got {source!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"zero_shot.limit must be >= 1 or unset, got {limit}")
        if batch_size < 1 or num_fewshot < 0:
            raise ValueError(f"zero_shot.batch_size must be >= 1 and num_fewshot >= 0, got {batch_size}, {num_fewshot}")
        self.enabled = enabled
        self.tasks = list(tasks) if tasks else list(PAPER_TASKS)
        self.limit, self.batch_size, self.num_fewshot, self.source = limit, batch_size, num_fewshot, source
        self.result: Optional[dict] = None  # of the last validation run (None: not run)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.enabled:  # before the dense baseline, not after it
            from ..core.onload import refuse_offloaded

            refuse_offloaded("zero-shot evaluation", getattr(pl_module.hparams, "offload", "none"))

    def on_validation_start(self, trainer, pl_module) -> None:
        self.result = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        from ..eval.results import ZERO_SHOT_MEAN_ACC
        from ..eval.zero_shot import run_zero_shot

        result = run_zero_shot(
            pl_module.model, pl_module.tokenizer, self.tasks, self.source, self.limit, self.batch_size,
            self.num_fewshot, rank=trainer.global_rank, world_size=trainer.world_size,
        )
        self.result = result
        pl_module.log(ZERO_SHOT_MEAN_ACC.name, float(result["mean_acc"]), rank_zero_only=False, sync_dist=False)
