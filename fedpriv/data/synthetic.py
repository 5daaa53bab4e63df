"""LEAF's Synthetic(alpha, beta) data (Li et al. 2020, FedProx, section 5.1), one client at a time.

Every client ``k`` has its own model and its own feature distribution, as in FedProx's
``data/synthetic_*/generate_synthetic.py`` (the generator LEAF's ``data/synthetic`` follows):

* ``u_k ~ N(0, alpha^2)``, ``W_k ~ N(u_k, 1)`` (10 x 60), ``b_k ~ N(u_k, 1)`` (10): how far apart
  the clients' labelling functions are (``alpha``);
* ``B_k ~ N(0, beta^2)``, ``v_k ~ N(B_k, 1)`` (60): how far apart their features are (``beta``);
* a row ``x ~ N(v_k, Sigma)`` with ``Sigma`` diagonal, ``Sigma_jj = j^-1.2`` (j = 1..60), and its
  label ``y = argmax(softmax(W_k x + b_k)) = argmax(W_k x + b_k)``.

FedProx's code draws ``np.random.normal(0, alpha)``, i.e. ``alpha`` and ``beta`` are standard
deviations (the paper writes ``N(0, alpha)``); this module follows the code.

``iid=True`` is FedProx's Synthetic-IID: one ``W``, ``b`` ~ N(0, 1) shared by every client (from the
seed alone) and ``x ~ N(0, Sigma)``; ``alpha`` and ``beta`` play no part. In the non-IID data the
clients' ``W_k`` are independent (only their mean ``u_k`` is shared by a client's entries), so a
global model learns a client's labels mostly through its features ``v_k``: it does well on clients it
has trained on (FedProx's 30 devices) and near chance on a large fleet's unseen ones. A fleet that
should learn one function uses ``iid=True``.

Rows per client: ``min(floor(lognormal(4, 2)) + 50, 1000)`` (FedProx's ``lognormal(4, 2) + 50``,
capped at LEAF's ``max_num_samples = 1000`` so one client's rows stay small: at most 240 kB).

Generated on demand, never for the whole population: client ``k``'s parameters and rows come from
its own generator, seeded by ``(seed, k)``, so they are the same whichever other clients were
generated, in any process and in any order. A client's row count comes from a block of 1,024
clients' counts (one generator per block), so the counts of many clients are cheap
(:func:`row_counts`) and one client's count costs one block. A population of 1,000,000 costs
nothing until its clients are asked for.

The central test split: 50 fresh rows from each of the first ``min(num_clients, 200)`` clients,
drawn from a stream of their own (the same ``W_k``, ``b_k``, ``v_k``; never one of a client's
training or validation rows). Client ids are exchangeable, so the first 200 are a random sample
of clients; the test measures accuracy on the federation's clients' distributions, as LEAF's
per-client held-out rows do, weighted equally per client.

Privacy meaning: the data are synthetic; there is no person behind a row. Row counts, labels and
features are as private in a run as any other data set's (the guarantee covers them the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .base import FederatedDataset

DIM = 60
NUM_CLASSES = 10
ROWS_MU, ROWS_SIGMA = 4.0, 2.0  # lognormal(4, 2) + MIN_ROWS, as FedProx
MIN_ROWS, MAX_ROWS = 50, 1000
COUNT_BLOCK = 1024  # clients whose row counts one generator draws
TEST_CLIENTS, TEST_ROWS = 200, 50
SIGMA_DIAG = np.arange(1, DIM + 1, dtype=np.float64) ** -1.2  # Sigma_jj = j^-1.2
DEFAULT = {"alpha": 1.0, "beta": 1.0, "seed": 0, "num_clients": 1000}  # load_dataset("synthetic")
_MASK = (1 << 64) - 1
_COUNTS, _CLIENT, _TEST, _SHARED = 0x5C0, 0x5C1, 0x5C2, 0x5C3  # streams: counts, a client's model and rows,
# test rows, the IID variant's shared model


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & _MASK, stream, int(index) & _MASK])


def row_counts(seed: int, ids: np.ndarray) -> np.ndarray:
    """Rows (training + validation) of each client in ``ids``; one generator per 1,024-client block."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty(len(ids), dtype=np.int64)
    order = np.argsort(ids // COUNT_BLOCK, kind="stable")
    blocks, starts = np.unique(ids[order] // COUNT_BLOCK, return_index=True)
    for block, here in zip(blocks, np.split(order, starts[1:])):
        draws = _rng(seed, _COUNTS, int(block)).lognormal(ROWS_MU, ROWS_SIGMA, COUNT_BLOCK)
        counts = np.minimum(np.floor(np.minimum(draws, MAX_ROWS)).astype(np.int64) + MIN_ROWS, MAX_ROWS)
        out[here] = counts[ids[here] % COUNT_BLOCK]
    return out


def client_params(seed: int, alpha: float, beta: float, client_id: int,
                  iid: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.random.Generator]:
    """``(W_k, b_k, v_k)`` of one client and its generator, positioned for drawing its rows."""
    rng = _rng(seed, _CLIENT, client_id)
    if iid:  # Synthetic-IID: the same W, b for every client, features centred at 0
        shared = _rng(seed, _SHARED, 0)
        w = shared.normal(0.0, 1.0, (NUM_CLASSES, DIM))
        return w, shared.normal(0.0, 1.0, NUM_CLASSES), np.zeros(DIM), rng
    u, big_b = rng.normal(0.0, 1.0, 2) * (alpha, beta)  # std alpha, beta (0 is allowed: no spread)
    w = rng.normal(u, 1.0, (NUM_CLASSES, DIM))
    b = rng.normal(u, 1.0, NUM_CLASSES)
    v = rng.normal(big_b, 1.0, DIM)
    return w, b, v, rng


def draw_rows(rng: np.random.Generator, w: np.ndarray, b: np.ndarray, v: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows ``x ~ N(v, Sigma)`` (float32) and their labels ``argmax(W x + b)`` (of the float32 x)."""
    x = (v + rng.standard_normal((n, DIM)) * np.sqrt(SIGMA_DIAG)).astype(np.float32)
    y = np.argmax(x.astype(np.float64) @ w.T + b, axis=1).astype(np.int64)
    return x, y


@dataclass(frozen=True, eq=False)
class SyntheticDataset(FederatedDataset):
    """Synthetic(alpha, beta) over ``num_clients`` clients: ``x_train`` / ``y_train`` are empty
    (no population-wide array exists); a client's rows come from :meth:`client_rows`.

    Attributes (besides :class:`FederatedDataset`'s):
        alpha: spread of the clients' labelling models (std of ``u_k``); 0: the same mean model.
        beta: spread of the clients' feature means (std of ``B_k``); 0: the same mean features.
        seed: the data's seed (a run's ``seed``): with ``(seed, k)`` it fixes client ``k``'s data.
        population: number of clients, ids ``0 .. population - 1``.
        iid: Synthetic-IID (one shared model, features centred at 0; alpha and beta unused).
    """

    alpha: float = 1.0
    beta: float = 1.0
    seed: int = 0
    population: int = 0
    iid: bool = False

    def check_client(self, client_id: int) -> None:
        if not 0 <= client_id < self.population:
            raise ValueError(f"client {client_id} does not exist: synthetic has {self.population} clients")

    def row_count(self, client_id: int) -> int:
        """Client ``client_id``'s rows (training + validation) without generating them."""
        self.check_client(client_id)
        return int(row_counts(self.seed, np.array([client_id]))[0])

    def client_rows(self, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        """All rows of one client, ``(x float32 (n, 60), y int64 (n,))``, the same on every call."""
        n = self.row_count(client_id)
        w, b, v, rng = client_params(self.seed, self.alpha, self.beta, client_id, self.iid)
        return draw_rows(rng, w, b, v, n)


def possible_row_counts() -> np.ndarray:
    """Every row count a client can have (a superset of a population's, whatever its size)."""
    return np.arange(MIN_ROWS, MAX_ROWS + 1)


def central_test_rows(seed: int, alpha: float, beta: float, num_clients: int,
                      iid: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The central test split: :data:`TEST_ROWS` fresh rows of each of the first
    ``min(num_clients, TEST_CLIENTS)`` clients, from a stream apart from their own rows."""
    xs, ys = [], []
    for k in range(min(num_clients, TEST_CLIENTS)):
        w, b, v, _ = client_params(seed, alpha, beta, k, iid)
        x, y = draw_rows(_rng(seed, _TEST, k), w, b, v, TEST_ROWS)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


@lru_cache(maxsize=8)
def synthetic_dataset(alpha: float, beta: float, seed: int, num_clients: int, iid: bool = False) -> SyntheticDataset:
    """Synthetic(alpha, beta) for a run (memoised per process); only the test split is built."""
    if not (alpha >= 0 and beta >= 0):
        raise ValueError(f"synthetic needs alpha >= 0 and beta >= 0, got {alpha}, {beta}")
    if num_clients < 1:
        raise ValueError(f"synthetic needs at least one client, got {num_clients}")
    x_test, y_test = central_test_rows(seed, alpha, beta, num_clients, iid)
    x_test.setflags(write=False)
    y_test.setflags(write=False)
    return SyntheticDataset(
        name="synthetic", x_train=np.zeros((0, DIM), np.float32), y_train=np.zeros(0, np.int64),
        x_test=x_test, y_test=y_test, num_classes=NUM_CLASSES, input_shape=(DIM,), task="tabular",
        natural_ids=None, natural_names=None, alpha=float(alpha), beta=float(beta), seed=int(seed),
        population=int(num_clients), iid=bool(iid),
    )


def load_synthetic(root: object = None) -> SyntheticDataset:
    """The registry's loader: Synthetic(1, 1), seed 0, 1,000 clients (``root`` is ignored). A run
    gets its own ``dataset.alpha``, ``dataset.beta``, ``seed`` and ``num_clients`` through
    :func:`fedpriv.task.dataset_for`."""
    return synthetic_dataset(**DEFAULT)
