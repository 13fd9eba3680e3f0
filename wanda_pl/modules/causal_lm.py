"""LightningModule around a Hugging Face causal LM: perplexity validation, fine-tuning loss.

It implements :class:`wanda_pl.modules.protocol.PrunableModule`; what is Hugging Face knowledge
(loading, saving, where the blocks are) lives in :mod:`wanda_pl.families.hf_causal`.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import lightning as L
import torch
import torch.nn as nn

from ..core.hooks import BlockInput
from ..core.layers import select_targets
from ..core.patterns import check_patterns
from ..eval.metric import compare_line
from ..eval.perplexity import PERPLEXITY, PerplexitySums, window_nll
from ..core.onload import HostOffload, Placement, check_offload, refuse_offloaded
from ..families.hf_causal import (blockwise_logits, capture_block_inputs, load_causal_lm, named_blocks, non_block_modules,
                                  save_causal_lm)
from ..families.hf_disk import DiskModel
from ..errors import UserError
from .training import adamw, record_train_loss, trainable_params

log = logging.getLogger(__name__)

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
        offload: ``none`` (the whole model on the accelerator), ``cpu`` (weights in host memory, one
            block at a time on the accelerator) or ``disk`` (built without weights; each block read from
            the checkpoint's safetensors for its turn, written out pruned and freed). Offloaded,
            perplexity runs block by block too; zero-shot and fine-tuning need the whole model.
        device_map: accelerate's device map for ``from_pretrained`` (``auto``, ``balanced``, or
            ``{module: device}``): one model over several accelerators, each block's work on its device.
    """

    measures = (PERPLEXITY,)

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
        offload: str = "none",
        device_map: Optional[Union[str, Dict[str, Union[int, str]]]] = None,
    ) -> None:
        super().__init__()
        for option, patterns in (("model.targets", targets), ("model.ignore", ignore),
                                 ("model.trainable", trainable), ("model.lora_targets", lora_targets)):
            check_patterns(option, patterns)
        check_offload(offload, device_map)
        if finetune not in ("full", "lora"):
            raise ValueError(f"model.finetune must be 'full' or 'lora', got {finetune!r}")
        if finetune == "lora" and trainable is not None:
            raise ValueError("model.trainable selects parameters for finetune=full; LoRA trains its adapters only")
        if lora_r < 1 or not 0 <= lora_dropout < 1:
            raise ValueError(f"model.lora_r must be >= 1 and model.lora_dropout in [0, 1), got {lora_r}, {lora_dropout}")
        self.save_hyperparameters()
        if offload == "disk":
            self.disk = DiskModel(name_or_path, dtype, trust_remote_code)
            model, self.tokenizer, self.path = self.disk.model, self.disk.tokenizer, self.disk.path
        else:
            model, self.tokenizer, self.path = load_causal_lm(name_or_path, dtype, trust_remote_code, device_map)
        self.use_network(model)
        self._eval_ids: List[torch.Tensor] = []
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)
        self._ppl = PerplexitySums()
        self._metrics: Dict[str, float] = {}
        self.masks: Dict[str, torch.Tensor] = {}
        self.train_losses: List[torch.Tensor] = []
        self._finetune_ready = False

    @property
    def model(self) -> nn.Module:
        return self._modules["model"] if "model" in self._modules else self.__dict__["_held"]

    def use_network(self, network: nn.Module) -> None:
        """Wrap ``network`` (at load; a sweep's fresh dense copy after a point that cut the model)."""
        if self.hparams.offload != "none" or self.hparams.device_map is not None:
            self.__dict__["_held"] = network  # not a submodule: Lightning must not move it to one device
        else:
            self.model = network

    # --- where the weights are: offload, device maps ---
    @property
    def offloaded(self) -> bool:
        return self.hparams.offload != "none"

    def placement(self) -> Placement:
        """How the engine brings each block in (:mod:`wanda_pl.core.onload`); the embeddings, final
        norm and head stay on the accelerator."""
        if self.hparams.offload == "none":
            return Placement()
        for name in non_block_modules(self.model):
            if self.hparams.offload == "cpu":
                self.model.get_submodule(name).to(self.device)
        if self.hparams.offload == "cpu":
            return HostOffload(self.device)
        return self.disk.placement(self.device)

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
        for _, block in named_blocks(self.model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    # --- what to prune ---
    def prunable_blocks(
        self, calibration: Optional[torch.Tensor], store_device="cpu", batch_size: Optional[int] = None
    ) -> Tuple[List[Tuple[str, nn.Module]], List[BlockInput]]:
        """The decoder blocks in order and the captured inputs of the first (none without calibration),
        ``batch_size`` windows per input (None: 1, the reference)."""
        named = named_blocks(self.model)
        if calibration is None:
            return named, []
        return named, capture_block_inputs(self.model, calibration, store_device, batch_size or 1)

    def block_targets(self, name: str, block: nn.Module) -> Dict[str, nn.Module]:
        return select_targets(block, name, self.hparams.targets, self.hparams.ignore or ())

    def all_targets(self) -> Dict[str, nn.Module]:
        out: Dict[str, nn.Module] = {}
        for name, block in named_blocks(self.model):
            out.update(self.block_targets(name, block))
        return out

    # --- perplexity, as the paper: exp(mean over windows of the window's mean NLL) ---
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def on_validation_epoch_start(self) -> None:
        self._metrics = {}
        self._ppl = PerplexitySums(self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        (ids,) = batch
        if self.offloaded:
            self._eval_ids.append(ids.cpu())  # measured block by block at the epoch's end
        else:
            self._ppl.update(self(ids), ids)

    def on_validation_epoch_end(self) -> None:
        if self.offloaded:
            batches, self._eval_ids = self._eval_ids, []
            for ids, logits in blockwise_logits(self.model, batches, self.placement(), self.device,
                                                self.trainer.is_global_zero):
                self._ppl.update(logits, ids.to(self.device))
        ppl = self._ppl.compute()
        if ppl is None:
            return
        self._metrics = {PERPLEXITY.name: ppl}
        # fp64 on the CPU: a python float would be logged as float32 and `validate` would print and
        # return a rounded perplexity, unlike the report's
        self.log(PERPLEXITY.name, torch.tensor(ppl, dtype=torch.float64), prog_bar=True, rank_zero_only=False,
                 sync_dist=False, batch_size=1)

    def validation_metrics(self) -> Dict[str, float]:
        return dict(self._metrics)

    # --- fine-tuning ---
    @property
    def is_lora(self) -> bool:
        return self.hparams.finetune == "lora"

    def setup(self, stage: str) -> None:
        # Before the checkpoint is restored and the optimizer built: the adapters must exist by then.
        if self.hparams.offload == "disk" and self.trainer.world_size > 1:
            raise UserError("model.offload disk runs in one process (rank 0 writes the pruned blocks it then reads "
                            "back); for data-parallel calibration use model.offload cpu or none")
        if stage == "fit":
            refuse_offloaded("fine-tuning", self.hparams.offload, self.hparams.device_map)
            self.prepare_finetune()

    def prepare_finetune(self) -> None:
        """LoRA: attach the masked adapters and freeze the rest. Full: train what ``trainable`` selects."""
        if self._finetune_ready:
            return
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

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """From the Pruning callback whenever it applies masks: the adapters' updates skip pruned weights."""
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
        distill = self.__dict__.get("distill")  # set by the Distillation callback
        return record_train_loss(self, window_nll(self(ids), ids).mean() if distill is None else distill.step(self, ids))

    def configure_optimizers(self):
        return adamw(self.model, self.hparams.learning_rate, self.hparams.weight_decay)

    def finetune_describe(self) -> Dict[str, Any]:
        hp = self.hparams
        out: Dict[str, Any] = {"finetune": hp.finetune, "learning_rate": hp.learning_rate, "weight_decay": hp.weight_decay}
        if self.is_lora:
            out.update(lora_r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                       lora_targets=list(hp.lora_targets))
        else:
            out["trainable"] = hp.trainable
        out["trainable_params"] = trainable_params(self.model)
        return out

    def save_adapter(self, folder, extra: Optional[Dict[str, Any]] = None) -> None:
        """The unmerged masked adapters, their config and the masks (``wanda_pl.training.lora.load_adapter``)."""
        from ..training import lora

        lora.save_adapter(self.model, folder, self.masks, {"base_model": self.path, **(extra or {})})

    def merge_lora(self) -> int:
        """Merge the adapters into the weights, in place (``W + K * (B A) * scaling``); returns how many."""
        from ..training import lora

        return len(lora.merge(self.model))

    def measured_on(self, metrics: Dict[str, float]) -> Dict[str, Any]:  # the windows are the data section's
        return {}

    def metrics_line(self, dense: Optional[Dict[str, float]], pruned: Dict[str, float]) -> str:
        return compare_line(self.measures, dense, pruned)

    def save(self, folder, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """The (pruned) network as a Hugging Face folder that ``from_pretrained`` reloads.

        ``state_dict``: the whole weights of a sharded model (``wanda_pl.training.sharding.full_state_dict``,
        gathered on every rank before rank 0 saves)."""
        save_causal_lm(self.model, self.tokenizer, folder, state_dict)

    def describe(self) -> Dict[str, Any]:
        hp = self.hparams
        return {"model": hp.name_or_path, "model_path": self.path, "dtype": hp.dtype, "offload": hp.offload,
                **({"device_map": hp.device_map} if hp.device_map is not None else {})}
