"""The valid range of each numeric config field, as type metadata (PEP 593 `Annotated`).

A config dataclass declares `lr: Positive = 1e-3`; pydantic (which validates every config loaded
from YAML or `--set`, pipeline/config.py) reads the bound and refuses a value outside it with a
message naming the key, the bound and the value, before any work starts. Plain Python
construction (`VQVAEConfig(...)`, a saved model's config.json) is unchanged. `STRICT` is the
`__pydantic_config__` of every config dataclass: no unknown keys, no inf or NaN.
"""

from __future__ import annotations

from typing import Annotated

from annotated_types import Ge, Gt, Interval

STRICT = {"extra": "forbid", "allow_inf_nan": False}

PositiveInt = Annotated[int, Ge(1)]  # sizes, widths, counts, steps
Count = Annotated[int, Ge(0)]  # may be 0 (res blocks, warm-up steps, "0: off")
Positive = Annotated[float, Gt(0)]  # learning rates, temperatures, epsilons
NonNegative = Annotated[float, Ge(0)]  # loss weights, thresholds, norms ("0: off")
Fraction = Annotated[float, Interval(ge=0, lt=1)]  # [0, 1): dropout, EMA decay
UnitInterval = Annotated[float, Interval(ge=0, le=1)]  # [0, 1]: ratios
Bits = Annotated[int, Interval(ge=1, le=31)]  # LFQ/BSQ: a codebook of 2^bits sign codes
