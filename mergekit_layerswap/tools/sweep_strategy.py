# SPDX-License-Identifier: LGPL-3.0-only
"""How a sweep spends its evaluations: the full grid on every item, or successive halving.

Successive halving (Jamieson & Talwalkar, 2016) evaluates every candidate on the first
``minimum`` items, promotes the best 1/``eta`` to a slice ``eta`` times larger, and so on
until one candidate is left or the slice reaches the full set; the survivors are then
scored on the full set (the user's ``--limit``, or every item), where the best is chosen.
Slices are prefixes of the eval set, so a candidate's score on a slice is the score the
grid sweep would give with ``--limit`` set to that slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from mergekit_layerswap.core.errors import OptionError


@dataclass(frozen=True)
class Rung:
    limit: Optional[int]  # items per candidate (None: all of them)
    candidates: int  # how many candidates are evaluated at this rung


class Strategy:
    name = "strategy"

    def rungs(self, candidates: int, problems: Optional[int], limit: Optional[int]) -> List[Rung]:
        raise NotImplementedError

    def describe(self, rungs: List[Rung]) -> Dict[str, Any]:
        """For sweep.json: a resume with another strategy or schedule is refused."""
        return {"name": self.name, "rungs": [[r.limit, r.candidates] for r in rungs]}


@dataclass(frozen=True)
class Grid(Strategy):
    name = "grid"

    def rungs(self, candidates, problems, limit):
        return [Rung(limit, candidates)]


@dataclass(frozen=True)
class Halving(Strategy):
    minimum: int = 10
    eta: int = 3
    name = "halving"

    def __post_init__(self):
        if self.minimum < 1:
            raise OptionError("the first slice needs at least 1 item", "--halving-min")
        if self.eta < 2:
            raise OptionError("the reduction factor must be at least 2", "--halving-eta")

    def rungs(self, candidates: int, problems: Optional[int], limit: Optional[int]) -> List[Rung]:
        """Slices ``minimum * eta**k`` while more than one candidate is left and the slice is
        smaller than the full set (``problems`` when known, else ``limit``); then the full set."""
        full = min(x for x in (problems, limit, math.inf) if x is not None)
        rungs, alive, size = [], candidates, self.minimum
        while alive > 1 and size < full:
            rungs.append(Rung(size, alive))
            alive = math.ceil(alive / self.eta)
            size *= self.eta
        rungs.append(Rung(limit, alive))
        return rungs

    def describe(self, rungs):
        return {**super().describe(rungs), "minimum": self.minimum, "eta": self.eta}
