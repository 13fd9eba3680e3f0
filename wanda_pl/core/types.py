"""The shapes every layer passes around, defined once."""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Tuple

import torch.nn as nn

Blocks = List[Tuple[str, nn.Module]]  # the repeated blocks in the order the network runs them
TargetsFn = Callable[[str, nn.Module], Dict[str, nn.Module]]  # (block name, block) -> its prunable layers
TargetsByBlock = Mapping[str, Mapping[str, nn.Module]]  # block name -> its prunable layers by name
