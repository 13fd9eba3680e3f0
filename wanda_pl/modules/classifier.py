"""LightningModule around a timm image classifier: top-1 / top-5 accuracy and top-1 agreement.

Pruning plan: the same block-sequential engine as the LLM path. The units are the repeated
blocks, in the order the network runs them (``blocks`` / ``stages`` / ``layers`` / ``layerN``,
nested ``nn.Sequential`` flattened: ViT/DeiT ``blocks.N``, EfficientNet ``blocks.S.N``, ConvNeXt
``stages.S``, ResNet ``layerK.N``); the stem runs once to capture the first block's input. With
``calibration.propagate: true`` each block calibrates on the activations of the already pruned
blocks before it; ``false`` gives the reference's setting exactly (every statistic from the
dense forward). The chain is checked on one image before use (each unit called once, in order,
on the previous unit's output, with no other argument); a model that is not such a chain, or
targets outside it (``head``, the stem), fall back to ONE unit, the whole network, whose
statistics always come from the dense forward.

Default targets: the Linear layers inside the repeated blocks (ViT / DeiT ``blocks.N.attn.qkv``,
``attn.proj``, ``mlp.fc1``, ``mlp.fc2``; ConvNeXt ``stages.S.blocks.N.mlp.fc1/fc2``, also when
timm builds them as 1x1 convs (``conv_mlp``); Swin ``layers.S.blocks.N...``), never the stem /
patch embedding, downsampling layers or the head.
With ``convs=True`` also the non-grouped Conv2d inside the blocks (EfficientNet / MobileNet
``conv_pw``, ``conv_pwl``; ResNet ``layerK.N.convM``), but not squeeze-excitation convs
(``se.conv_reduce`` / ``se.conv_expand``: tiny, and they gate whole channels) and never
depthwise/grouped convs. ``targets`` (regexes over names relative to the timm model) replace
the default selection and select every Linear or non-grouped Conv2d they match, head and stem
included (``convs`` is not needed for a conv named explicitly); ``ignore`` removes.
A k x k conv is pruned as the linear map of its unfolded (in * k * k) patches.

Agreement: the fraction of images whose top-1 class equals the dense model's. The first
validation run on an unpruned model stores the dense top-1 of every image by its dataset
index (gathered from all ranks); later runs compare against it.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..core.layers import is_prunable, select_targets
from ..core.hooks import BlockInput, capture_inputs

log = logging.getLogger(__name__)

# A layer is "inside a block" when its name has one of these (timm naming).
BLOCK_PATTERNS = (r"(^|\.)blocks\.\d+\.", r"^layer\d+\.\d+\.")
# Containers of the repeated blocks, children of the timm model, run one after the other.
CHAIN_CONTAINERS = re.compile(r"^(blocks|stages|layers|layer\d+)$")
# Never pruned by default, even inside a block.
DEFAULT_EXCLUDE = (r"(^|\.)downsample(\.|$)", r"(^|\.)se\.", r"(^|\.)head(\.|$)")


def load_state_dict_file(path: Path) -> Dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a torch file (plain, or under ``state_dict`` / ``model``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    return {re.sub(r"^(module\.|model\.)", "", k): v for k, v in obj.items()}


DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def checked_data_config(overrides: Dict[str, Any]) -> Dict[str, Any]:
    """``overrides`` of timm's data config, checked, with lists made tuples as timm keeps them."""
    unknown = sorted(set(overrides) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"model.data_config: unknown key(s) {unknown}; allowed: {', '.join(DATA_CONFIG_KEYS)}")
    out = {}
    for key, value in overrides.items():
        if key in ("input_size", "mean", "std"):
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                raise ValueError(f"model.data_config.{key} must be a list of 3 numbers, got {value!r}")
            value = tuple(value)
        if key == "crop_pct" and not (isinstance(value, (int, float)) and 0 < value <= 2):
            raise ValueError(f"model.data_config.crop_pct must be a number in (0, 2], got {value!r}")
        out[key] = value
    return out


def _saved_folder(path: Path) -> Tuple[Path, Dict[str, Any]]:
    """(weights file, config) of a folder written by :meth:`Classifier.save` or an embedded model."""
    config = json.loads((path / "config.json").read_text())
    for name in ("model.safetensors", "model.pt", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name, config
    raise FileNotFoundError(f"{path} has config.json but no model.safetensors / model.pt")


@dataclass
class ImageInput(BlockInput):
    """One calibration batch: uint8 pixels (normalized on the way in, with ``mean``/``std``) or a
    block's float input. Units always run in eval mode: BatchNorm statistics must not move and
    dropout must not fire during calibration, even when pruning starts a ``fit``."""

    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None

    def call(self, block: nn.Module, device) -> torch.Tensor:
        was_training = block.training
        block.eval()
        try:
            if self.mean is None:
                return super().call(block, device)
            return block(normalize(self.hidden.to(device), self.mean.to(device), self.std.to(device)))
        finally:
            block.train(was_training)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> the model's input: ``(x / 255 - mean) / std`` (ToTensor + Normalize)."""
    if x.dtype != torch.uint8:
        return x  # already a normalized float tensor
    x = x.float().div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _dist_ready():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


class Classifier(L.LightningModule):
    """A timm image classifier to prune and validate (top-1, top-5, agreement with the dense model).

    Args:
        name: timm model name (``vit_base_patch16_224``, ``deit_base_patch16_224``,
            ``convnext_base``, ``tf_efficientnet_lite0`` ...). Optional with ``embedded`` or a saved folder.
        pretrained: timm's pretrained weights (needs the Hugging Face hub).
        checkpoint_path: local weights: a state_dict file (``.safetensors``, ``.pt``, ``.pth``) for
            ``name``, or a folder written by ``save`` (``config.json`` + ``model.safetensors``).
        embedded: an embedded real model (``efficientnet-lite0``: ImageNet-1k, offline).
        num_classes: classifier classes (default: the checkpoint's / timm's default).
        targets: regexes of the layers to prune (names relative to the timm model; any Linear or
            non-grouped Conv2d they match); None = the block defaults above.
        ignore: regexes of layers never to prune.
        convs: also prune the non-grouped Conv2d inside the blocks (EfficientNet 1x1 convs).
        model_kwargs: extra ``timm.create_model`` keyword arguments (e.g. a small ``img_size``).
        data_config: overrides of timm's resolved eval data config (``crop_pct``, ``mean``, ``std``,
            ``input_size``, ``interpolation``, ``crop_mode``): e.g. ``{crop_pct: 1.0}`` for a model
            rebuilt at a small ``img_size``, whose pretrained ``crop_pct`` would crop the image. A
            folder written by ``save`` brings back the data config it was saved with; this wins over it.
        calibration_batch_size: images per forward during calibration.
        learning_rate: for fine-tuning (``fit``).
        weight_decay: for fine-tuning (AdamW).
    """

    def __init__(
        self,
        name: Optional[str] = None,
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        embedded: Optional[str] = None,
        num_classes: Optional[int] = None,
        targets: Optional[List[str]] = None,
        ignore: Optional[List[str]] = None,
        convs: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        calibration_batch_size: int = 32,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if calibration_batch_size < 1:
            raise ValueError(f"model.calibration_batch_size must be >= 1, got {calibration_batch_size}")
        self.model, self.timm_name, self.path, saved_data_config = self._build()
        self.model.eval()
        self.num_classes = int(self.model.num_classes)
        import timm.data

        self.data_config = timm.data.resolve_data_config({}, model=self.model)
        fixed = getattr(getattr(self.model, "patch_embed", None), "img_size", None)  # ViT-style fixed input
        if fixed is not None and tuple(self.data_config["input_size"][1:]) != tuple(fixed):
            self.data_config["input_size"] = (3, *tuple(fixed))  # built with another img_size than its pretrained cfg
        self.data_config.update(checked_data_config({**saved_data_config, **(data_config or {})}))
        self.register_buffer("pixel_mean", torch.tensor(self.data_config["mean"], dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.data_config["std"], dtype=torch.float32), persistent=False)
        self.top1 = self._accuracy(1)
        self.top5 = self._accuracy(5)
        self.reference: Optional[torch.Tensor] = None  # dense top-1 per evaluation image (-1: not seen)
        self._preds: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []
        self._indices: List[torch.Tensor] = []
        self.last_metrics: Dict[str, Any] = {}
        self.train_losses: List[torch.Tensor] = []

    # --- building ---
    def _build(self) -> Tuple[nn.Module, str, Optional[str], Dict[str, Any]]:
        import timm

        hp = self.hparams
        kwargs = dict(hp.model_kwargs or {})
        name, path, weights = hp.name, None, None
        saved_data_config: Dict[str, Any] = {}  # what a folder written by save() was evaluated with
        sources = [s for s in ("pretrained", "checkpoint_path", "embedded") if getattr(hp, s)]
        if len(sources) > 1:
            raise ValueError(f"model: give at most one of pretrained / checkpoint_path / embedded, got {sources}")
        folder: Optional[Path] = None
        if hp.embedded:
            from ..data.assets import AssetError, ensure

            try:
                folder = Path(ensure(hp.embedded))
            except AssetError as err:
                raise ValueError(f"model.embedded: {err}") from err
        elif hp.checkpoint_path:
            p = Path(hp.checkpoint_path).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"model.checkpoint_path {hp.checkpoint_path!r} does not exist")
            if p.is_dir():
                folder = p
            else:
                weights, path = p, str(p)
        num_classes = hp.num_classes
        if folder is not None:
            weights, config = _saved_folder(folder)
            path = str(folder)
            saved_name = config.get("timm_name")
            if name and saved_name and name != saved_name:
                raise ValueError(f"model.name {name!r} does not match the saved model's {saved_name!r}")
            name = name or saved_name
            kwargs = {**config.get("model_kwargs", {}), **kwargs}
            num_classes = num_classes or config.get("num_classes")
            saved_data_config = config.get("data_config") or {}
        if not name:
            raise ValueError("model.name (a timm model name) is required unless model.embedded or a saved folder is given")
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        try:
            model = timm.create_model(name, pretrained=bool(hp.pretrained), **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"model.name {name!r}: {err}") from err
            raise
        except Exception as err:
            if hp.pretrained:
                raise ValueError(
                    f"could not get timm's pretrained weights for {name!r} (they come from the Hugging Face hub): "
                    f"{type(err).__name__}: {str(err)[:300]}\nWithout the hub, use model.checkpoint_path (a local file) "
                    f"or model.embedded (efficientnet-lite0)") from err
            raise
        if weights is not None:
            state = load_state_dict_file(Path(weights))
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise ValueError(f"weights {weights} do not fit timm {name!r}: missing {missing[:5]}, "
                                 f"unexpected {list(unexpected)[:5]}")
        return model, name, path, saved_data_config

    def _accuracy(self, k: int):
        from torchmetrics.classification import MulticlassAccuracy

        k = min(k, self.num_classes)
        return MulticlassAccuracy(num_classes=self.num_classes, top_k=k, average="micro", ignore_index=-1)

    # --- pruning plan ---
    def prunable_blocks(
        self, calibration: Optional[torch.Tensor], store_device="cpu"
    ) -> Tuple[List[Tuple[str, nn.Module]], List[BlockInput]]:
        """The units to prune in order and the calibration inputs of the first one."""
        if calibration is not None and (calibration.dim() != 4 or calibration.shape[1] != 3):
            raise ValueError(f"calibration images must be (N, 3, H, W), got {tuple(calibration.shape)}")
        mean, std = self.pixel_mean.cpu(), self.pixel_std.cpu()
        batches = [] if calibration is None else calibration.split(self.hparams.calibration_batch_size)
        units = self.units(batches[0][:1] if batches else None)
        if calibration is None:
            return units, []
        pixels = [ImageInput(hidden=b.to(store_device), mean=mean, std=std) for b in batches]
        if units[0][1] is self.model:
            return units, pixels
        device = next(self.model.parameters()).device
        # ImageInput.call runs the whole network in eval mode, as for any unit.
        captured = capture_inputs(self.model, units[0][1], pixels, lambda m, p: p.call(m, device), store_device)
        return units, [ImageInput(hidden=c.hidden, args=c.args, kwargs=c.kwargs, key=c.key) for c in captured]

    def units(self, probe: Optional[torch.Tensor] = None) -> List[Tuple[str, nn.Module]]:
        """The block chain (see the module docstring), or ``[("", model)]`` when it cannot be used.

        ``probe``: one uint8 image to check the chain with (without one, the chain is trusted)."""
        whole = [("", self.model)]
        chain = block_chain(self.model)
        if not chain:
            return whole
        inside = {n for name, unit in chain for n in self.block_targets(name, unit)}
        outside = sorted(set(self.all_targets()) - inside)
        if outside:
            log.info("targets outside the block chain (%s): one unit, statistics from the dense forward", outside[:3])
            return whole
        if probe is not None:
            problem = chain_problem(self.model, chain, normalize(probe.to(self.device), self.pixel_mean, self.pixel_std))
            if problem:
                log.info("%s does not run its blocks as a plain chain (%s): one unit, statistics from the dense "
                         "forward", self.timm_name, problem)
                return whole
        return chain

    def block_targets(self, name: str, unit: nn.Module) -> Dict[str, nn.Module]:
        hp = self.hparams
        ignore = list(hp.ignore or ())
        if hp.targets is not None:
            found = select_targets(unit, name, hp.targets, ignore, True)  # what the regexes name, convs included
        else:
            found = {
                n: m for n, m in select_targets(unit, name, None, ignore, True).items()
                if any(re.search(p, n) for p in BLOCK_PATTERNS) and not any(re.search(p, n) for p in DEFAULT_EXCLUDE)
                and (hp.convs or not isinstance(m, nn.Conv2d) or _pointwise_mlp(n, m))
            }
        return {n: m for n, m in found.items() if _unfoldable(n, m, hp.targets is not None)}

    def all_targets(self) -> Dict[str, nn.Module]:
        return self.block_targets("", self.model)

    # --- evaluation ---
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for uint8 pixel images (normalized here) or already-normalized float images."""
        return self.model(normalize(images, self.pixel_mean, self.pixel_std))

    def on_validation_epoch_start(self) -> None:
        self.top1.reset()
        self.top5.reset()
        self._preds, self._labels, self._indices = [], [], []

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels, indices = batch
        logits = self(images)
        labels = labels.long()
        self.top1.update(logits, labels)
        self.top5.update(logits, labels)
        self._preds.append(logits.argmax(dim=-1))
        self._labels.append(labels)
        self._indices.append(indices.long())

    def _is_pruned(self) -> bool:
        trainer = self._trainer
        return trainer is not None and any(getattr(cb, "masks", None) for cb in trainer.callbacks)

    def _gather(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(top-1 per image, label per image) over every rank, indexed by dataset index; -1 = absent."""
        device = self.device
        idx = torch.cat(self._indices).to(device) if self._indices else torch.zeros(0, dtype=torch.long, device=device)
        preds = torch.cat(self._preds).to(device) if self._preds else idx.clone()
        labels = torch.cat(self._labels).to(device) if self._labels else idx.clone()
        size = torch.tensor([int(idx.max()) + 1 if idx.numel() else 0], device=device)
        n = int(_all_reduce(size, dist.ReduceOp.MAX if _dist_ready() else None))
        full_pred = torch.zeros(n, dtype=torch.long, device=device)
        full_label = torch.zeros(n, dtype=torch.long, device=device)
        # Each image lives on exactly one rank: summing shifted values (0 = absent) gathers them.
        full_pred[idx] = preds + 1
        full_label[idx] = labels + 2
        _all_reduce(full_pred)
        _all_reduce(full_label)
        return full_pred - 1, full_label - 2

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        preds, labels = self._gather()
        seen = preds >= 0
        labelled = seen & (labels >= 0)
        n_labelled = int(labelled.sum())
        metrics: Dict[str, Any] = {
            # torchmetrics computes in float32: rounded so that 18/20 reads 0.9, not 0.8999999761
            "top1": round(float(self.top1.compute()), 6) if n_labelled else None,
            "top5": round(float(self.top5.compute()), 6) if n_labelled else None,
            "images": int(seen.sum()),
            "labelled": n_labelled,
            "top1_correct": int((preds[labelled] == labels[labelled]).sum()),
        }
        if self.reference is None and not self._is_pruned():
            self.reference = preds.detach().cpu()
        metrics["agreement"], metrics["agreement_unlabelled"] = self._agreement(preds, labels)
        self.last_metrics = metrics
        for key in ("top1", "top5", "agreement"):
            if metrics[key] is not None:
                self.log(key, metrics[key], prog_bar=True, rank_zero_only=False, sync_dist=False)

    def _agreement(self, preds: torch.Tensor, labels: torch.Tensor) -> Tuple[Optional[float], Optional[float]]:
        ref = self.reference
        if ref is None:
            return None, None
        if ref.numel() != preds.numel():
            log.warning("the evaluation set changed since the dense predictions were stored (%d vs %d images): "
                        "no agreement", ref.numel(), preds.numel())
            return None, None
        ref = ref.to(preds.device)
        both = (preds >= 0) & (ref >= 0)
        same = (preds == ref) & both
        unl = both & (labels < 0)
        total = float(same.sum()) / max(int(both.sum()), 1) if int(both.sum()) else None
        unlabelled = float(same[unl].sum()) / int(unl.sum()) if int(unl.sum()) else None
        return total, unlabelled

    def reset_reference(self) -> None:
        """Forget the stored dense predictions (the next unpruned validation stores new ones)."""
        self.reference = None

    # --- fine-tuning ---
    def on_fit_start(self) -> None:
        # Built in eval mode and Lightning keeps each module's mode: without this, fit would train
        # with dropout / drop path off and BatchNorm frozen. Runs after the Pruning callback's
        # on_fit_start (callbacks first), whose calibration runs in eval mode regardless.
        self.train_losses = []
        self.model.train()

    def on_fit_end(self) -> None:
        self.model.eval()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        loss = F.cross_entropy(self(images), labels.long(), ignore_index=-1)
        self.log("train_loss", loss, prog_bar=True)
        self.train_losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    # --- reporting ---
    @staticmethod
    def metrics_report(dense: Optional[Dict[str, Any]], pruned: Dict[str, Any]) -> Dict[str, Any]:
        def pair(key):
            return {"dense": None if dense is None else dense.get(key), "pruned": pruned.get(key)}

        accuracy = {"top1": pair("top1"), "top5": pair("top5"), "agreement": pair("agreement")}
        if pruned.get("agreement_unlabelled") is not None:
            accuracy["agreement_unlabelled"] = pair("agreement_unlabelled")
        return {"accuracy": accuracy,
                "eval_counts": {"images": pruned.get("images"), "labelled": pruned.get("labelled")}}

    @staticmethod
    def metrics_line(dense: Optional[Dict[str, Any]], pruned: Dict[str, Any]) -> str:
        def fmt(m, key):
            v = None if m is None else m.get(key)
            return "n/a" if v is None else f"{100 * v:.2f}%"

        return (f"top-1 dense {fmt(dense, 'top1')}, pruned {fmt(pruned, 'top1')}; "
                f"top-5 dense {fmt(dense, 'top5')}, pruned {fmt(pruned, 'top5')}; "
                f"agreement {fmt(pruned, 'agreement')} over {pruned.get('images')} images")

    def save(self, folder) -> None:
        """``model.safetensors`` (timm state_dict) + ``config.json``: reload with ``checkpoint_path=folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        config = {"timm_name": self.timm_name, "num_classes": self.num_classes,
                  "model_kwargs": {k: v for k, v in (self.hparams.model_kwargs or {}).items() if k != "num_classes"},
                  "data_config": self.plain_data_config()}
        (folder / "config.json").write_text(json.dumps(config, indent=2))

    def plain_data_config(self) -> Dict[str, Any]:
        """The eval data config as JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}

    def describe(self) -> Dict[str, Any]:
        return {
            "model": self.hparams.embedded or self.timm_name,
            "timm_name": self.timm_name,
            "model_path": self.path,
            "num_classes": self.num_classes,
            "convs": self.hparams.convs,
            "data_config": self.plain_data_config(),
            "targets": self.hparams.targets,
            "ignore": self.hparams.ignore,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def _pointwise_mlp(name: str, module: nn.Conv2d) -> bool:
    """A 1x1 conv that is an MLP linear in disguise (timm ``Mlp(use_conv=True)`` / ``ConvMlp``, e.g.
    ConvNeXt with ``conv_mlp=True``): selected like the Linear ``mlp.fc1/fc2`` it stands for."""
    return re.search(r"(^|\.)mlp\.fc\d$", name) is not None and module.kernel_size == (1, 1) and module.groups == 1


def _unfoldable(name: str, module: nn.Module, explicit: bool) -> bool:
    """A conv whose padding is computed at run time (timm's TF-"same" ``Conv2dSame``) with a
    kernel larger than 1 cannot be unfolded from its static padding: skip it (warn if asked for)."""
    if not isinstance(module, nn.Conv2d) or not is_prunable(module, True):
        return True
    dynamic = type(module).__name__ == "Conv2dSame" or isinstance(module.padding, str)
    if dynamic and module.kernel_size != (1, 1):
        (log.warning if explicit else log.debug)("skipping %s: %s with a %s kernel pads at run time",
                                                 name, type(module).__name__, module.kernel_size)
        return False
    return True


def block_chain(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The repeated blocks in registration order: children of the ``CHAIN_CONTAINERS``
    ``nn.Sequential`` containers, nested ``nn.Sequential`` (EfficientNet stages) flattened."""

    def flatten(name: str, seq: nn.Sequential) -> List[Tuple[str, nn.Module]]:
        out: List[Tuple[str, nn.Module]] = []
        for n, child in seq.named_children():
            full = f"{name}.{n}"
            out += flatten(full, child) if isinstance(child, nn.Sequential) else [(full, child)]
        return out

    chain: List[Tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and CHAIN_CONTAINERS.match(name):
            chain += flatten(name, child)
    return chain


@torch.no_grad()
def chain_problem(model: nn.Module, chain: List[Tuple[str, nn.Module]], x: torch.Tensor) -> Optional[str]:
    """Why ``chain`` is not what ``model(x)`` runs (None when it is): every unit called exactly
    once, in order, with one tensor argument that is the previous unit's output."""
    calls: List[Tuple[int, Any, Any]] = []
    position = {id(unit): i for i, (_, unit) in enumerate(chain)}

    def pre(module, args, kwargs):
        calls.append((position[id(module)], args, kwargs))

    def post(module, _args, _kwargs, output):
        calls[-1] = calls[-1] + (output,)

    handles = [unit.register_forward_pre_hook(pre, with_kwargs=True) for _, unit in chain]
    handles += [unit.register_forward_hook(post, with_kwargs=True) for _, unit in chain]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    order = [c[0] for c in calls]
    if order != list(range(len(chain))):
        return f"units called in the order {order[:8]}..., not once each in order"
    for i, (_, args, kwargs, *out) in enumerate(calls):
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return f"{chain[i][0]} takes more than one tensor"
        if not out or not isinstance(out[0], torch.Tensor):
            return f"{chain[i][0]} does not return one tensor"
        if i and args[0] is not calls[i - 1][3]:
            return f"{chain[i][0]} does not take {chain[i - 1][0]}'s output"
    return None
