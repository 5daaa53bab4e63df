"""Gaussian noise samplers: the draws are N(0, std^2), seeding behaves, the factory is strict.

The distribution is checked against scipy's normal CDF (Kolmogorov-Smirnov) and the sample
standard deviation, never against the sampler's own arithmetic.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from scipy import stats

from fedpriv.privacy.noise_samplers import (
    GaussianSampler,
    NumpyGaussian,
    OpenDPGaussian,
    OpenDPGaussianUnavailable,
    make_gaussian_sampler,
)

try:
    import opendp  # noqa: F401

    HAVE_OPENDP = True
except ImportError:
    HAVE_OPENDP = False

needs_opendp = pytest.mark.skipif(not HAVE_OPENDP, reason="opendp is not installed (pip install \"opendp>=0.12,<0.17\")")

N = 200_000
STDS = (0.37, 12.5)


def _samplers():
    yield pytest.param(lambda: NumpyGaussian(seed=20240611), id="numpy")
    yield pytest.param(lambda: OpenDPGaussian(), id="opendp", marks=needs_opendp)


def _assert_normal(x: np.ndarray, std: float) -> None:
    assert x.dtype == np.float64 and np.all(np.isfinite(x))
    p = stats.kstest(x, stats.norm(loc=0.0, scale=std).cdf).pvalue
    assert p > 1e-3, f"KS test against N(0, {std}^2) rejects: p = {p:.2e}"
    tol = max(0.01, 5 / np.sqrt(2 * x.size))  # 1% at 200,000 draws (6 standard errors); 5 SE for fewer
    assert abs(x.std() / std - 1.0) < tol, f"sample std {x.std():.5f} vs {std}"
    assert abs(x.mean()) < 5 * std / np.sqrt(x.size)


@pytest.mark.parametrize("make", _samplers())
@pytest.mark.parametrize("std", STDS)
def test_sample_is_gaussian(make, std):
    sampler = make()
    assert isinstance(sampler, GaussianSampler)
    x = sampler.sample((N,), std)
    assert x.shape == (N,)
    _assert_normal(x, std)


@pytest.mark.parametrize("make", _samplers())
def test_add_noise_is_centred_on_the_values(make):
    values = np.linspace(-50.0, 50.0, 40_000).reshape(200, 200)
    noised = make().add_noise(values, 0.8)
    assert noised.shape == values.shape
    _assert_normal((noised - values).ravel(), 0.8)


@pytest.mark.parametrize("make", _samplers())
def test_std_zero_gives_zeros(make):
    sampler = make()
    z = sampler.sample((7, 3), 0.0)
    assert z.shape == (7, 3) and z.dtype == np.float64 and not np.any(z)
    values = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(sampler.add_noise(values, 0.0), values)


@pytest.mark.parametrize("make", _samplers())
def test_shapes_and_bad_std(make):
    sampler = make()
    assert sampler.sample((2, 3, 4), 1.0).shape == (2, 3, 4)
    assert sampler.sample((), 1.0).shape == ()
    assert sampler.sample((0,), 1.0).shape == (0,)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            sampler.sample((3,), bad)


def test_numpy_seed_reproduces_and_none_does_not():
    a, b = NumpyGaussian(seed=5), NumpyGaussian(seed=5)
    np.testing.assert_array_equal(a.sample((1000,), 1.0), b.sample((1000,), 1.0))
    np.testing.assert_array_equal(a.sample((10,), 3.0), b.sample((10,), 3.0))  # the streams stay aligned
    assert not np.array_equal(NumpyGaussian(seed=6).sample((1000,), 1.0), NumpyGaussian(seed=5).sample((1000,), 1.0))
    assert not np.array_equal(NumpyGaussian(None).sample((1000,), 1.0), NumpyGaussian(None).sample((1000,), 1.0))
    assert NumpyGaussian(None).secure is False and NumpyGaussian(1).secure is False


def test_numpy_never_exposes_or_persists_its_generator():
    s = NumpyGaussian(seed=1)
    assert not hasattr(s, "state_dict") and not hasattr(s, "rng") and not hasattr(s, "_rng")
    for persist in (pickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(TypeError):
            persist(s)


@needs_opendp
def test_opendp_draws_differ_and_are_secure():
    s = OpenDPGaussian()
    assert s.secure is True and s.name == "opendp"
    a, b = s.sample((1000,), 1.0), s.sample((1000,), 1.0)
    assert not np.array_equal(a, b)
    assert not np.array_equal(OpenDPGaussian().sample((1000,), 1.0), a)


@needs_opendp
def test_opendp_chunked_threads_match_distribution_and_reject_non_finite():
    s = OpenDPGaussian(chunk=1000, workers=2)
    x = s.sample((20, 500), 2.0)  # 10 chunks on 2 threads
    assert x.shape == (20, 500)
    _assert_normal(x.ravel(), 2.0)
    assert len(np.unique(x)) == x.size  # no chunk repeated another
    with pytest.raises(ValueError):
        s.add_noise(np.array([1.0, np.inf]), 1.0)
    with pytest.raises(ValueError):
        s.add_noise(np.array([np.nan]), 1.0)


@needs_opendp
def test_opendp_grid_is_fine_relative_to_std():
    s = OpenDPGaussian()
    for std in (1e-6, 0.3, 1.0, 40.0):
        assert 2.0 ** s.grid_exponent(std) <= std * 2.0**-52
    assert OpenDPGaussian(k=-1074).grid_exponent(1.0) == -1074


def test_factory():
    assert isinstance(make_gaussian_sampler("numpy", 3), NumpyGaussian)
    np.testing.assert_array_equal(
        make_gaussian_sampler("numpy", 3).sample((5,), 1.0), NumpyGaussian(3).sample((5,), 1.0)
    )
    with pytest.raises(ValueError, match="numpy, opendp"):
        make_gaussian_sampler("torch", None)
    with pytest.raises(ValueError, match="numpy, opendp"):
        make_gaussian_sampler("NumPy", None)
    if HAVE_OPENDP:
        assert isinstance(make_gaussian_sampler("opendp", None), OpenDPGaussian)
        with pytest.raises(ValueError, match="cannot be seeded"):
            make_gaussian_sampler("opendp", 3)


def test_missing_opendp_raises_an_import_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_opendp(name, *args, **kwargs):
        if name == "opendp" or name.startswith("opendp."):
            raise ImportError("No module named 'opendp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_opendp)
    with pytest.raises(ImportError, match="pip install") as info:
        OpenDPGaussian()
    assert isinstance(info.value, OpenDPGaussianUnavailable)
