"""Secure aggregation with SecAgg+ semantics: the server learns only the sum of the survivors' vectors.

Bell, Bonawitz, Gascon, Lepoint & Raykova (CCS 2020), on Bonawitz et al. (CCS 2017). For one round,
over vectors of integers modulo ``2^b`` (:mod:`fedpriv.privacy.distributed` encodes them):

1. **advertise**: each client draws two key pairs (one to encrypt shares, one to agree masks);
2. **share keys**: the server sends each client its neighbours' public keys (a random ring, ``k``
   neighbours each); the client draws a self-mask seed ``b_u`` and splits ``b_u`` and its mask
   secret key into ``k + 1`` Shamir shares (any ``r`` reconstruct), one encrypted for each
   neighbour and one of the seed kept (a survivor reveals its own);
3. **masked input**: the server forwards each client the shares addressed to it; the client sends
   ``y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^b`` (``s_uv`` agreed with neighbour ``v``; the
   signs cancel in the sum);
4. **unmask**: the server names, for each client that sent ``y_u``, which of its neighbours survived
   and which dropped; the client returns its shares of the survivors' ``b`` and of the dropped ones'
   mask keys (never both for one neighbour), and the server removes every mask.

The server then holds ``sum_{survivors} x_u mod 2^b`` and nothing else about any ``x_u`` (each
``y_u`` alone is uniform modulo ``2^b``). A round with fewer than ``min_survivors`` masked inputs,
or a secret with fewer than ``r`` shares back, is dropped: nothing is released.

Threat model: an honest-but-curious server, and up to ``r - 1`` clients of any one neighbourhood
colluding with it (``r > (k + 1) / 2`` keeps a majority of a neighbourhood needed). A *malicious* server could lie to different clients about who dropped and so
recover one client's ``b`` and mask key from two disjoint groups (Bell et al. defend with signed
consistency checks, not implemented); each client refuses a request that names fewer than
``min_survivors`` survivors or a neighbour as both survivor and dropped.

The cryptography is Flower's (``flwr.common.secure_aggregation``: ECDH + HKDF key agreement,
Fernet encryption, Shamir shares over GF(2^128); key pairs from ``flwr.supercore.primitives``).
The mask PRG is not Flower's ``pseudo_rand_gen``: it folds the seed to 32 bits and seeds numpy's
Mersenne twister, which a server could search; here it is AES-256 in counter mode keyed by the full
32-byte secret (``cryptography``), whose 64-bit words reduced modulo ``2^b`` are exactly uniform.
"""

from __future__ import annotations

import base64
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from Crypto.Protocol.SecretSharing import Shamir
from Crypto.Util.Padding import pad, unpad
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

_MASKING = True  # tests switch it off to show the uniformity test can fail; never off in a run


class SecAggError(RuntimeError):
    """The round cannot be completed safely (too few survivors or shares, an inconsistent request)."""


@dataclass(frozen=True)
class SecAggParams:
    """One round's public parameters.

    Args (privacy meaning):
        bits: vectors and the sum live modulo ``2^b`` (at most 62).
        dim: numbers per vector.
        neighbours: ``k``, how many clients each client shares its secrets with (SecAgg+'s graph).
        threshold: ``r``, shares that reconstruct a secret: fewer than ``r`` colluders of one
            neighbourhood learn nothing of a client's masks.
        min_survivors: fewest masked inputs a sum may hold; below, the round is dropped.
    """

    bits: int
    dim: int
    neighbours: int
    threshold: int
    min_survivors: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 62:
            raise ValueError(f"bits must be in 1..62, got {self.bits}")
        if not 1 <= self.threshold <= self.neighbours + 1:  # k neighbours and the client itself hold shares
            raise ValueError(f"threshold ({self.threshold}) must be in 1..neighbours + 1 ({self.neighbours + 1})")


def prg(seed: bytes, dim: int, bits: int) -> np.ndarray:
    """``dim`` integers uniform modulo ``2^bits`` from a 32-byte seed (AES-256-CTR keystream)."""
    encryptor = Cipher(algorithms.AES(seed[:32]), modes.CTR(b"\0" * 16)).encryptor()
    words = np.frombuffer(encryptor.update(b"\0" * (8 * dim)) + encryptor.finalize(), dtype="<u8")
    return (words & np.uint64((1 << bits) - 1)).astype(np.int64)


def _agreed_seed(private_key: ec.EllipticCurvePrivateKey, public_key: bytes) -> bytes:
    return base64.urlsafe_b64decode(generate_shared_key(private_key, bytes_to_public_key(public_key)))


def _mask_key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    """The mask key from its private scalar: what is secret-shared is these 48 bytes, not the key's
    PEM (~300 bytes: six times the Shamir work, the most expensive step of a round)."""
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1())


def ring_neighbours(clients: list[int], k: int, rng: random.Random) -> dict[int, list[int]]:
    """SecAgg+'s communication graph: a random ring, each client joined to ``k // 2`` on each side
    (everyone to everyone when the cohort is no larger than ``k + 1``)."""
    order = list(clients)
    rng.shuffle(order)
    n = len(order)
    if n <= k + 1:
        return {u: sorted(v for v in order if v != u) for u in order}
    half = k // 2
    return {order[i]: sorted({order[(i + j) % n] for j in range(-half, half + 1) if j != 0}) for i in range(n)}


def to_json(obj: Any) -> Any:
    """JSON-safe copy: bytes -> {"b64": ...}, int keys -> str."""
    if isinstance(obj, bytes):
        return {"b64": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


def from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"b64"}:
            return base64.b64decode(obj["b64"])
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------ the client


@dataclass
class SecAggClient:
    """One client's side of one round. Its state (keys, seed, shares received) is a dict of bytes
    (:meth:`state_dict`), so that a virtual client can be served by different workers per stage."""

    cid: int
    params: SecAggParams
    keys: dict[str, bytes] = field(default_factory=dict)
    neighbours: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # v -> (enc pk, mask pk)
    received: dict[int, bytes] = field(default_factory=dict)  # v -> ciphertext of v's shares for me
    self_seed: bytes = b""

    def advertise(self) -> dict[str, bytes]:
        enc_sk, enc_pk = generate_key_pairs()
        mask_sk, mask_pk = generate_key_pairs()
        scalar = mask_sk.private_numbers().private_value.to_bytes(48, "big")
        self.keys = {"enc_sk": private_key_to_bytes(enc_sk), "mask_scalar": scalar,
                     "enc_pk": public_key_to_bytes(enc_pk), "mask_pk": public_key_to_bytes(mask_pk)}
        return {"enc_pk": self.keys["enc_pk"], "mask_pk": self.keys["mask_pk"]}

    def share_keys(self, neighbours: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Shares of my self-mask seed and my mask key, one ciphertext per neighbour."""
        if len(neighbours) + 1 < self.params.threshold:
            raise SecAggError(f"{len(neighbours)} neighbours and I cannot hold {self.params.threshold} shares")
        self.neighbours = dict(neighbours)
        self.self_seed = os.urandom(32)
        order = sorted(neighbours)  # and myself, last: my own share of my seed counts when I survive
        seed_shares = create_shares(self.self_seed, self.params.threshold, len(order) + 1)
        key_shares = create_shares(self.keys["mask_scalar"], self.params.threshold, len(order) + 1)
        enc_sk = bytes_to_private_key(self.keys["enc_sk"])
        self.keys["own_seed_share"] = seed_shares[-1]
        out = {}
        for v, b_share, sk_share in zip(order, seed_shares, key_shares):
            key = generate_shared_key(enc_sk, bytes_to_public_key(neighbours[v][0]))
            out[v] = encrypt(key, share_keys_plaintext_concat(self.cid, v, b_share, sk_share))
        return out

    def masked_input(self, received: dict[int, bytes], vector: np.ndarray) -> np.ndarray:
        """``y = x + PRG(b) + sum_v sign(u, v) PRG(s_uv) mod 2^b`` over neighbours that shared keys."""
        self.received = {v: c for v, c in received.items() if v in self.neighbours}
        m, p = 1 << self.params.bits, self.params
        x = np.mod(np.asarray(vector, dtype=np.int64), m)
        if x.size != p.dim:
            raise ValueError(f"vector has {x.size} numbers, the round {p.dim}")
        if not _MASKING:
            return x
        y = x + prg(self.self_seed, p.dim, p.bits)
        mask_sk = _mask_key(self.keys["mask_scalar"])
        for v in self.received:  # only neighbours still in the protocol (they sent me shares)
            mask = prg(_agreed_seed(mask_sk, self.neighbours[v][1]), p.dim, p.bits)
            y = y + mask if self.cid < v else y - mask
            y = np.mod(y, m)
        return np.mod(y, m)

    def unmask(self, survivors: list[int], dropped: list[int]) -> dict[str, dict[int, bytes]]:
        """My shares of each surviving neighbour's self-mask seed and each dropped one's mask key."""
        both = set(survivors) & set(dropped)
        if both:
            raise SecAggError(f"the server asked for both secrets of client(s) {sorted(both)}")
        out: dict[str, dict[int, bytes]] = {"seed": {self.cid: self.keys["own_seed_share"]}, "key": {}}
        enc_sk = bytes_to_private_key(self.keys["enc_sk"])
        for v in list(survivors) + list(dropped):
            if v not in self.received:
                continue
            key = generate_shared_key(enc_sk, bytes_to_public_key(self.neighbours[v][0]))
            src, dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, self.received[v]))
            if (src, dst) != (v, self.cid):
                raise SecAggError(f"a share from client {v} was addressed {src} -> {dst}")
            if v in survivors:
                out["seed"][v] = b_share
            else:
                out["key"][v] = sk_share
        return out

    def state_dict(self) -> dict:
        return {"cid": self.cid, "keys": self.keys, "self_seed": self.self_seed,
                "neighbours": {str(v): list(k) for v, k in self.neighbours.items()},
                "received": {str(v): c for v, c in self.received.items()}}

    @classmethod
    def from_state_dict(cls, params: SecAggParams, state: dict) -> SecAggClient:
        return cls(int(state["cid"]), params, dict(state["keys"]),
                   {int(v): (k[0], k[1]) for v, k in state["neighbours"].items()},
                   {int(v): c for v, c in state["received"].items()}, state["self_seed"])


# ------------------------------------------------------------------------------------ the server


class SecAggServer:
    """The server's side of one round: routes keys and shares, and unmasks the sum."""

    def __init__(self, params: SecAggParams, cohort: list[int], rng: random.Random | None = None):
        self.params = params
        self.graph = ring_neighbours(sorted(cohort), params.neighbours, rng or random.SystemRandom())
        self.public: dict[int, dict[str, bytes]] = {}
        self.shared: set[int] = set()
        self.masked: dict[int, np.ndarray] = {}

    def keys_for(self, advertised: dict[int, dict[str, bytes]]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """Stage 2's message to each client that advertised: its advertising neighbours' keys."""
        self.public = dict(advertised)
        return {u: {v: (advertised[v]["enc_pk"], advertised[v]["mask_pk"]) for v in self.graph[u] if v in advertised}
                for u in advertised}

    def forward_shares(self, shares: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Stage 3's message to each client that shared: the ciphertexts addressed to it."""
        self.shared = set(shares)
        out: dict[int, dict[int, bytes]] = {u: {} for u in shares}
        for src, by_dst in shares.items():
            for dst, ciphertext in by_dst.items():
                if dst in out and dst in self.graph[src]:
                    out[dst][src] = ciphertext
        return out

    def unmask_requests(self, masked: dict[int, np.ndarray]) -> dict[int, tuple[list[int], list[int]]]:
        """Stage 4's message to each client that sent a masked input: (surviving, dropped) neighbours.
        Raises :class:`SecAggError` if fewer than ``min_survivors`` sent one (the round is dropped)."""
        self.masked = {u: y for u, y in masked.items() if u in self.shared}
        if len(self.masked) < self.params.min_survivors:
            raise SecAggError(f"{len(self.masked)} masked inputs, fewer than the {self.params.min_survivors} "
                              "a release needs: the round is dropped")
        survivors = set(self.masked)
        dropped = self.shared - survivors
        return {u: (sorted(v for v in self.graph[u] if v in survivors),
                    sorted(v for v in self.graph[u] if v in dropped)) for u in survivors}

    def aggregate(self, revealed: dict[int, dict[str, dict[int, bytes]]]) -> tuple[np.ndarray, list[int]]:
        """The survivors' sum modulo ``2^b`` and who is in it, from stage 4's replies."""
        p, m = self.params, 1 << self.params.bits
        survivors, dropped = set(self.masked), self.shared - set(self.masked)
        seed_shares: dict[int, list[bytes]] = {u: [] for u in survivors}
        key_shares: dict[int, list[bytes]] = {v: [] for v in dropped}
        for reply in revealed.values():
            for u, share in reply.get("seed", {}).items():
                if u in seed_shares:
                    seed_shares[u].append(share)
            for v, share in reply.get("key", {}).items():
                if v in key_shares:
                    key_shares[v].append(share)
        total = np.zeros(p.dim, dtype=np.int64)
        for y in self.masked.values():
            total = np.mod(total + y, m)
        if not _MASKING:
            return total, sorted(survivors)
        for u, shares in seed_shares.items():
            total = np.mod(total - prg(self._combine(shares, u, "self-mask seed"), p.dim, p.bits), m)
        for v, shares in key_shares.items():
            mask_sk = _mask_key(self._combine(shares, v, "mask key"))
            for u in self.graph[v]:
                if u in survivors and u in self.shared:  # u masked with v (v shared keys before dropping)
                    mask = prg(_agreed_seed(mask_sk, self.public[u]["mask_pk"]), p.dim, p.bits)
                    total = np.mod(total - mask if u < v else total + mask, m)  # cancel u's sign(u, v) mask
        return total, sorted(survivors)

    def _combine(self, shares: list[bytes], client: int, what: str) -> bytes:
        if len(shares) < self.params.threshold:
            raise SecAggError(f"{len(shares)} shares of client {client}'s {what}, fewer than the "
                              f"{self.params.threshold} that reconstruct it: the round is dropped")
        return combine_shares(shares[: self.params.threshold])


# Shamir shares in Flower's format (flwr.common.secure_aggregation.crypto.shamir: the secret padded to
# 16-byte blocks, each split with PyCryptodome's Shamir over GF(2^128); a share is a 4-byte little-endian
# index and one 16-byte share per block), so that either side's shares combine with the other's. Written
# here because Flower's helpers start a thread pool per call: for the 32- and 48-byte secrets of a round
# (2-4 blocks) the pool cost 12 ms a call, a third of a client's and half of the server's work.


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` shares of ``secret``, any ``threshold`` of which reconstruct it."""
    padded = pad(secret, 16)
    shares = [bytearray(i.to_bytes(4, "little")) for i in range(1, num + 1)]
    for start in range(0, len(padded), 16):
        for index, piece in Shamir.split(threshold, num, padded[start:start + 16], ssss=False):
            shares[index - 1] += piece
    return [bytes(s) for s in shares]


def combine_shares(shares: list[bytes]) -> bytes:
    """The secret from ``threshold`` (or more) shares made by :func:`create_shares` or Flower's."""
    blocks = (len(shares[0]) - 4) // 16
    indexed = [(int.from_bytes(s[:4], "little"), s[4:]) for s in shares]
    padded = b"".join(Shamir.combine([(i, s[16 * b:16 * (b + 1)]) for i, s in indexed], ssss=False)
                      for b in range(blocks))
    try:
        return unpad(padded, 16)
    except ValueError:
        raise ValueError("Failed to combine shares") from None


# The wire format of a masked vector: ``bits`` bits a number, packed little-endian (numpy's packbits). The
# values are residues modulo 2^bits, so nothing is lost; a 20-bit vector weighs 20/32 of 32-bit words.


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` in ``[0, 2^bits)`` as ``uint8`` bytes, ``bits`` bits each."""
    v = np.asarray(values, dtype=np.uint64)
    if v.size and int(v.max()) >> bits:
        raise ValueError(f"a value does not fit {bits} bits")
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little")


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` int64 values :func:`pack` wrote; a wrong length is a ``ValueError``."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.size != (count * bits + 7) // 8:
        raise ValueError(f"a packed vector of {count} x {bits} bits has {(count * bits + 7) // 8} bytes, got "
                         f"{packed.size} of {packed.dtype}")
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little", count=count * bits)
    weights = (np.uint64(1) << np.arange(bits, dtype=np.uint64))
    return (planes.reshape(count, bits).astype(np.uint64) * weights).sum(axis=1).astype(np.int64)
