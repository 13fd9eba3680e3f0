"""lm-eval's ``HFLM`` on an in-memory model, sharded over an existing ``torch.distributed`` group.

Lightning (DDP, FSDP) has already started the process group; lm-eval would start its own through
``accelerate``. So the few collectives lm-eval's evaluator calls are answered with
``torch.distributed`` here, and the per-rank documents are put back in one-process order, so that
any number of ranks gives the one-process result.
"""
from __future__ import annotations

_LM_CLASS = None


def lm_class():
    """``HFLM`` with rank / world size taken from an existing torch.distributed group (built lazily)."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    import torch
    import torch.distributed as dist
    from lm_eval.models.huggingface import HFLM

    class DistributedHFLM(HFLM):
        """HFLM on an in-memory model; with ``world_size > 1`` it shards lm-eval's requests over an
        already initialised ``torch.distributed`` group instead of ``accelerate``.

        lm-eval's evaluator only talks to the ranks through ``rank``, ``world_size``,
        ``all_gather``, ``gather_object`` and ``barrier``: those are implemented here with
        ``torch.distributed`` (HFLM's own versions call ``self.accelerator``, which an in-memory
        model does not get).
        """

        def __init__(self, *args, rank: int = 0, world_size: int = 1, **kwargs):
            super().__init__(*args, **kwargs)
            self._rank = int(rank)
            self._world_size = int(world_size)

        def _collective_device(self, tensor):
            # gloo needs CPU tensors, nccl CUDA ones
            return torch.device("cpu") if dist.get_backend() == "gloo" else tensor.device

        def all_gather(self, tensor):
            if self.world_size <= 1:
                return tensor
            t = (tensor.reshape(1) if tensor.ndim == 0 else tensor).contiguous()
            t = t.to(self._collective_device(t))
            parts = [torch.empty_like(t) for _ in range(self.world_size)]
            dist.all_gather(parts, t)
            return torch.cat(parts)

        def gather_object(self, obj, dst=0):
            if self.world_size <= 1:
                return [obj]
            result = [None] * self.world_size if self.rank == dst else None
            dist.gather_object(obj, result, dst=dst)
            if self.rank != dst:
                return result
            # the evaluator chains the per-rank lists rank after rank; lm-eval shards documents
            # round-robin (rank r holds docs r, r + W, ...): interleave them back into the one-process
            # order, so that per-sample lists and float sums come out exactly as with one process.
            return [interleave(result)] + [_emptied(r) for r in result[1:]]

        def barrier(self):
            if self.world_size > 1:
                dist.barrier()

    _LM_CLASS = DistributedHFLM
    return _LM_CLASS


def interleave(per_rank: list):
    """Merge per-rank ``{task: [docs]}`` / ``{task: {key: [docs]}}`` into round-robin order."""
    first = per_rank[0]
    if isinstance(first, dict):
        return {k: interleave([r[k] for r in per_rank]) for k in first}
    if isinstance(first, list):
        world = len(per_rank)
        total = sum(len(r) for r in per_rank)
        if any(len(r) != len(range(i, total, world)) for i, r in enumerate(per_rank)):
            return [x for r in per_rank for x in r]  # not a round-robin shard: plain concatenation
        out = [None] * total
        for i, r in enumerate(per_rank):
            out[i::world] = r
        return out
    raise TypeError(f"cannot merge per-rank results of type {type(first).__name__}")


def _emptied(obj):
    if isinstance(obj, dict):
        return {k: _emptied(v) for k, v in obj.items()}
    return []
