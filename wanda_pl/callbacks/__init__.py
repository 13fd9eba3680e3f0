from .calibration import Calibration
from .pruning import Pruning

__all__ = ["Calibration", "Pruning"]
