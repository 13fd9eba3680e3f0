"""Regular-expression options (targets, ignore, trainable, LoRA targets, profile keys), checked
when the option is parsed: a typo is one line naming the option and the pattern, before a model
is loaded, not a ``re.error`` traceback from the first block that matches names."""
from __future__ import annotations

import re
from typing import Iterable, Optional

from ..errors import UserError


def check_patterns(option: str, patterns: Optional[Iterable[str]]) -> None:
    """Refuse the first pattern of ``option`` that is not a string or does not compile."""
    for pattern in patterns or ():
        if not isinstance(pattern, str):
            raise UserError(f"{option}: {pattern!r} is not a regular expression (a string); got a "
                            f"{type(pattern).__name__}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise UserError(f"{option}: {pattern!r} is not a valid regular expression ({err})") from None
