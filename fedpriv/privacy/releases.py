"""One DP release, as the ledger records it.

A release is one or more uses of a Gaussian mechanism on a (possibly sampled)
set of privacy units.  The unit is whatever the caller protects (a client in
central DP, an example in local DP-SGD): nothing here depends on it.

Noise convention (the same for every kind of sampling): ``noise_multiplier``
is the noise standard deviation divided by the largest L2 norm of one unit's
contribution (the clipping norm), i.e. by the sensitivity under adding or
removing one unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

#: Kinds of sampling the ledger can account for.
SAMPLINGS = ("poisson", "fixed", "all")

#: Neighbouring relations (names follow dp-accounting's NeighboringRelation).
ADD_OR_REMOVE_ONE = "add_or_remove_one"
REPLACE_ONE = "replace_one"


@dataclass(frozen=True)
class DpRelease:
    """``count`` releases of the Gaussian mechanism with the same parameters.

    noise_multiplier: noise std / L2 bound of one unit's contribution; 0 means
        no noise (epsilon becomes infinite).
    sampling_rate: probability that a unit takes part ("poisson"),
        ``sample_size / population`` ("fixed"), or 1.0 ("all").
    sampling: "poisson" (each unit joins independently with ``sampling_rate``),
        "fixed" (``sample_size`` units drawn without replacement from
        ``population``), or "all" (every unit, no amplification).
    count: how many such releases happened in a row.
    population, sample_size: only for "fixed"; ``None`` otherwise.
    """

    noise_multiplier: float
    sampling_rate: float
    sampling: str
    count: int = 1
    population: int | None = None
    sample_size: int | None = None

    @property
    def key(self) -> tuple:
        """Everything but ``count``: releases with equal keys merge."""
        return (self.noise_multiplier, self.sampling_rate, self.sampling,
                self.population, self.sample_size)

    @property
    def is_free(self) -> bool:
        """True when nobody's data can be in the release (no privacy cost)."""
        return self.sampling_rate == 0.0 or self.count == 0

    @property
    def is_non_private(self) -> bool:
        """True for a noiseless release touching data: epsilon is infinite."""
        return self.noise_multiplier == 0.0 and not self.is_free


def make_release(noise_multiplier: float, sampling_rate: float, sampling: str,
                 count: int = 1, population: int | None = None,
                 sample_size: int | None = None) -> DpRelease:
    """Validate the arguments and return a normalised :class:`DpRelease`.

    Raises ``ValueError`` with a one-line message on anything the ledger
    cannot account for.  An infinite noise multiplier is rejected on purpose:
    such a "release" reveals nothing and should not be recorded, and an
    infinite value usually means a bug upstream (e.g. a zero clipping norm).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    z = float(noise_multiplier)
    if math.isnan(z) or z < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if math.isinf(z):
        raise ValueError("noise_multiplier=inf releases nothing: do not record it")
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    count = int(count)
    q = float(sampling_rate)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate!r}")

    if sampling == "fixed":
        if population is None or sample_size is None:
            raise ValueError("sampling='fixed' needs population and sample_size")
        if int(population) != population or int(sample_size) != sample_size:
            raise ValueError("population and sample_size must be integers")
        population, sample_size = int(population), int(sample_size)
        if not 1 <= sample_size <= population:
            raise ValueError(f"need 1 <= sample_size <= population, got "
                             f"{sample_size} of {population}")
        if abs(q - sample_size / population) > 1e-9:
            raise ValueError(f"sampling_rate={q} does not equal sample_size/population"
                             f"={sample_size}/{population}")
        q = sample_size / population
    else:
        if population is not None or sample_size is not None:
            raise ValueError("population and sample_size apply only to sampling='fixed'")
        if sampling == "all" and q != 1.0:
            raise ValueError(f"sampling='all' needs sampling_rate=1.0, got {q}")
    return DpRelease(z, q, sampling, count, population, sample_size)


def merge(releases: Iterable[DpRelease]) -> list[DpRelease]:
    """Merge consecutive releases with equal parameters (counts add up)."""
    out: list[DpRelease] = []
    for r in releases:
        if out and out[-1].key == r.key:
            out[-1] = replace(out[-1], count=out[-1].count + r.count)
        else:
            out.append(r)
    return out


def neighboring_relation(releases: Iterable[DpRelease]) -> str:
    """The relation under which a sequence of releases is accounted.

    dp-accounting accounts Poisson sampling only under add/remove-one and
    fixed-size sampling without replacement only under replace-one, so the
    two cannot be composed into one guarantee: ``ValueError`` if both occur.
    "all" (no sampling) fits either relation.
    """
    kinds = {r.sampling for r in releases}
    if "fixed" in kinds and "poisson" in kinds:
        raise ValueError("cannot compose 'poisson' (add/remove-one) and 'fixed' "
                         "(replace-one) releases in one ledger")
    return REPLACE_ONE if "fixed" in kinds else ADD_OR_REMOVE_ONE
