"""Lightning callbacks, thin adapters over the engine: ``Calibration`` (what to calibrate on and
how), ``Pruning`` (computes masks, applies them, keeps them through fine-tuning) and ``ZeroShot``
(lm-eval accuracy at the end of each validation)."""
from .calibration import Calibration
from .pruning import Pruning
from .zero_shot import ZeroShot

__all__ = ["Calibration", "Pruning", "ZeroShot"]
