"""``fit --distill.*``: the sparse model learns from a frozen teacher as well as from the next token.

The teacher is the model as loaded, before any pruning (``dense``), or another causal LM with the
same tokenizer (a name, folder or hub id). It is kept before the Pruning callback applies the masks,
outside the LightningModule (never saved, never in the optimizer), frozen and in eval mode; its forward
runs under ``no_grad`` on the student's batch. With ``cache`` its top-k logits over the training
windows are computed once, written atomically and reused (refused for another teacher, other windows
or another k); then no teacher is in memory while training. The losses: :mod:`wanda_pl.training.distill`.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch

from ..errors import UserError
from ..eval.perplexity import window_nll
from ..families.hf_causal import DTYPES, load_causal_lm, named_blocks
from ..training.distill import (LOSSES, BlockOutputs, Teacher, TopKCache, feature_loss, fingerprint, kl, kl_top_k,
                                moments, teacher_id, variance_of)

log = logging.getLogger(__name__)


def reduce_all(pl_module, values: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """``values`` (detached) averaged (or summed) over the data-parallel ranks (one process: as they are)."""
    strategy = getattr(getattr(pl_module, "trainer", None), "strategy", None)
    return values.detach() if strategy is None else strategy.reduce(values.detach(), reduce_op=op)


class Distillation(L.Callback):
    """Distillation while fine-tuning (the ``distill`` section of ``fit``).

    Args:
        teacher: ``none`` (off: the next-token loss alone), ``dense`` (the model as loaded, before
            pruning), or a model name / folder / hub id with the student's tokenizer.
        loss: ``kl`` (KL divergence of the token distributions at ``temperature``) or ``squarehead``
            (``kl`` plus, for every decoder block, the MSE of the student's output hidden states against
            the teacher's divided by the variance of the teacher's, averaged over blocks).
        weight: share of the distillation loss, in [0, 1]: loss = (1 - weight) * next-token + weight * distillation.
        temperature: softmax temperature of ``kl`` (> 0); the loss is scaled by its square.
        teacher_dtype: the teacher's weights dtype (float32 | bfloat16 | float16; None: the model's).
        cache: a folder for the teacher's top-k logits over the training windows (``kl`` only): built once,
            reused while teacher, windows and ``top_k`` are the same, refused otherwise.
        top_k: logits per token kept in the cache.
    """

    def __init__(self, teacher: str = "none", loss: str = "kl", weight: float = 0.5, temperature: float = 1.0,
                 teacher_dtype: Optional[str] = None, cache: Optional[str] = None, top_k: int = 64) -> None:
        if loss not in LOSSES:
            raise ValueError(f"distill.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if not (isinstance(weight, (int, float)) and 0 <= weight <= 1):
            raise ValueError(f"distill.weight must be in [0, 1], got {weight!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"distill.temperature must be > 0, got {temperature!r}")
        if teacher_dtype is not None and teacher_dtype not in DTYPES:
            raise ValueError(f"distill.teacher_dtype must be one of {', '.join(DTYPES)}, got {teacher_dtype!r}")
        if not (isinstance(top_k, int) and top_k >= 1):
            raise ValueError(f"distill.top_k must be an integer >= 1, got {top_k!r}")
        if cache is not None and loss == "squarehead":
            raise ValueError("distill.cache keeps the teacher's logits only; distill.loss squarehead needs its block "
                             "outputs at every step: use distill.loss kl with a cache, or no cache")
        self.source, self.loss, self.weight, self.temperature = teacher, loss, float(weight), float(temperature)
        self.teacher_dtype, self.cache_dir, self.top_k = teacher_dtype, cache, top_k
        self.teacher: Optional[Teacher] = None
        self.cache: Optional[TopKCache] = None
        self.history: Dict[str, List[Any]] = {}
        self.tokens_seen = 0

    @property
    def enabled(self) -> bool:
        return self.source != "none"

    # --- before any work ---
    def prepare(self, pl_module, datamodule, build_cache: bool = True) -> None:
        """Check everything and keep the teacher (before the masks are applied: call before pruning).
        With a cache: build it (``build_cache``: this process writes it) or load it; then no teacher."""
        if not self.enabled or self.teacher is not None or self.cache is not None:
            return
        hp = pl_module.hparams
        if hp.get("offload", "none") != "none":
            raise UserError(f"distillation runs the whole teacher and student forward on each batch, and "
                            f"model.offload={hp.offload} holds one block at a time: use model.offload none")
        dtype = self.teacher_dtype or hp.get("dtype", "float32")
        if self.source == "dense":
            model, path = copy.deepcopy(pl_module.model).to(DTYPES[dtype]), pl_module.path
        else:
            model, path = self._load(pl_module, dtype)
        self.teacher = Teacher(model, [b for _, b in named_blocks(model)], self.source)
        if self.cache_dir is not None:
            windows = datamodule.train_ids()
            want = fingerprint(teacher_id(self.source, path, dtype), windows, self.top_k)
            self.cache = TopKCache.load(Path(self.cache_dir), want, windows)
            if self.cache is None:
                if not build_cache:
                    raise UserError(f"distill.cache {self.cache_dir!r} holds no cache yet: build it in one process")
                device = pl_module.device if pl_module.device.type != "meta" else "cpu"
                self.teacher.model.to(device)
                built = TopKCache.build(self.teacher, windows, self.top_k, device, datamodule.batch_size)
                built.save(Path(self.cache_dir), want)
                self.cache = built
            self.teacher = None  # trains from the cache alone

    def _load(self, pl_module, dtype: str):
        model, tokenizer, path = load_causal_lm(self.source, dtype, pl_module.hparams.get("trust_remote_code", False))
        student = pl_module.model
        if tokenizer.get_vocab() != pl_module.tokenizer.get_vocab() or \
                model.get_output_embeddings().weight.shape[0] != student.get_output_embeddings().weight.shape[0]:
            raise UserError(f"distill.teacher {self.source!r} has another vocabulary or tokenizer than the student "
                            f"({model.get_output_embeddings().weight.shape[0]} vs "
                            f"{student.get_output_embeddings().weight.shape[0]} logits): they must be the same")
        if self.loss == "squarehead":
            ours, theirs = named_blocks(student), named_blocks(model)
            size = (len(theirs), model.config.hidden_size) != (len(ours), student.config.hidden_size)
            if size:
                raise UserError(f"distill.loss squarehead compares every block's output: the teacher has "
                                f"{len(theirs)} blocks of width {model.config.hidden_size}, the student "
                                f"{len(ours)} of width {student.config.hidden_size}; use distill.loss kl")
        return model, path

    # --- Lightning hooks ---
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.enabled:
            self.prepare(pl_module, trainer.datamodule, build_cache=trainer.is_global_zero)
            pl_module.distill = self

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.teacher is None:
            return
        self.teacher.model.to(pl_module.device)
        from lightning.pytorch.strategies import ModelParallelStrategy

        if isinstance(trainer.strategy, ModelParallelStrategy):  # sharded like the student
            from torch.distributed.fsdp import fully_shard

            mesh = pl_module.device_mesh["data_parallel"]
            for block in self.teacher.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.teacher.model, mesh=mesh)

    # --- the loss of one training step ---
    def step(self, pl_module, ids: torch.Tensor) -> torch.Tensor:
        """(1 - w) * next-token + w * distillation on ``ids``; every part logged and kept for the report."""
        features = self.loss == "squarehead"
        blocks = [b for _, b in named_blocks(pl_module.model)] if features else []
        with BlockOutputs(blocks) as student_out:
            logits = pl_module(ids)
        parts = {"next_token": window_nll(logits, ids).mean()}
        if self.cache is not None:
            values, indices = self.cache.lookup(ids)
            parts["kl"] = kl_top_k(logits, values, indices, self.temperature)
        else:
            teacher_logits, teacher_out = self.teacher(ids, features)
            parts["kl"] = kl(logits, teacher_logits, self.temperature)
            if features:
                # each block's teacher variance over the whole batch (all ranks): the loss of one process
                total_moments = reduce_all(pl_module, torch.stack([moments(t) for t in teacher_out]), "sum")
                per_block = [feature_loss(s, t, variance_of(m).to(t.device))
                             for s, t, m in zip(student_out, teacher_out, total_moments)]
                parts["feature"] = torch.stack(per_block).mean()
                self._keep("feature_per_block", [float(x) for x in reduce_all(pl_module, torch.stack(per_block))])
        distill = parts["kl"] + parts.get("feature", 0.0)
        total = (1 - self.weight) * parts["next_token"] + self.weight * distill
        for name, value in {**parts, "distill": distill}.items():
            pl_module.log(f"train_{name}", value, prog_bar=False, sync_dist=True)
            self._keep(name, float(reduce_all(pl_module, value)))  # the mean over ranks: the curve of the whole batch
        self.tokens_seen += ids.numel() * pl_module.trainer.world_size
        return total

    def state_dict(self) -> Dict[str, Any]:  # in Lightning checkpoints: a resumed fit counts on
        return {"tokens_seen": self.tokens_seen, "history": self.history}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.tokens_seen, self.history = state["tokens_seen"], state["history"]

    def _keep(self, name: str, value) -> None:
        self.history.setdefault(name, []).append(value)

    def describe(self) -> Dict[str, Any]:
        """For the report: the settings, the teacher, the cache's fingerprint, losses first and last."""
        if not self.enabled:
            return {"teacher": "none"}
        cache = None if self.cache is None else {"folder": str(self.cache_dir), **self.cache.meta}
        return {"teacher": self.source, "teacher_dtype": self.teacher_dtype or "as the model", "loss": self.loss,
                "weight": self.weight, "temperature": self.temperature, "cache": cache,
                "tokens_seen": self.tokens_seen,
                "losses": {k: {"first": v[0], "last": v[-1]} for k, v in self.history.items() if v}}

