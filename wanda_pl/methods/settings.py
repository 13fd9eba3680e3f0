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
from ..core.layers.experts import RareExperts
from ..core.engine import check_targets, needs_activations
from ..core.method import Method
from ..core.plan import Plan, uniform
from ..core.sparsity import SparsitySpec
from . import check_options, get_method, get_step, options
from .compose import compose
from .wanda import wanda_score

# The settings every pruning has, beside the methods' own options (their defaults are the CLI's).
GENERAL = dict(method="wanda", sparsity_ratio=None, sparsity_type="unstructured", refine="none", update="none",
               bias_correction=False, allocation="uniform", owl_m=5.0, owl_lambda=0.08, profile=None,
               min_expert_tokens=None, rare_experts="magnitude")


@dataclass(frozen=True)
class PruningSettings:
    args: Mapping[str, Any]  # every setting as given, defaults filled in (what a sweep varies)
    spec: SparsitySpec
    method: Method  # composed with its steps
    options: Any  # the method's (and its steps') options, checked
    allocation: Allocation
    rare: RareExperts  # what MoE experts that calibration barely reached get

    @classmethod
    def from_args(cls, **given: Any) -> "PruningSettings":
        catalogue = options()
        unknown = sorted(set(given) - set(GENERAL) - set(catalogue))
        if unknown:
            raise TypeError(f"unknown pruning settings {unknown}; the methods' options are {sorted(catalogue)}")
        args = {**GENERAL, **{k: o.default for k, o in catalogue.items()}, **given}
        spec = SparsitySpec.parse(args["sparsity_type"], args["sparsity_ratio"])
        refine, update = args["refine"], args["update"]
        method = compose(get_method(args["method"]), get_step("refine", refine), get_step("update", update))
        if refine != "none" and args["bias_correction"]:
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
        rare = RareExperts(args["min_expert_tokens"], args["rare_experts"], get_method("magnitude"))
        return cls(args, spec, method, chosen, allocation, rare)

    def replace(self, **changes: Any) -> "PruningSettings":
        return PruningSettings.from_args(**{**self.args, **changes})

    @property
    def bias_correction(self) -> bool:
        return bool(self.args["bias_correction"])

    @property
    def needs_activations(self) -> bool:
        return needs_activations(self.method, self.bias_correction) or self.allocation.needs_activations

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
            **{k: a[k] for k in ("min_expert_tokens", "rare_experts") if a[k] != GENERAL[k]},
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
        if self.bias_correction:
            correction.check_possible(targets, [pl_module])

    def plan(self, blocks, inputs, targets_fn, store_device="cpu", progress: bool = False,
             placement: Optional[Any] = None) -> Plan:
        """Each target's sparsity (OWL: from a dense pass over ``inputs``, scored by Wanda's score)."""
        return self.allocation.plan(self.spec, blocks, inputs, targets_fn, store_device, progress, placement,
                                    outlier_score=wanda_score)
