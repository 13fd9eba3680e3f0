"""LightningModule around a Hugging Face causal LM: perplexity validation, fine-tuning loss."""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..families.hf_causal import find_blocks
from ..core.layers import select_targets
from ..core.hooks import BlockInput, capture_inputs
from ..hub import EMBEDDED_MODELS, hub_error, resolve_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer, resolved path) for an embedded name, local folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except OSError as err:
        if path == name_or_path and "/" not in name_or_path and not path.startswith("."):
            raise ValueError(
                f"{name_or_path!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), a local folder, "
                f"or a model the hub could give: {err}"
            ) from err
        raise hub_error("model", name_or_path, err, EMBEDDED_MODELS) from err
    model.config.use_cache = False
    model.eval()
    return model, tokenizer, path


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window, fp32: shape (batch,)."""
    shift = logits[:, :-1].float()
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).mean(dim=1)


class CausalLM(L.LightningModule):
    """A Hugging Face causal LM to prune, validate (perplexity) and fine-tune.

    Args:
        name_or_path: embedded name (``smollm2-135m``), local Hugging Face folder, or hub id
            (``meta-llama/Llama-2-7b-hf``).
        dtype: weights dtype: float32 | bfloat16 | float16 (statistics are always fp32).
        trust_remote_code: passed to ``from_pretrained``.
        targets: regexes of the linear layers to prune inside the decoder blocks (None: all of them).
        ignore: regexes of layers never to prune.
        learning_rate: for fine-tuning (``fit``).
        weight_decay: for fine-tuning (AdamW).
        finetune: ``full`` (train the parameters ``trainable`` selects) or ``lora`` (train masked LoRA
            adapters only; see ``wanda_pl.training.lora``). Pruned weights stay exactly zero either way.
        trainable: full mode: regexes of the parameter names to train (None: all of them).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (the update is scaled by alpha / r).
        lora_dropout: dropout on the adapters' input while training.
        lora_targets: regexes of the linear layers to adapt (the reference: q_proj and v_proj).
    """

    def __init__(
        self,
        name_or_path: str = "smollm2-135m",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        targets: Optional[List[str]] = None,
        ignore: Optional[List[str]] = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        finetune: str = "full",
        trainable: Optional[List[str]] = None,
        lora_r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.05,
        lora_targets: Sequence[str] = ("q_proj", "v_proj"),
    ) -> None:
        super().__init__()
        if finetune not in ("full", "lora"):
            raise ValueError(f"model.finetune must be 'full' or 'lora', got {finetune!r}")
        if finetune == "lora" and trainable is not None:
            raise ValueError("model.trainable selects parameters for finetune=full; LoRA trains its adapters only")
        if lora_r < 1 or not 0 <= lora_dropout < 1:
            raise ValueError(f"model.lora_r must be >= 1 and model.lora_dropout in [0, 1), got {lora_r}, {lora_dropout}")
        self.save_hyperparameters()
        self.model, self.tokenizer, self.path = load_causal_lm(name_or_path, dtype, trust_remote_code)
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)
        self._nll = torch.zeros(())
        self._windows = torch.zeros(())
        self.last_ppl: Optional[float] = None
        self.last_metrics: Dict[str, float] = {}
        self.masks: Dict[str, torch.Tensor] = {}
        self.train_losses: List[torch.Tensor] = []
        self._finetune_ready = False

    # --- sharding (Lightning's ModelParallelStrategy: FSDP2) ---
    def configure_model(self) -> None:
        """Under ModelParallelStrategy, shard every decoder block and then the rest (embeddings, final
        norm, head) with FSDP2 over the data-parallel mesh; other strategies: nothing to do."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(self._trainer.strategy if self._trainer else None, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return  # sharded already: the hook runs for each validate / fit
        if self.hparams.finetune == "lora":
            raise NotImplementedError("model.finetune=lora under ModelParallelStrategy (FSDP2) is not supported: "
                                      "fine-tune LoRA with ddp or on one device, or use model.finetune=full")
        mesh = self.device_mesh["data_parallel"]
        for block in find_blocks(self.model)[1]:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    # --- pruning plan (architecture knowledge stays in adapters) ---
    def prunable_blocks(
        self, calibration: Optional[torch.Tensor], store_device="cpu"
    ) -> Tuple[List[Tuple[str, nn.Module]], List[BlockInput]]:
        """The decoder blocks in order and the captured inputs of the first (none without calibration)."""
        prefix, blocks = find_blocks(self.model)
        named = [(f"{prefix}.{i}", b) for i, b in enumerate(blocks)]
        if calibration is None:
            return named, []
        device = next(self.model.parameters()).device
        inputs = capture_inputs(
            self.model, blocks, calibration.split(1),
            lambda m, ids: m(input_ids=ids.to(device), use_cache=False), store_device,
        )
        return named, inputs

    def block_targets(self, name: str, block: nn.Module) -> Dict[str, nn.Module]:
        return select_targets(block, name, self.hparams.targets, self.hparams.ignore or ())

    def all_targets(self) -> Dict[str, nn.Module]:
        prefix, blocks = find_blocks(self.model)
        out: Dict[str, nn.Module] = {}
        for i, b in enumerate(blocks):
            out.update(self.block_targets(f"{prefix}.{i}", b))
        return out

    # --- perplexity, as the paper: exp(mean over windows of the window's mean NLL) ---
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def on_validation_epoch_start(self) -> None:
        self.last_metrics = {}
        self._nll = torch.zeros((), dtype=torch.float64, device=self.device)
        self._windows = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        (ids,) = batch
        nll = window_nll(self(ids), ids)
        self._nll += nll.double().sum()
        self._windows += ids.shape[0]

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._nll.clone(), reduce_op="sum")
        count = self.trainer.strategy.reduce(self._windows.clone(), reduce_op="sum")
        if float(count) == 0:
            return
        self.last_ppl = math.exp(float(total) / float(count))
        # Updated, not replaced: callbacks (zero-shot) run their epoch-end hooks before this one.
        self.last_metrics["ppl"] = self.last_ppl
        self.log("ppl", self.last_ppl, prog_bar=True, rank_zero_only=False, sync_dist=False)

    # --- fine-tuning ---
    @property
    def is_lora(self) -> bool:
        return self.hparams.finetune == "lora"

    def setup(self, stage: str) -> None:
        # Before the checkpoint is restored and the optimizer built: the adapters must exist by then.
        if stage == "fit":
            self.prepare_finetune()

    def prepare_finetune(self) -> None:
        """LoRA: attach the masked adapters and freeze the rest. Full: train what ``trainable`` selects."""
        if self._finetune_ready:
            return
        import re

        from ..training import lora

        hp = self.hparams
        if self.is_lora:
            layers = lora.attach(self.model, list(hp.lora_targets), hp.lora_r, hp.lora_alpha, hp.lora_dropout)
            lora.set_masks(self.model, self.masks)
            log.info("LoRA (masked) on %d layers, r=%d alpha=%g", len(layers), hp.lora_r, hp.lora_alpha)
        elif hp.trainable is not None:
            chosen = 0
            for name, p in self.model.named_parameters():
                p.requires_grad_(any(re.search(t, name) for t in hp.trainable))
                chosen += p.requires_grad
            if not chosen:
                raise ValueError(f"model.trainable {hp.trainable} matches no parameter (names like "
                                 f"{[n for n, _ in self.model.named_parameters()][:3]})")
        self._finetune_ready = True

    def set_masks(self, masks: Dict[str, torch.Tensor]) -> None:
        """From the Pruning callback when fitting starts: the adapters' updates skip pruned weights."""
        from ..training import lora

        self.masks = masks
        lora.set_masks(self.model, masks)

    def on_fit_start(self) -> None:
        self.train_losses = []
        self.model.train()  # loaded in eval mode; after the Pruning callback's calibration

    def on_fit_end(self) -> None:
        self.model.eval()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = window_nll(self(ids), ids).mean()
        self.log("train_loss", loss, prog_bar=True)
        self.train_losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no parameter requires a gradient")
        return torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    def finetune_describe(self) -> Dict[str, Any]:
        hp = self.hparams
        out: Dict[str, Any] = {"finetune": hp.finetune, "learning_rate": hp.learning_rate, "weight_decay": hp.weight_decay}
        if self.is_lora:
            out.update(lora_r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                       lora_targets=list(hp.lora_targets))
        else:
            out["trainable"] = hp.trainable
        out["trainable_params"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return out

    def save_adapter(self, folder, extra: Optional[Dict[str, Any]] = None) -> None:
        """The unmerged masked adapters, their config and the masks (``wanda_pl.training.lora.load_adapter``)."""
        from ..training import lora

        lora.save_adapter(self.model, folder, self.masks, {"base_model": self.path, **(extra or {})})

    def merge_lora(self) -> int:
        """Merge the adapters into the weights, in place (``W + K * (B A) * scaling``); returns how many."""
        from ..training import lora

        return len(lora.merge(self.model))

    @staticmethod
    def metrics_report(dense: Optional[Dict[str, float]], pruned: Dict[str, float]) -> Dict[str, Any]:
        out: Dict[str, Any] = {"ppl_dense": None if dense is None else dense["ppl"], "ppl": pruned["ppl"]}
        if "zero_shot" in pruned:
            out["zero_shot"] = {"dense": None if dense is None else dense.get("zero_shot"), "pruned": pruned["zero_shot"]}
        return out

    @staticmethod
    def metrics_line(dense: Optional[Dict[str, float]], pruned: Dict[str, float]) -> str:
        d = "n/a" if dense is None else f"{dense['ppl']:.3f}"
        line = f"perplexity dense {d}, pruned {pruned['ppl']:.3f}"
        if "zero_shot" in pruned:
            from ..eval.zero_shot import format_table

            line += "\nzero-shot accuracy (%):\n" + format_table((dense or {}).get("zero_shot") or {}, pruned["zero_shot"])
        return line

    def save(self, folder, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """The (pruned) network as a Hugging Face folder that ``from_pretrained`` reloads.

        ``state_dict``: the whole weights of a sharded model (``wanda_pl.training.sharding.full_state_dict``,
        gathered on every rank before rank 0 saves)."""
        self.model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        self.tokenizer.save_pretrained(folder)

    def describe(self) -> Dict[str, Any]:
        return {"model": self.hparams.name_or_path, "model_path": self.path, "dtype": self.hparams.dtype}
