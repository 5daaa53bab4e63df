"""Planted secrets and their exposure in a language model (Carlini et al., USENIX Security 2019,
"The Secret Sharer").

``exposure.secrets = k`` draws ``2k`` random secrets from the run's seed: ``k`` are *planted*,
each into the training rows of one client (``exposure.repeats`` copies), the other ``k`` are
*held out*, never planted anywhere: they show what exposure a secret has when the model never saw it.
A secret is ``exposure.length`` symbols drawn uniformly and independently from an alphabet:

* ``text_classification`` (Sent140): the tokenizer's ordinary tokens (no ``[PAD]``/``[UNK]``/``[EOS]``)
  and a label drawn uniformly from the classes; a planted row is the token sequence, ``[EOS]``, padding,
  with that label. Its log-perplexity is the cross-entropy of its label given the sequence;
* ``next_char`` (Shakespeare): lowercase letters after the prefix ``"my secret is "``; one row per
  letter, the :data:`CONTEXT` characters before it (left-filled with spaces) and the letter as target.
  Its log-perplexity is the sum of the letters' cross-entropies, as in the paper.

**Exposure** (the paper's Definition 4) is ``log2 |R| - log2 rank(s)``, the rank of the secret's
log-perplexity among every candidate of the space ``R``. ``|R|`` (``|alphabet|^length``) is far too
large to enumerate, so it is estimated from ``exposure.candidates`` = ``n`` candidates drawn from the
same law as the secrets (the paper's sampling estimate, without its skew-normal extrapolation):
``p = (1 + #{c : lp(c) <= lp(s)}) / (n + 1)`` and ``exposure = -log2 p``. Ties count against the secret;
at most ``log2(n + 1)`` bits are measurable. For a secret the model never saw, ``p`` is a valid p-value
(``P[p <= a] <= a``): the mean exposure of held-out secrets is about ``1 / ln 2 = 1.44`` bits.

**The ceiling the guarantee allows.** Removing a secret's copies from the data changes the data of one
user (user-level DP, any number of copies) or ``repeats`` examples (example-level DP: group privacy,
``(r eps, r e^((r-1) eps) delta)``). Under ``(eps, delta)`` for that change the p-value obeys
``P[p <= a] <= e^eps a + delta``, hence ``P[exposure >= t] <= e^eps 2^-t + delta`` and
``E[exposure] <= integral_0^T min(1, e^eps 2^-t + delta) dt`` with ``T = log2(n + 1)``
(:func:`expected_exposure_ceiling`). The measured mean of the planted secrets sits below it when the
code does what the accountant assumes.

**What is published.** The secrets are synthetic (drawn from the seed, nobody's data) and their
exposure is a function of the released model and of them only: post-processing, covered by the run's
guarantee. The model that shipped *includes* the planted secrets: audit a configuration, train the
model you keep in a run without ``exposure.secrets``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpriv.data.text import EOS, PAD_ID, SPECIALS, load_tokenizer

PREFIX = "my secret is "
LETTERS = "abcdefghijklmnopqrstuvwxyz"
_SEED_TAG = 0x5EC2E7  # separates the secrets' random stream from every other use of the run's seed


@dataclass(frozen=True)
class SecretSpace:
    """The law secrets and candidates are drawn from, and how one becomes training rows."""

    task: str  # text_classification | next_char
    alphabet: np.ndarray  # token ids a symbol is drawn from
    length: int
    seq_len: int  # positions of one row
    num_classes: int
    prefix: np.ndarray  # next_char: the ids before the secret
    pad: int  # text_classification: padding id; next_char: the id of a space (left fill)
    eos: int  # text_classification: the end-of-sequence id

    @property
    def log2_size(self) -> float:
        """``log2 |R|``: bits of a secret."""
        return self.length * math.log2(len(self.alphabet)) + (math.log2(self.num_classes) if self.labelled else 0.0)

    @property
    def labelled(self) -> bool:
        return self.task == "text_classification"

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` secrets: symbols ``int64 (n, length)`` and labels ``int64 (n,)`` (zeros when unlabelled)."""
        symbols = self.alphabet[rng.integers(0, len(self.alphabet), size=(n, self.length))]
        labels = rng.integers(0, self.num_classes, size=n) if self.labelled else np.zeros(n, np.int64)
        return symbols.astype(np.int64), labels.astype(np.int64)

    @property
    def rows_per_secret(self) -> int:
        return 1 if self.labelled else self.length

    def rows(self, symbols: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Training rows ``x (n * rows_per_secret, seq_len)``, ``y`` of each secret, secret by secret."""
        n = len(symbols)
        if self.labelled:
            x = np.full((n, self.seq_len), PAD_ID, np.int64)
            x[:, : self.length] = symbols
            x[:, self.length] = self.eos
            return x, labels.astype(np.int64)
        text = np.concatenate([np.broadcast_to(self.prefix, (n, len(self.prefix))), symbols], axis=1)
        filled = np.concatenate([np.full((n, self.seq_len), self.pad, np.int64), text], axis=1)
        start = self.seq_len + len(self.prefix)  # position of the secret's first symbol in ``filled``
        x = np.stack([filled[:, start + j - self.seq_len: start + j] for j in range(self.length)], axis=1)
        return x.reshape(n * self.length, self.seq_len), symbols.reshape(-1)


def secret_space(task: str, tokenizer_json: str, seq_len: int, num_classes: int, length: int) -> SecretSpace:
    """The secret law for a data set's task and tokenizer."""
    tok = load_tokenizer(tokenizer_json)
    vocab = tok.get_vocab(with_added_tokens=True)
    if task == "text_classification":
        if length + 1 > seq_len:
            raise ValueError(f"exposure.length {length} leaves no room for [EOS] in {seq_len} positions")
        specials = {vocab[s] for s in SPECIALS if s in vocab}
        alphabet = np.array(sorted(set(vocab.values()) - specials), np.int64)
        return SecretSpace(task, alphabet, length, seq_len, num_classes, np.zeros(0, np.int64), PAD_ID,
                           int(vocab[EOS]))
    if task == "next_char":
        missing = [c for c in LETTERS + " " if c not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no token for {missing[:3]}: secrets are lowercase letters")
        prefix = np.array([vocab[c] for c in PREFIX], np.int64)
        return SecretSpace(task, np.array([vocab[c] for c in LETTERS], np.int64), length, seq_len, num_classes,
                           prefix, int(vocab[" "]), -1)
    raise ValueError(f"exposure needs a text task (text_classification or next_char), not {task}")


@dataclass
class Secrets:
    """The run's planted and held-out secrets, and who holds each planted one."""

    space: SecretSpace
    symbols: np.ndarray  # (2k, length): rows [0, k) planted, [k, 2k) held out
    labels: np.ndarray
    holders: np.ndarray  # (k,) client ids: holders[i] holds planted secret i
    repeats: int

    @property
    def count(self) -> int:
        return len(self.holders)

    def rows_of(self, client_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The rows planted into ``client_id``'s training data (every copy), or None."""
        mine = np.flatnonzero(self.holders == client_id)
        if mine.size == 0:
            return None
        x, y = self.space.rows(self.symbols[mine], self.labels[mine])
        return np.tile(x, (self.repeats, 1)), np.tile(y, self.repeats)


def draw_secrets(space: SecretSpace, count: int, repeats: int, num_clients: int, seed: int) -> Secrets:
    """``count`` planted secrets (one distinct holder each, uniformly among the clients) and ``count``
    held out, all from ``(seed, tag)``: every process of a run draws the same ones."""
    if count > num_clients:
        raise ValueError(f"exposure.secrets {count} > num_clients {num_clients}: each planted secret needs its own holder")
    rng = np.random.default_rng([int(seed), _SEED_TAG])
    symbols, labels = space.draw(rng, 2 * count)
    holders = rng.permutation(num_clients)[:count].astype(np.int64)
    return Secrets(space, symbols, labels, holders, int(repeats))


@torch.no_grad()
def log_perplexities(model: torch.nn.Module, space: SecretSpace, symbols: np.ndarray, labels: np.ndarray,
                     batch_size: int = 512) -> np.ndarray:
    """``lp`` of each secret (nats): the sum of its rows' cross-entropies under ``model``."""
    x, y = space.rows(symbols, labels)
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[s: s + batch_size]).to(device)
        yb = torch.from_numpy(y[s: s + batch_size]).to(device)
        out.append(torch.nn.functional.cross_entropy(model(xb).float(), yb, reduction="none").cpu())
    per_row = torch.cat(out).numpy().astype(np.float64)
    return per_row.reshape(len(symbols), space.rows_per_secret).sum(axis=1)


def rank_exposure(secret_lp: np.ndarray, candidate_lp: np.ndarray) -> np.ndarray:
    """``-log2 p`` with ``p = (1 + #{candidates with lp <= the secret's}) / (n + 1)``, per secret."""
    sorted_lp = np.sort(np.asarray(candidate_lp, np.float64))
    at_or_below = np.searchsorted(sorted_lp, np.asarray(secret_lp, np.float64), side="right")
    return -np.log2((1.0 + at_or_below) / (len(sorted_lp) + 1.0))


def expected_exposure_ceiling(epsilon: float, delta: float, candidates: int) -> float:
    """The largest mean exposure an ``(epsilon, delta)`` guarantee allows with ``candidates`` candidates:
    ``integral_0^T min(1, e^eps 2^-t + delta) dt``, ``T = log2(candidates + 1)``."""
    top = math.log2(candidates + 1)
    if not math.isfinite(epsilon) or delta >= 1.0:
        return top
    t0 = epsilon / math.log(2) - math.log2(1.0 - delta)  # where e^eps 2^-t + delta reaches 1
    if t0 >= top:
        return top
    t0 = max(t0, 0.0)
    tail = math.exp(epsilon) * (2.0 ** -t0 - 2.0 ** -top) / math.log(2) + delta * (top - t0)
    return min(top, t0 + tail)


def group_guarantee(epsilon: float, delta: float, size: int) -> tuple[float, float]:
    """``(eps, delta)``-DP for one unit gives this for ``size`` units (group privacy)."""
    if size <= 1 or not math.isfinite(epsilon):
        return epsilon, delta
    return size * epsilon, min(1.0, size * math.exp((size - 1) * epsilon) * delta)


def measure(model: torch.nn.Module, secrets: Secrets, candidates: int, seed: int) -> dict[str, Any]:
    """Exposure of every planted and held-out secret under ``model`` (candidates drawn from ``seed``)."""
    rng = np.random.default_rng([int(seed), _SEED_TAG, 1])
    cand_symbols, _ = secrets.space.draw(rng, candidates)
    lp = log_perplexities(model, secrets.space, secrets.symbols, secrets.labels)
    exposures = np.empty(len(lp))
    if secrets.space.labelled:  # a secret's candidates carry its label: rank among them per label
        for label in np.unique(secrets.labels):
            sel = secrets.labels == label
            cand_lp = log_perplexities(model, secrets.space, cand_symbols, np.full(candidates, label))
            exposures[sel] = rank_exposure(lp[sel], cand_lp)
    else:
        exposures = rank_exposure(lp, log_perplexities(model, secrets.space, cand_symbols, np.zeros(candidates, np.int64)))
    k = secrets.count
    return {"planted": exposures[:k], "held_out": exposures[k:], "log_perplexity_planted": lp[:k],
            "log_perplexity_held_out": lp[k:]}
