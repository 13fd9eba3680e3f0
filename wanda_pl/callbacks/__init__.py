from .calibration import Calibration
from .pruning import Pruning
from .zero_shot import ZeroShot

__all__ = ["Calibration", "Pruning", "ZeroShot"]
