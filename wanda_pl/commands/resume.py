"""Resumable pruning: per-block checkpoints in a staging folder next to ``output_dir``.

After each block is final, rank 0 writes its weights (not for ``offload: disk``, whose pruned
blocks are already shards in the same folder) and masks, and every rank writes the activations
entering the next block and then its progress, each file atomically. ``--resume true`` restarts
after the last block every rank finished, with bit-identical results; a resume with other
settings, or after the model's files changed on disk (:mod:`wanda_pl.assets.fingerprint`), is refused, naming
what differs. Without ``--resume`` a staging folder left by a killed run is reported and
replaced, never reused; a finished run deletes its own."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..core.engine import PruneResult
from ..core.hooks import BlockInput
from ..errors import UserError
from ..assets.fingerprint import changed_files, model_files

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
MODEL_FILES = "model_files"  # the settings' record of what the model's files are (not just their path)
KEEP = 2  # generations of activations kept: under DDP the ranks may be one block apart when killed


def staging_folder(output_dir) -> Path:
    out = Path(os.path.abspath(Path(output_dir).expanduser()))
    return out.parent / f".{out.name}.wanda_pl-resume"


def ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _ours(folder: Path) -> Dict[str, Any]:
    try:
        data = json.loads((folder / FINGERPRINT).read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("written_by") != "wanda_pl":
        raise UserError(f"{str(folder)!r} is in the way of this run's staging folder and was not written by wanda_pl "
                        f"(no valid {FINGERPRINT}); move it away or choose another output_dir")
    return data["settings"]


class BlockCheckpoints:
    """The engine's checkpoint interface (:class:`wanda_pl.core.engine.NoCheckpoints`) on a folder."""

    def __init__(self, folder: Path, settings: Dict[str, Any], resume: bool, rank: int, world: int,
                 reuse_written: Optional[Callable[[str], None]] = None) -> None:
        """``reuse_written(block name)``: where blocks are written out as they are pruned (offload disk),
        tells the model to read a finished block from what it wrote; the weights are not saved here."""
        self.folder, self.settings, self.resume = Path(folder), settings, resume
        self.rank, self.world, self.reuse_written = rank, world, reuse_written
        self.save_weights = reuse_written is None
        self.keep_masks = reuse_written is None  # offload disk: masks stay in the per-block files

    # --- before any work ---
    def check(self) -> None:
        """``--resume`` needs a folder of ours with the same settings; without it, a folder of ours is stale."""
        if self.resume:
            if not self.folder.is_dir():
                raise UserError(f"--resume true: there is no staging folder {str(self.folder)!r} to resume from "
                                f"(no run with this output_dir was interrupted, or it finished); run without --resume")
            saved = _ours(self.folder)
            changed = changed_files(saved.get(MODEL_FILES) or {}, self.settings.get(MODEL_FILES) or {})
            if changed:
                where = self.settings.get("model", {}).get("model_path")
                raise UserError(f"--resume true, but the model in {where!r} changed since the interrupted run: "
                                + ", ".join(changed) + "; the finished blocks came from the earlier files, so "
                                "rerun without --resume to start over on these")
            differ = [f"{k}: {saved.get(k)!r} then, {self.settings.get(k)!r} now"
                      for k in sorted(set(saved) | set(self.settings)) if saved.get(k) != self.settings.get(k)]
            if differ:
                raise UserError("--resume true with other settings than the interrupted run's; they differ in\n  "
                                + "\n  ".join(differ) + "\nrerun with the same settings, or without --resume to start over")
        elif self.folder.exists():
            _ours(self.folder)  # refuses a folder that is not ours

    def open(self, disk=None) -> None:
        """Without ``--resume``, replace a stale staging folder (rank 0 only changes it); created when
        the first block's plan is saved, so a run failing before pruning leaves none. ``disk`` (offload
        disk) writes its pruned blocks into the folder's ``model/``."""
        if self.rank == 0 and not self.resume and self.folder.exists():
            print(f"replacing the staging folder {self.folder} of an earlier, interrupted run "
                  f"(use --resume true to continue it instead)", flush=True)
            shutil.rmtree(self.folder)
        if disk is not None:
            disk.write_to(self.folder / "model")

    def _create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / FINGERPRINT).is_file():
            _atomic(self.folder / FINGERPRINT, lambda p: p.write_text(json.dumps(
                {"written_by": "wanda_pl", "settings": self.settings}, indent=2, default=str) + "\n"))

    def abandon(self) -> None:
        """The run failed: keep what can be resumed, delete a folder with no finished block in it."""
        if self.rank != 0 or not self.folder.is_dir():
            return
        if self._done() > 0:
            print(f"the finished blocks are kept in {self.folder}: rerun the same command with --resume true "
                  f"to continue after block {self._done() - 1}", flush=True)
        else:
            shutil.rmtree(self.folder)

    def close(self) -> None:
        """The run finished and its output is committed: the staging folder is no longer needed."""
        if self.rank == 0 and self.folder.is_dir():
            shutil.rmtree(self.folder)

    # --- the engine's interface ---
    def plan(self, compute: Callable[[], Dict]) -> Dict:
        """The plan the interrupted run computed (OWL's comes from a dense pass no longer possible once
        blocks are pruned), else ``compute()``, saved."""
        path = self.folder / "plan.pt"
        if self.resume and path.is_file():
            return torch.load(path, weights_only=False)
        plan = compute()
        if self.rank == 0:
            self._create()
            _atomic(path, lambda p: torch.save(plan, p))
        return plan

    def _done(self) -> int:
        """Blocks every rank finished."""
        done = []
        for r in range(self.world):
            try:
                done.append(int(json.loads((self.folder / f"progress.rank{r}.json").read_text())["done"]))
            except (OSError, ValueError, KeyError):
                done.append(-1)
        return min(done) + 1

    def restore(self, blocks: List[Tuple[str, nn.Module]], inputs: List[BlockInput],
                recut=None) -> Tuple[int, PruneResult]:
        done = PruneResult()
        start = self._done() if self.resume else 0
        if start == 0:
            if self.rank == 0:  # before any collective: other ranks write into it after the first block
                self._create()
            return 0, done
        for k in range(start):
            name, block = blocks[k]
            saved = torch.load(self.folder / f"masks-{k:05d}.pt", weights_only=False)
            if saved.get("structure") is not None:  # a structured pass's block: its shapes first
                recut(name, block, saved["structure"])
                done.structure.setdefault("blocks", {})[name] = saved["structure"]
            if self.save_weights:
                if saved.get("weights", True):  # (False: the block was only measured, its weights untouched)
                    from safetensors.torch import load_file

                    state = load_file(str(self.folder / f"block-{k:05d}.safetensors"))
                    with torch.no_grad():
                        for key, t in block.state_dict().items():
                            t.copy_(state[key])
            else:
                self.reuse_written(name)
            if self.keep_masks:
                done.masks.update(saved["masks"])
            done.plan.update(saved["plan"])
            done.permutations.update(saved.get("permutations", {}))
            done.tokens.update(saved.get("tokens", {}))
            done.rare.update(saved.get("rare", {}))
            done.reconstruction.update(saved.get("reconstruction", {}))
        hidden = torch.load(self.folder / f"inputs-{start - 1:05d}.rank{self.rank}.pt", weights_only=True)
        if len(hidden) != len(inputs):
            raise UserError(f"--resume: the staging folder holds {len(hidden)} calibration batches for rank "
                            f"{self.rank}, this run has {len(inputs)}")
        for inp, h in zip(inputs, hidden):
            inp.hidden = h
        print(f"resuming after block {start - 1} ({blocks[start - 1][0]}): {start} of {len(blocks)} blocks restored "
              f"from {self.folder}", flush=True)
        return start, done

    def write_masks(self, folder, n_blocks: int) -> None:
        """Every block's masks as one file per block in ``folder`` (``load_masks`` reads them as one set)."""
        from ..training.masks import save_mask_shard

        for k in range(n_blocks):
            saved = torch.load(self.folder / f"masks-{k:05d}.pt", weights_only=False)
            save_mask_shard(saved["masks"], folder, k, n_blocks)

    def save(self, index: int, name: str, block: nn.Module, inputs: List[BlockInput], result: PruneResult,
             weights: bool = True) -> None:
        """``weights`` False: the block is as it was loaded (a depth pass only measures it), so a
        resumed run need not take its weights back (a 70B's blocks are not written twice)."""
        names = [n for n in result.masks if n.startswith(name + ".")]
        if self.rank == 0:
            if self.save_weights and weights:
                from safetensors.torch import save_file

                state = {k: t.detach().cpu().contiguous() for k, t in block.state_dict().items()}
                _atomic(self.folder / f"block-{index:05d}.safetensors", lambda p: save_file(state, str(p)))
            masks = {"masks": {n: result.masks[n] for n in names}, "plan": {n: result.plan[n] for n in names},
                     "permutations": {n: result.permutations[n] for n in names if n in result.permutations},
                     "tokens": {n: result.tokens[n] for n in names if n in result.tokens},
                     "rare": {n: result.rare[n] for n in names if n in result.rare},
                     "reconstruction": {n: v for n, v in result.reconstruction.items() if n == name or
                                        n.startswith(name + ".")},
                     "structure": (result.structure or {}).get("blocks", {}).get(name),
                     "weights": bool(self.save_weights and weights)}
            _atomic(self.folder / f"masks-{index:05d}.pt", lambda p: torch.save(masks, p))
        hidden = [inp.hidden for inp in inputs]
        _atomic(self.folder / f"inputs-{index:05d}.rank{self.rank}.pt", lambda p: torch.save(hidden, p))
        _atomic(self.folder / f"progress.rank{self.rank}.json", lambda p: p.write_text(json.dumps({"done": index})))
        old = self.folder / f"inputs-{index - KEEP:05d}.rank{self.rank}.pt"
        if old.exists():
            old.unlink()


def checkpoints_for(trainer, model, datamodule, pruning_settings, output_dir, resume: bool) -> BlockCheckpoints:
    """The checkpoints of one prune run, checked before any work (a bad ``--resume`` fails here)."""
    from ..callbacks import Calibration
    from ..callbacks.lookup import find_callback

    calib = find_callback(trainer, Calibration) or Calibration()
    ids = datamodule.calibration_data() if pruning_settings.needs_activations else None
    hp = getattr(model, "hparams", {})
    settings = {
        "model": model.describe(), "method": pruning_settings.describe(), "devices": trainer.world_size,
        "calibration_ids": None if ids is None else ids_digest(ids), "calibration_batch_size": calib.batch_size,
        "propagate": calib.propagate, "targets": hp.get("targets"), "ignore": hp.get("ignore"),
        MODEL_FILES: model_files(model.path),
    }
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from the file
    disk = getattr(model, "disk", None)
    ckpt = BlockCheckpoints(staging_folder(output_dir), settings, resume, trainer.global_rank, trainer.world_size,
                            None if disk is None else disk.reuse_written)
    ckpt.check()
    return ckpt
