"""Distillation from the dense model while fine-tuning the sparse one: the losses, the teacher, the cache.

The losses are small functions on tensors, each beside its definition:

* :func:`kl`: KL(teacher || student) of the token distributions at temperature ``T``, mean over
  tokens, times ``T^2`` (Hinton et al. 2015: the gradients keep their size as ``T`` changes);
* :func:`kl_top_k`: the same against a teacher truncated to its ``k`` largest logits (renormalised
  over them): what a cache of top-k logits can give; equal to :func:`kl` when ``k`` is the vocabulary;
* :func:`feature_loss`: SquareHead's per-block term (Kurtic et al. 2023), the mean squared error of
  the student's block output against the teacher's, divided by the variance of the teacher's.

:class:`Teacher` runs a frozen model under ``no_grad`` and gives its logits and block outputs;
:class:`TopKCache` holds its top-k logits over the training windows, fingerprinted so that a cache
is never used for another teacher, other tokens or another ``k``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

LOSSES = ("kl", "squarehead")


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student) at ``temperature``, mean over tokens, times temperature^2 (fp32)."""
    t = temperature
    s = F.log_softmax(student_logits.float().flatten(0, -2) / t, dim=-1)
    p = F.log_softmax(teacher_logits.float().flatten(0, -2) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def kl_top_k(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """:func:`kl` against a teacher known by its top-k logits ``values`` at ``indices`` (..., k): its
    distribution is the softmax over those k alone; the student's is over the whole vocabulary."""
    t = temperature
    s = F.log_softmax(student_logits.float().flatten(0, -2) / t, dim=-1)
    idx = indices.long().flatten(0, -2)
    p = F.log_softmax(values.float().flatten(0, -2) / t, dim=-1)
    per_token = (p.exp() * (p - s.gather(-1, idx))).sum(-1)
    return per_token.mean() * t * t


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, variance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SquareHead's term for one block: MSE(student, teacher) / Var(teacher) (fp32; the teacher's
    variance over all its elements, or ``variance`` when given: the whole batch's under data
    parallelism; floored so that a constant output cannot divide by zero)."""
    teacher = teacher.float()
    variance = teacher.var(unbiased=False) if variance is None else variance
    return F.mse_loss(student.float(), teacher) / variance.clamp_min(1e-12)


def moments(x: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of ``x`` in fp64: summed over ranks, they give the whole batch's variance."""
    x = x.detach().double()
    return torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum(), (x * x).sum()])


def variance_of(m: torch.Tensor) -> torch.Tensor:
    n, s, ss = m
    return (ss / n - (s / n) ** 2).float()


class BlockOutputs:
    """Records the output hidden states of the given blocks on every forward while active."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks, self.outputs, self.handles = list(blocks), [], []

    def __enter__(self) -> List[torch.Tensor]:
        self.outputs = []

        def record(_module, _args, output):
            self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

        self.handles = [b.register_forward_hook(record) for b in self.blocks]
        return self.outputs

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class Teacher:
    """A frozen causal LM: eval mode, no gradient, never in an optimizer (held outside the module)."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], source: str) -> None:
        self.model, self.blocks, self.source = model.eval().requires_grad_(False), list(blocks), source

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, features: bool = False):
        """(logits, [block outputs] or None) on ``ids``."""
        self.model.eval()
        if not features:
            return self.model(input_ids=ids, use_cache=False).logits, None
        with BlockOutputs(self.blocks) as outputs:
            logits = self.model(input_ids=ids, use_cache=False).logits
        return logits, list(outputs)


def fingerprint(teacher: Dict[str, object], windows: torch.Tensor, k: int) -> Dict[str, object]:
    """What a cache was built for: the teacher (``teacher``: its name, dtype, files' digest), the
    token windows (sha256 of the ids) and k."""
    digest = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {**teacher, "tokens_sha256": digest, "windows": list(windows.shape), "k": int(k)}


def teacher_id(source: str, path: str, dtype: str) -> Dict[str, object]:
    """A teacher by its content: the digest of every file of its folder (:mod:`wanda_pl.assets.fingerprint`),
    so a folder re-downloaded with other weights is another teacher."""
    from ..assets.fingerprint import model_files

    files = {name: record["digest"] for name, record in model_files(path).items()}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    return {"teacher": source, "teacher_dtype": dtype, "teacher_files": digest}


class TopKCache:
    """The teacher's top-k logits (fp16 values, int32 indices) for every training window, looked up by
    the window's token ids. Files: ``meta.json`` (the fingerprint) and ``top_k.pt``, in ``folder``."""

    META, DATA = "meta.json", "top_k.pt"

    def __init__(self, meta: Dict[str, object], values: torch.Tensor, indices: torch.Tensor,
                 windows: torch.Tensor) -> None:
        self.meta, self.values, self.indices = meta, values, indices
        self._row = {self._key(w): i for i, w in enumerate(windows)}

    @staticmethod
    def _key(window: torch.Tensor) -> bytes:
        return window.to(torch.int64).cpu().contiguous().numpy().tobytes()

    def lookup(self, ids: torch.Tensor):
        """(values, indices) of a batch of windows (batch, seqlen, k), on ``ids``' device."""
        try:
            rows = [self._row[self._key(w)] for w in ids]
        except KeyError:
            raise UserError("a training window is not in the distillation cache (it was built for other "
                            "training windows)") from None
        return self.values[rows].to(ids.device), self.indices[rows].to(ids.device)

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: Teacher, windows: torch.Tensor, k: int, device, batch_size: int = 1,
              progress: bool = True) -> "TopKCache":
        from tqdm.auto import tqdm

        values, indices = [], []
        for batch in tqdm(windows.split(batch_size), desc="distillation cache", disable=not progress):
            logits, _ = teacher(batch.to(device))
            top = logits.float().topk(k, dim=-1)
            values.append(top.values.to(torch.float16).cpu())
            indices.append(top.indices.to(torch.int32).cpu())
        return cls({}, torch.cat(values), torch.cat(indices), windows)

    def save(self, folder: Path, meta: Dict[str, object]) -> None:
        """Written atomically: a folder with both files appears whole, or not at all."""
        import os
        import tempfile

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        torch.save({"values": self.values, "indices": self.indices}, tmp / self.DATA)
        (tmp / self.META).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, folder)
        self.meta = meta

    @classmethod
    def load(cls, folder: Path, want: Dict[str, object], windows: torch.Tensor) -> Optional["TopKCache"]:
        """The cache in ``folder`` (None when there is none), refused by name if built for other settings."""
        folder = Path(folder)
        if not (folder / cls.META).is_file():
            if folder.exists() and any(folder.iterdir()):
                raise UserError(f"distill.cache {str(folder)!r} exists and is not a distillation cache (no "
                                f"{cls.META}); give an empty or new folder")
            return None
        meta = json.loads((folder / cls.META).read_text())
        differ = [f"{key} {meta.get(key)!r} (now {want[key]!r})" for key in want if meta.get(key) != want[key]]
        if differ:
            raise UserError(f"distill.cache {str(folder)!r} was built for other settings: {'; '.join(differ)}; "
                            f"give another folder or delete this one")
        data = torch.load(folder / cls.DATA, weights_only=True)
        return cls(meta, data["values"], data["indices"], windows)
