"""Example-level canaries for auditing DP-SGD in one run (Steinke, Nasr & Jagielski, NeurIPS 2023).

The unit of privacy of local DP (``clients/dp_sgd.py``) is one training example of one client.
The one-run audit of that guarantee:

1. :func:`make_canaries` draws ``m`` canary examples (inputs from the data's range, labels drawn
   uniformly, so a model can only predict them by memorising them) and an inclusion bit per
   canary, each an independent fair coin;
2. the audited client trains on its rows plus the *included* canaries (:func:`with_canaries`);
   its DP-SGD ledger must count the augmented number of rows (the sampling rate changes);
3. after training, :func:`canary_scores` scores every canary on the released model (minus the
   cross-entropy: a memorised canary has a low loss), and :func:`audit_examples` turns the scores
   into Steinke et al.'s lower bound (:func:`fedpriv.audit.one_run.one_run_audit`), valid at the
   stated confidence whatever the dependence between canaries.

Not wired into the DP-SGD client (``clients/dp_sgd.py`` belongs to another module): what would
change there is (a) an ``audit.example_canaries`` option that, for one designated client,
concatenates :func:`with_canaries` rows before the Opacus data loader is built (so ``n``, the
Poisson rate ``q = 1 / ceil(n / batch_size)`` and the ledger all see the canaries), and (b) the
client returning :func:`canary_scores` of its final local model (or the server scoring the final
global model, the weaker black-box threat model) so :func:`audit_examples` can run at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .one_run import one_run_audit


@dataclass
class ExampleCanaries:
    x: np.ndarray  # (m, *input_shape) float32
    y: np.ndarray  # (m,) int64
    included: np.ndarray  # (m,) bool, independent fair coins

    @property
    def m(self) -> int:
        return int(self.y.size)


def make_canaries(m: int, input_shape: Sequence[int], num_classes: int, seed: int, low: float = 0.0, high: float = 1.0) -> ExampleCanaries:
    """``m`` random inputs in [low, high) with uniformly random labels, each included w.p. 1/2."""
    rng = np.random.default_rng([seed, 31])
    x = rng.uniform(low, high, size=(m, *input_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, size=m).astype(np.int64)
    included = rng.random(m) < 0.5
    return ExampleCanaries(x, y, included)


def with_canaries(x: np.ndarray, y: np.ndarray, canaries: ExampleCanaries) -> tuple[np.ndarray, np.ndarray]:
    """A client's rows plus its included canaries (the excluded ones are never seen)."""
    keep = canaries.included
    return np.concatenate([x, canaries.x[keep].astype(x.dtype)]), np.concatenate([y, canaries.y[keep].astype(y.dtype)])


def canary_scores(model: Any, canaries: ExampleCanaries, batch_size: int = 512) -> np.ndarray:
    """Minus the cross-entropy of each canary under ``model`` (a torch module): higher = "included"."""
    import torch
    from torch.nn import functional as F

    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, canaries.m, batch_size):
            xb = torch.from_numpy(canaries.x[s : s + batch_size])
            yb = torch.from_numpy(canaries.y[s : s + batch_size])
            out.append(-F.cross_entropy(model(xb), yb, reduction="none").numpy())
    return np.concatenate(out) if out else np.zeros(0)


def audit_examples(scores: Sequence[float], canaries: ExampleCanaries, delta: float, confidence: float = 0.95) -> dict[str, Any]:
    """Steinke et al.'s example-level lower bound from canary scores (see :mod:`.one_run`)."""
    res = one_run_audit(scores, canaries.included, delta, confidence)
    res["unit"] = "example"
    return res
