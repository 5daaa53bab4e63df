"""Sentiment140 (LEAF's per-user partition): one natural client per Twitter user, binary sentiment.

The file ``sent140/all_data_niid_0_keep_30_test_9.json`` holds 16,025 tweets of 2,875 users (3 to 55
each): ``{"users", "num_samples", "user_data": {user: {"x": [[id, date, query, user, text, split]],
"y": [0/1]}}}``.

**Split by user, never by tweet**, because the privacy unit is the user. Every user falls in one of
three disjoint pools, by a hash of the user name (fixed, independent of any seed):

* ``public`` (10%): text that no client holds; it trains the tokenizer and
  ``scripts/pretrain_public.py``'s public pretraining. Stated as public by this split: in a real
  deployment it is data the provider may use without privacy (opted-in or licensed).
* ``test`` (10%): users no client is, so test accuracy measures what a model does for new people.
* ``clients`` (80%): one natural client per user, holding all of that user's tweets.

Text is lower-cased, each ``@mention`` becomes ``@user`` and each URL ``http``: the handles of
other people and links are identifiers, not sentiment. Ids come from a byte-level BPE tokenizer
trained on the public pool (:mod:`.text`), or from the tokenizer a pretrained model brings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from .base import DataError, FederatedDataset
from .cache import cached_arrays, source_key
from .locate import candidate_dirs, find_files, not_found
from .text import encode_padded, tokenizer_digest, train_bpe, vocabulary_size

FORMAT_VERSION = 2  # 2: test_user_ids
FILE = "all_data_niid_0_keep_30_test_9.json"
SEQ_LEN = 48            # BPE tokens per tweet incl. [EOS]; the public pool's longest tweet needs 46
VOCAB_SIZE = 2000       # of the default BPE tokenizer
PUBLIC_SHARE, TEST_SHARE = 0.10, 0.10
_MENTION = re.compile(r"@\w+")
_URL = re.compile(r"(https?://|www\.)\S+")


def find_file(root: str | os.PathLike | None) -> Path:
    files, notes = find_files(candidate_dirs(root, "sent140"), {"data": FILE}, gz_ok=False)
    if files is None:
        raise not_found(f"Sentiment140 ({FILE})", notes)
    return files["data"]


def normalise(text: str) -> str:
    """What the model reads of a tweet: lower case, no handles, no links, single spaces."""
    text = _URL.sub("http", _MENTION.sub("@user", text.lower()))
    return " ".join(text.split())


def pool_of(user: str) -> str:
    """``public``, ``test`` or ``clients``: a fixed hash of the user name decides."""
    h = int.from_bytes(hashlib.blake2b(user.encode(), digest_size=8).digest(), "big") / 2.0**64
    return "public" if h < PUBLIC_SHARE else "test" if h < PUBLIC_SHARE + TEST_SHARE else "clients"


def read_users(path: Path) -> dict[str, list[tuple[list[str], list[int]]]]:
    """``{pool: [(texts, labels) per user]}``, users in the file's order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        users = data["users"]
        pools: dict[str, list] = {"public": [], "test": [], "clients": [], "names": []}
        for user in users:
            record = data["user_data"][user]
            texts = [normalise(str(row[4])) for row in record["x"]]
            labels = [int(v) for v in record["y"]]
            if len(texts) != len(labels) or not texts:
                raise ValueError(f"user {user!r} has {len(texts)} tweets and {len(labels)} labels")
            pool = pool_of(user)
            pools[pool].append((texts, labels))
            if pool == "clients":
                pools["names"].append(user)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise DataError(f"{path} is not LEAF's Sentiment140 file ({type(exc).__name__}: {exc})") from None
    return pools


def public_pool(root: str | os.PathLike | None = None) -> tuple[list[str], list[int]]:
    """The public pool's tweets and labels (for the tokenizer and public pretraining only)."""
    pools = read_users(find_file(root))
    texts = [t for ts, _ in pools["public"] for t in ts]
    labels = [v for _, ys in pools["public"] for v in ys]
    return texts, labels


def default_tokenizer(root: str | os.PathLike | None = None) -> str:
    """The default tokenizer's JSON: byte-level BPE trained on the public pool only."""
    return train_bpe(public_pool(root)[0], VOCAB_SIZE)


def load_sent140(root: str | os.PathLike | None = None, tokenizer: str | None = None) -> FederatedDataset:
    """Sentiment140 as token ids; ``tokenizer``: a tokenizer's JSON (None: :func:`default_tokenizer`)."""
    path = find_file(root)
    tokenizer = tokenizer or default_tokenizer(root)
    key = source_key(f"sent140/{FORMAT_VERSION}", SEQ_LEN, PUBLIC_SHARE, TEST_SHARE,
                     tokenizer_digest(tokenizer), files=[path])

    def build(out: Path) -> dict:
        pools = read_users(path)
        train_texts = [t for ts, _ in pools["clients"] for t in ts]
        test_texts = [t for ts, _ in pools["test"] for t in ts]
        np.save(out / "x_train.npy", encode_padded(tokenizer, train_texts, SEQ_LEN))
        np.save(out / "y_train.npy", np.array([v for _, ys in pools["clients"] for v in ys], np.int64))
        np.save(out / "x_test.npy", encode_padded(tokenizer, test_texts, SEQ_LEN))
        np.save(out / "y_test.npy", np.array([v for _, ys in pools["test"] for v in ys], np.int64))
        np.save(out / "test_user_ids.npy", np.repeat(np.arange(len(pools["test"])), [len(ys) for _, ys in pools["test"]]))
        np.save(out / "natural_ids.npy",
                np.repeat(np.arange(len(pools["clients"])), [len(ys) for _, ys in pools["clients"]]))
        return {"natural_names": pools["names"], "public_tweets": sum(len(ys) for _, ys in pools["public"])}

    arrays, info = cached_arrays("sent140", key, build, mmap=())
    return FederatedDataset(
        name="sent140",
        x_train=arrays["x_train"], y_train=arrays["y_train"],
        x_test=arrays["x_test"], y_test=arrays["y_test"],
        num_classes=2, input_shape=(SEQ_LEN,), task="text_classification",
        natural_ids=arrays["natural_ids"], natural_names=tuple(info["natural_names"]),
        vocab_size=vocabulary_size(tokenizer), tokenizer=tokenizer, test_user_ids=arrays["test_user_ids"],
    )
