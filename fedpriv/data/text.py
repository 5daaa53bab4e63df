"""Tokenisation for the text data sets, with Hugging Face ``tokenizers`` and nothing downloaded.

A text data set's ids come from one :class:`tokenizers.Tokenizer`, kept as its JSON (what
``tokenizer.json`` in a Hugging Face model folder holds), so the same tokenizer can be saved
beside a model (``scripts/pretrain_public.py``), compared with a checkpoint's own and rebuilt
byte for byte in every process.

Privacy: a tokenizer trained on client text would leak it (its merges and vocabulary are a
function of the text, and it is published with the model). The default tokenizers here are
trained on **public** text only (a data set's stated public pool), or fixed in advance
(Shakespeare's character table), never on a client's rows.

Special ids: ``[PAD]`` is 0 (padding, masked out of attention), ``[UNK]`` 1, ``[EOS]`` 2: every
encoded text ends with ``[EOS]`` before its padding, so a sequence classifier reads the last real
position and that position has seen the whole text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .base import DataError

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"
SPECIALS = (PAD, UNK, EOS)
PAD_ID = 0
TOKENIZER_FILE = "tokenizer.json"  # the name a Hugging Face model folder gives it


def train_bpe(texts: Iterable[str], vocab_size: int) -> str:
    """A byte-level BPE tokenizer trained on ``texts`` (public text only); returns its JSON.

    Deterministic for the same texts, so every process and the pretraining script agree.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok.to_str()


def character_tokenizer(alphabet: str, unknown: str = UNK) -> str:
    """A one-character-per-token tokenizer (WordLevel over single characters); returns its JSON.

    Id 0 is ``unknown`` (the character data sets reserve 0 for any character outside ``alphabet``),
    then ``alphabet`` in order, so its ids equal :func:`fedpriv.data.shakespeare.encode`'s.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {unknown: 0, **{c: i for i, c in enumerate(alphabet, start=1)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unknown))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, newline too
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def load_tokenizer(source: str | Path):
    """A :class:`tokenizers.Tokenizer` from its JSON text or from a ``tokenizer.json`` file."""
    from tokenizers import Tokenizer

    text = str(source)
    if text.lstrip().startswith("{"):
        return Tokenizer.from_str(text)
    path = Path(text)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own Exception type for a bad file
        raise DataError(f"{path} is not a tokenizers JSON file ({type(exc).__name__}: {str(exc)[:120]})") from None


def tokenizer_digest(tokenizer_json: str) -> str:
    """A short hash of a tokenizer's vocabulary and rules: the same digest means the same ids."""
    canonical = json.dumps(json.loads(tokenizer_json), sort_keys=True)
    return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


def vocabulary_size(tokenizer_json: str) -> int:
    """Rows an embedding needs for this tokenizer: the largest id plus one."""
    return load_tokenizer(tokenizer_json).get_vocab_size(with_added_tokens=True)


def encode_padded(tokenizer_json: str, texts: Sequence[str], seq_len: int) -> np.ndarray:
    """``int64 (len(texts), seq_len)``: each text's ids, then ``[EOS]``, right-padded with ``[PAD]``.

    A text longer than ``seq_len - 1`` tokens is truncated (its ``[EOS]`` kept), so every row
    has exactly one ``[EOS]``, at its last real position.
    """
    tok = load_tokenizer(tokenizer_json)
    eos = tok.token_to_id(EOS)
    if eos is None or tok.token_to_id(PAD) != PAD_ID:
        raise DataError(f"the tokenizer needs {PAD} as id {PAD_ID} and an {EOS} token")
    out = np.full((len(texts), seq_len), PAD_ID, dtype=np.int64)
    for i, enc in enumerate(tok.encode_batch(list(texts), add_special_tokens=False)):
        ids = enc.ids[: seq_len - 1] + [eos]
        out[i, : len(ids)] = ids
    return out
