"""One DP release, as the ledger records it.

A release is one or more uses of a mechanism on a (possibly sampled) set of
privacy units.  The unit is whatever the caller protects (a client in central
DP, an example in local DP-SGD): nothing here depends on it.  Three kinds:

* ``gaussian`` -- the Gaussian mechanism (training), possibly amplified by sampling;
* ``laplace`` -- the Laplace mechanism (federated analytics), pure DP, never amplified;
* ``pure`` -- any other epsilon-DP mechanism (the exponential mechanism), accounted by the
  randomized-response pair that dominates every epsilon-DP mechanism (see accounting).

Pure releases carry their ``label``, their ``mechanism`` name and, for Laplace, the
sensitivity and scale, so that privacy.json can list each release.

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

#: Kinds of release (see the module docstring).
KINDS = ("gaussian", "laplace", "pure")

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
    kind: "gaussian", "laplace" (``noise_multiplier`` = Laplace scale / L1 sensitivity of one
        unit's contribution under add/remove-one) or "pure" (``pure_epsilon`` per release).
        Laplace and pure releases have ``sampling="all"``: no amplification is claimed.
    label, mechanism: what the release is (privacy.json lists them); ``sensitivity`` and
        ``scale``: the Laplace mechanism's L1 sensitivity and noise scale (descriptive; the
        accountant uses their ratio).
    """

    noise_multiplier: float
    sampling_rate: float
    sampling: str
    count: int = 1
    population: int | None = None
    sample_size: int | None = None
    kind: str = "gaussian"
    label: str = ""
    mechanism: str = "gaussian"
    sensitivity: float | None = None
    scale: float | None = None
    pure_epsilon: float | None = None

    @property
    def key(self) -> tuple:
        """Everything but ``count``: releases with equal keys merge."""
        return (self.noise_multiplier, self.sampling_rate, self.sampling,
                self.population, self.sample_size, self.kind, self.label, self.mechanism,
                self.sensitivity, self.scale, self.pure_epsilon)

    @property
    def is_pure(self) -> bool:
        """True for a pure (epsilon, 0)-DP release (Laplace or another epsilon-DP mechanism)."""
        return self.kind != "gaussian"

    def standalone_epsilon(self, replace_one: bool = False) -> float | None:
        """Epsilon of ONE such release at delta 0 (pure releases; None for Gaussian).

        Laplace: sensitivity / scale. Under replace-one a unit's contribution can move by twice
        its add/remove bound (group privacy of size 2), so the figure doubles.
        """
        if self.kind == "gaussian":
            return None
        if self.kind == "laplace":
            eps = math.inf if self.noise_multiplier == 0 else 1.0 / self.noise_multiplier
        else:
            eps = float(self.pure_epsilon)
        return 2.0 * eps if replace_one else eps

    @property
    def is_free(self) -> bool:
        """True when nobody's data can be in the release (no privacy cost)."""
        return self.sampling_rate == 0.0 or self.count == 0

    @property
    def is_non_private(self) -> bool:
        """True for a noiseless release touching data: epsilon is infinite."""
        return self.kind != "pure" and self.noise_multiplier == 0.0 and not self.is_free

    def to_dict(self) -> dict:
        """Plain JSON state; Gaussian releases keep the original six keys (old checkpoints load)."""
        d = {"noise_multiplier": self.noise_multiplier, "sampling_rate": self.sampling_rate,
             "sampling": self.sampling, "count": self.count, "population": self.population,
             "sample_size": self.sample_size}
        if self.kind != "gaussian":
            d.update({"kind": self.kind, "label": self.label, "mechanism": self.mechanism,
                      "sensitivity": self.sensitivity, "scale": self.scale,
                      "pure_epsilon": self.pure_epsilon,
                      "epsilon_each": self.standalone_epsilon()})
        return d


def _check_count(count: int) -> int:
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    return int(count)


def make_laplace_release(scale_over_sensitivity: float, count: int = 1, label: str = "",
                         sensitivity: float | None = None, scale: float | None = None,
                         mechanism: str = "laplace") -> DpRelease:
    """``count`` Laplace releases, noise scale b over L1 sensitivity s = ``scale_over_sensitivity``.

    0 means no noise (epsilon becomes inf); inf is rejected (nothing released). When both
    ``sensitivity`` and ``scale`` are given their ratio must equal ``scale_over_sensitivity``.
    """
    r = float(scale_over_sensitivity)
    if math.isnan(r) or r < 0:
        raise ValueError(f"scale_over_sensitivity must be >= 0, got {scale_over_sensitivity!r}")
    if math.isinf(r):
        raise ValueError("scale_over_sensitivity=inf releases nothing: do not record it")
    if sensitivity is not None and scale is not None:
        if not sensitivity > 0 or abs(scale / sensitivity - r) > 1e-9 * max(1.0, r):
            raise ValueError(f"scale {scale} / sensitivity {sensitivity} != {r}")
    return DpRelease(r, 1.0, "all", _check_count(count), kind="laplace", label=str(label),
                     mechanism=str(mechanism),
                     sensitivity=None if sensitivity is None else float(sensitivity),
                     scale=None if scale is None else float(scale))


def make_pure_release(epsilon: float, count: int = 1, label: str = "",
                      mechanism: str = "pure") -> DpRelease:
    """``count`` releases of an epsilon-DP mechanism (0 < epsilon < inf, add/remove-one)."""
    eps = float(epsilon)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon!r}")
    return DpRelease(0.0, 1.0, "all", _check_count(count), kind="pure", label=str(label),
                     mechanism=str(mechanism), pure_epsilon=eps)


def release_from_dict(d: dict) -> DpRelease:
    """Inverse of :meth:`DpRelease.to_dict`; validates again."""
    kind = d.get("kind", "gaussian")
    if kind == "laplace":
        return make_laplace_release(d["noise_multiplier"], d["count"], d.get("label", ""),
                                    d.get("sensitivity"), d.get("scale"), d.get("mechanism", "laplace"))
    if kind == "pure":
        return make_pure_release(d["pure_epsilon"], d["count"], d.get("label", ""), d.get("mechanism", "pure"))
    if kind != "gaussian":
        raise ValueError(f"unknown release kind {kind!r}")
    return make_release(d["noise_multiplier"], d["sampling_rate"], d["sampling"], d["count"],
                        d.get("population"), d.get("sample_size"))


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
    count = _check_count(count)
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
