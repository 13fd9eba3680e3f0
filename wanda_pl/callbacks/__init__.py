"""Lightning callbacks, thin adapters over the engine: ``Calibration`` (what to calibrate on and
how), ``Pruning`` (computes masks, applies them, keeps them through fine-tuning) and ``ZeroShot``
(lm-eval accuracy at the end of each validation); ``Distillation`` (fit: learn from a frozen teacher too)."""
from .calibration import Calibration
from .distill import Distillation
from .pruning import Pruning
from .zero_shot import ZeroShot

__all__ = ["Calibration", "Distillation", "Pruning", "ZeroShot"]
