"""One pruning's settings, checked as a whole: a method with its steps and their options, the
sparsity, how the ratio is spread over the blocks, and bias correction.

``PruningSettings.from_args`` takes the flat ``--pruning.*`` values (every option any method or step
declares, :func:`wanda_pl.methods.options`); each method keeps the options it declares and checks them
itself. A sweep point is ``settings.replace(method=..., sparsity_ratio=...)``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from ..core import correction
from ..core.allocation import Allocation
from ..core.coverage import check_coverage, coverage
from ..core.expert_pruning import moe_blocks, to_remove
from ..core.layers.experts import RareExperts
from ..core.engine import check_targets, needs_activations
from ..core.method import Method
from ..core.plan import Plan, uniform
from ..core.reconstruct import MODES, Reconstruction
from ..core.structure import Structure
from ..core.sparsity import SparsitySpec
from . import METHODS, STEP_KINDS, check_options, get_method, get_step, options, step_names
from .compose import compose
from .presets import PRESETS, expand
from .wanda import wanda_score

# The settings every pruning has, beside the methods' own options (their defaults are the CLI's).
GENERAL = dict(method="wanda", sparsity_ratio=None, sparsity_type="unstructured", refine="none", update="none",
               bias_correction=False, allocation="uniform", owl_m=5.0, owl_lambda=0.08, profile=None,
               min_expert_tokens=None, rare_experts="magnitude", experts_ratio=0.0, reconstruct="none",
               reconstruct_steps=20, reconstruct_lr=1e-3, reconstruct_batch=4, reconstruct_target="pruned", preset=None,
               structure="none", width_mlp=None, width_heads=None, blocks_removed=0,
               compensate="none", width_multiple=1)


def general_docs() -> Dict[str, str]:
    """What --help says of each general setting, from the tables as they are now (the methods' own
    options document themselves, :func:`wanda_pl.core.method.option`)."""
    return {
        "method": f"one of {', '.join(METHODS)}.",
        "sparsity_ratio": "fraction of weights to prune, in [0, 1) (unset: N/M for N:M, else 0.5).",
        "sparsity_type": "``unstructured`` or ``N:M`` (N pruned of every M consecutive inputs, e.g. 2:4).",
        **{kind: f"after a mask-only method's mask: one of {', '.join(step_names(kind))}." for kind in STEP_KINDS},
        "bias_correction": "put back each pruned layer's mean output (``(W - W') E[x]``) into its bias (or the "
                           "running mean of the BatchNorm a bias-free conv feeds); bias-free linears (LLaMA) are "
                           "refused.",
        "allocation": "how the ratio is spread over the blocks: ``uniform``, ``owl`` (blocks with more outlier "
                      "scores pruned less, from a dense statistics pass) or ``profile``; unstructured only.",
        "owl_m": "OWL's outlier threshold, in multiples of a block's mean Wanda score.",
        "owl_lambda": "OWL's spread: the blocks' sparsities span ``2 * owl_lambda`` around ``sparsity_ratio``.",
        "profile": "with ``allocation: profile``: a sparsity per block (a list) or per layer (regex -> ratio).",
        "min_expert_tokens": "Mixture-of-Experts: an expert that calibration routed fewer tokens to is rare (unset: "
                             "as many as the expert's layer has inputs for methods solving with X^T X, else 1).",
        "rare_experts": "what a rare expert gets: ``magnitude`` (default), ``dense`` (left unpruned) or ``error``; "
                        "the report lists them (``rare_expert_layers``).",
        "experts_ratio": "Mixture-of-Experts: remove this share of every block's experts first, lowest REAP "
                         "saliency (routing weight x output norm) first; the saved model is smaller.",
        "reconstruct": f"after a block is pruned, fit its kept weights (masks fixed) to the dense block's outputs: "
                       f"one of {', '.join(MODES)} (``attn_mlp``: attention and MLP each to its own output).",
        "reconstruct_steps": "Adam steps of each reconstruction.",
        "reconstruct_lr": "learning rate of the reconstruction's Adam.",
        "reconstruct_batch": "calibration samples per reconstruction step.",
        "reconstruct_target": "the outputs fitted: ``pruned`` (the dense block's on the pruned model's inputs) or "
                              "``dense`` (the dense model's own, from a second activation stream; not resumable).",
        "structure": "``width``: remove whole MLP channels and attention heads (KV groups with their query heads), "
                     "scored by pruning.method (magnitude, wanda: Wanda-sp, flap: FLAP's fluctuation); ``depth``: "
                     "remove whole blocks, least influence (1 - cos of the hidden state in and out) first; the saved "
                     "model is smaller and loads with stock from_pretrained. ``none``: weight sparsity.",
        "width_mlp": "structure width: the share of every block's MLP channels removed (unset: sparsity_ratio).",
        "width_heads": "structure width: the share of every block's KV groups removed, each with its query heads "
                       "(unset: sparsity_ratio).",
        "width_multiple": "structure width: round the MLP channels every block keeps to the nearest multiple of this "
                          "(e.g. 64: GEMM-friendly shapes, faster on CPU and GPU; default 1: as the share gives).",
        "blocks_removed": "structure depth: how many blocks are removed.",
        "compensate": "structure width: what down_proj / o_proj get for the removed channels: ``none``, ``bias`` "
                      "(FLAP: their mean contribution into a bias; the config then states mlp_bias / attention_bias) "
                      "or ``lsq`` (a least-squares refit on the kept channels from the calibration X^T X).",
        "preset": "a named combination of the settings above: "
                  + "; ".join(f"``{n}`` = " + ", ".join(f"{k} {v}" for k, v in p.items()) for n, p in PRESETS.items())
                  + " (a setting given beside it must agree with it).",
    }


@dataclass(frozen=True)
class PruningSettings:
    args: Mapping[str, Any]  # every setting as given, defaults filled in (what a sweep varies)
    spec: SparsitySpec
    method: Method  # composed with its steps
    options: Any  # the method's (and its steps') options, checked
    allocation: Allocation
    rare: RareExperts  # what MoE experts that calibration barely reached get
    reconstruct: Reconstruction  # the block-level reconstruction after each block (mode none: off)
    structure: Structure  # whole channels, heads or blocks removed instead of weights zeroed (mode none: off)

    @classmethod
    def from_args(cls, **given: Any) -> "PruningSettings":
        catalogue = options()
        unknown = sorted(set(given) - set(GENERAL) - set(catalogue))
        if unknown:
            raise TypeError(f"unknown pruning settings {unknown}; the methods' options are {sorted(catalogue)}")
        defaults = {**GENERAL, **{k: o.default for k, o in catalogue.items()}}
        args = {**defaults, **expand(given, defaults)}
        spec = SparsitySpec.parse(args["sparsity_type"], args["sparsity_ratio"])
        refine, update = args["refine"], args["update"]
        structure = _structure(args, spec)
        layer_method = "magnitude" if structure.enabled else args["method"]  # a structure scores by itself
        method = compose(get_method(layer_method), get_step("refine", refine), get_step("update", update))
        if refine == "dsnot" and args["bias_correction"]:
            raise ValueError("pruning.refine dsnot balances the mean output change that bias_correction restores "
                             "exactly: use one of them")
        if args.get("use_variant") and "use_variant" not in method.option_names:
            raise ValueError(f"pruning.use_variant needs unstructured sparsity and a method that has it (wanda), "
                             f"got method={args['method']!r}, sparsity_type={spec.type!r}")
        values = {k: args[k] for k in catalogue}
        check_options(**values)  # every option, whether or not this method reads it: a typo must not wait
        chosen = method.make_options(**values)
        if method.check is not None:
            method.check(chosen, spec, refine)
        allocation = Allocation(args["allocation"], args["owl_m"], args["owl_lambda"], args["profile"])
        allocation.check(spec)
        if not (isinstance(args["experts_ratio"], (int, float)) and 0 <= args["experts_ratio"] < 1):
            raise ValueError(f"pruning.experts_ratio must be in [0, 1), got {args['experts_ratio']!r}")
        rare = RareExperts(args["min_expert_tokens"], args["rare_experts"], get_method("magnitude"))
        reconstruct = Reconstruction(args["reconstruct"], args["reconstruct_steps"], args["reconstruct_lr"],
                                     args["reconstruct_batch"], target=args["reconstruct_target"])
        return cls(args, spec, method, chosen, allocation, rare, reconstruct, structure)

    def replace(self, **changes: Any) -> "PruningSettings":
        return PruningSettings.from_args(**{**self.args, **changes})

    @property
    def bias_correction(self) -> bool:
        return bool(self.args["bias_correction"])

    @property
    def experts_ratio(self) -> float:
        return float(self.args["experts_ratio"])

    @property
    def needs_activations(self) -> bool:
        return needs_activations(self.method, self.bias_correction) or self.allocation.needs_activations \
            or self.experts_ratio > 0 or self.reconstruct.enabled or self.structure.enabled

    def describe(self) -> Dict[str, Any]:
        """The report's ``method`` section."""
        a = self.args
        hessian = {k: a[k] for k in ("blocksize", "percdamp") if k in self.method.option_names}
        return {
            "method": self.method.name, "refine": a["refine"], "update": a["update"],
            "sparsity_type": self.spec.type, "sparsity_ratio": self.spec.ratio,
            "use_variant": a.get("use_variant", False), "bias_correction": self.bias_correction,
            "granularity": a.get("granularity") or self.method.default_granularity,
            **hessian,
            "method_options": self.method.describe_options(self.options),  # all the method itself reads
            **self.allocation.describe(),
            # only when set: the fingerprints of earlier sweep points (made from this) stay what they were
            **{k: a[k] for k in ("min_expert_tokens", "rare_experts", "experts_ratio") if a[k] != GENERAL[k]},
            **({k: a[k] for k in a if k.startswith("reconstruct")} if self.reconstruct.enabled else {}),
            **({"preset": a["preset"]} if a["preset"] is not None else {}),
            **(self.structure.describe() if self.structure.enabled else {}),
        }

    def check(self, pl_module) -> None:
        """Fail early where a layer cannot take the sparsity (M does not divide it), a profile or a bias
        correction, and where default targets leave most of the blocks' weights out (:mod:`core.coverage`)."""
        targets = pl_module.all_targets()
        blocks, _ = pl_module.prunable_blocks(None)
        owl = self.allocation.needs_activations  # its plan needs the dense pass: checked as uniform here
        check_targets(targets, uniform(self.spec, targets) if owl else
                      self.allocation.plan(self.spec, blocks, (), pl_module.block_targets))
        explicit = (getattr(pl_module, "hparams", None) or {}).get("targets") is not None
        check_coverage(coverage(blocks, targets), explicit)
        if self.experts_ratio:
            moes = [experts for _, block in blocks for _, experts, _ in moe_blocks(block)]
            if not moes:
                raise ValueError(f"pruning.experts_ratio {self.experts_ratio:g} removes Mixture-of-Experts experts, "
                                 f"and this model has no fused experts")
            if getattr(pl_module, "disk", None) is not None:
                raise ValueError(f"pruning.experts_ratio {self.experts_ratio:g} reshapes every block before weight "
                                 "pruning, and model.offload disk reads each block from the checkpoint for its turn: "
                                 "use model.offload cpu (the same accelerator memory, the weights in host memory)")
            top_k = getattr(pl_module.model.config, "num_experts_per_tok", 1)
            for experts in moes:
                to_remove(experts.gate_up_proj.shape[0], self.experts_ratio, top_k)
        if self.bias_correction:
            correction.check_possible(targets, [pl_module])
        if self.structure.enabled:
            self.structure.check(pl_module.model.config)
            if self.structure.mode == "depth" and getattr(pl_module, "disk", None) is not None:
                raise ValueError("pruning.structure depth renumbers the blocks it keeps, and model.offload disk "
                                 "writes each block under its own name as it goes: use model.offload cpu")

    def plan(self, blocks, inputs, targets_fn, store_device="cpu", progress: bool = False,
             placement: Optional[Any] = None) -> Plan:
        """Each target's sparsity (OWL: from a dense pass over ``inputs``, scored by Wanda's score)."""
        return self.allocation.plan(self.spec, blocks, inputs, targets_fn, store_device, progress, placement,
                                    outlier_score=wanda_score)


# The settings that shape weight sparsity, which a structure (whole channels, heads, blocks) does not take.
_WEIGHT_ONLY = dict(refine="none", update="none", allocation="uniform", reconstruct="none", bias_correction=False,
                    experts_ratio=0.0, use_variant=False)


def _structure(args: Mapping[str, Any], spec: SparsitySpec) -> Structure:
    mode = args["structure"]
    if mode in (None, "none"):
        # a compensation or a rounding without a structure is refused there
        return Structure(compensate=args["compensate"], multiple=args["width_multiple"])
    share = spec.ratio
    structure = Structure(mode, args["method"], share if args["width_mlp"] is None else args["width_mlp"],
                          share if args["width_heads"] is None else args["width_heads"], args["blocks_removed"],
                          args["compensate"], args["width_multiple"])
    if spec.type != "unstructured":
        raise ValueError(f"pruning.structure {mode} removes whole channels or blocks; sparsity_type {spec.type} "
                         "zeroes weights in groups: use one of them")
    clash = [k for k, v in _WEIGHT_ONLY.items() if args.get(k, v) != v]
    if clash:
        raise ValueError(f"pruning.structure {mode} removes whole channels or blocks, and pruning.{clash[0]}="
                         f"{args[clash[0]]!r} shapes weight sparsity: drop one of them")
    return structure
