"""vLLM's block hashes: chained hashes of full blocks, from token ids or a hash trace's ids.

Inputs: one request's token ids (with its LoRA name and cache_salt) or its trace hash ids,
and a block size. Outputs: one hash per FULL block (a partial tail block has none),
`h_i = H(h_{i-1}, tokens of block i, extra keys)` with the LoRA name on every block and
`cache_salt` on block 0 only (docs/design.md §5). `advisor.sim.cache` keys its blocks by them.

Hash values need not equal vLLM's, only their equality: `hash_block` is blake2b with a
16-byte digest, so two different prefixes collide with probability about n^2 / 2^129
for n distinct blocks (below 1e-24 for a billion blocks).

`mix64` is the analysis' cheap 64-bit scrambler (splitmix64's finalizer) on uint64
arrays: the fast path's block keys (advisor.sim.fast.sequential) and the analysis hashes
(advisor.analyze.hashing) are built from it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

import numpy as np

BlockHash = bytes
_NONE_HASH: BlockHash = hashlib.blake2b(b"pc-advise none hash", digest_size=16).digest()
_MIX_M1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (wrapping arithmetic): a bijective scrambler."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX_M1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX_M2
    return x ^ (x >> np.uint64(31))


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple[str, ...] | None = None
) -> BlockHash:
    """The hash of one full block, chained from its parent (None for block 0)."""
    h = hashlib.blake2b(parent if parent is not None else _NONE_HASH, digest_size=16)
    h.update(len(token_ids).to_bytes(4, "little"))
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(b"\x00" + repr(extra_keys).encode())
    return h.digest()


def request_block_hashes(
    token_ids: Sequence[int], block_size: int, lora: str | None = None, cache_salt: str | None = None
) -> list[BlockHash]:
    """Chained hashes of the full blocks of one request (a partial tail block has none)."""
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for i in range(len(token_ids) // block_size):
        extra: tuple[str, ...] = (("lora:" + lora,) if lora else ()) + (
            ("salt:" + cache_salt,) if (i == 0 and cache_salt) else ()
        )
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra or None)
        hashes.append(parent)
    return hashes


def chain_trace_hash_ids(hash_ids: Sequence[int], num_tokens: int, block_size: int) -> list[BlockHash]:
    """Block hashes of a hash-trace request: one id per trace block, chained like tokens.

    The last id covers a partial block when `num_tokens % block_size`; it is dropped,
    as vLLM never hashes a partial block.
    """
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for hid in hash_ids[: num_tokens // block_size]:
        parent = hash_block(parent, (int(hid),))
        hashes.append(parent)
    return hashes
