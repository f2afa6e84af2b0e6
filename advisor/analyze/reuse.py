"""The reuse structure of a workload: a prefix tree over block hashes, cut into groups, and
how far apart (in time and in blocks) each request's reuse sits from the last use of it.

Input: the concatenated chained block hashes of every request, in arrival order, with their
offsets (`PrefixPass.hashes`, `.hash_offsets`). Output: `ReuseTree` (per request its group,
per group its nodes, parent, members) and `reuse_distances` (per request the LRU stack distance
of the block its hit ends on, and the request that last used it). Plain arrays in and out.

The tree. A node is a chained block hash (it names a whole prefix); `count` is how many requests
contain it. Counts never grow along a chain, so a request's shared nodes (count >= 2) are a
prefix of its chain. The shared nodes form a subtree; cut it at every branch (a node with two or
more shared children) and each unary piece left is a group: it starts below a branch (or at the
root) and ends where the sharing branches again or stops. A request belongs to the group holding
its deepest shared node; requests with no shared node are one-shots. A group's parent is the group
holding its top node's parent: the group whose prefix is the longest proper prefix of it (system
prompt -> tools -> document or session). A session that grows turn by turn is one group (its turns
nest in one unary chain); the documents behind one system prompt are one group each (the prompt's
last block branches into them). A group below a branch with fewer than `min_own_blocks` blocks of
its own is folded into its parent (members, and children re-parented): a few questions that happen
to start with the same words are not a family of their own. Counts depend on which requests contain a prefix, not on their
order, so the groups are the same under any row order.

Reuse distance. When request r's hit ends on node x (its deepest block some earlier request also
had), the last earlier request to contain x is j. Under LRU, r finds x only if the cache held every
distinct block touched since j used x: j's blocks after x, the requests in between, r's blocks
before x (the ancestors of x, which j also has). That set is exactly the distinct blocks of
requests j..r-1, so that count (x included) is the stack distance: an LRU cache of at least that
many blocks keeps r's hit, a smaller one loses it (Mattson's stack property). Only full prompt
blocks count; decode blocks, partial blocks and blocks held by running requests do not.
`reuse_distances_reference` is the readable LRU stack this is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from advisor.compiled import compiled


@dataclass(frozen=True)
class ReuseTree:
    """Groups of requests by the prefixes they share (module docstring). Groups are numbered
    0..G-1 by (more requests using the prefix first, more members, the end node's hash): a
    parent always comes before its children and the numbering ignores row order."""

    group: np.ndarray  # int64 per request: its group, -1 for a one-shot
    top: np.ndarray  # int64 per group: position (into hashes) of its first node's first use
    end: np.ndarray  # int64 per group: position of its deepest node's first use
    top_depth: np.ndarray  # int64 per group: blocks above the group (its parent's prefix)
    end_depth: np.ndarray  # int64 per group: blocks of its whole prefix
    parent: np.ndarray  # int64 per group: the parent group, -1 at the top level
    users: np.ndarray  # int64 per group: requests that contain its first node (itself + below)
    end_users: np.ndarray  # int64 per group: requests that contain its whole prefix
    owner: np.ndarray  # int64 per group: the first request with its whole prefix

    @property
    def num_groups(self) -> int:
        return len(self.top)

    def level(self) -> np.ndarray:
        """Depth of each group in the group tree: 1 at the top level."""
        out = np.zeros(self.num_groups, dtype=np.int64)
        for g in range(self.num_groups):  # parents are numbered first
            out[g] = 1 if self.parent[g] < 0 else out[self.parent[g]] + 1
        return out


@dataclass(frozen=True)
class BlockNodes:
    """The prefix tree's nodes: every position of the concatenated hashes named by its node."""

    offsets: np.ndarray  # per request + 1: where its positions start
    node: np.ndarray  # per position: node id
    req: np.ndarray  # per position: request
    depth: np.ndarray  # per position: blocks before it in its request
    first: np.ndarray  # per node: first position holding it
    count: np.ndarray  # per node: requests containing it
    prev: np.ndarray  # per position: the previous position with the same node, -1 if none


def block_nodes(hashes: np.ndarray, offsets: np.ndarray) -> BlockNodes:
    """Name each position of `hashes` (requests back to back, `offsets`) by its tree node.
    Per-position arrays are int32 (positions < 2**31), so the tree costs ~17 bytes per block."""
    t = len(hashes)
    assert t < 2**31
    lens = np.diff(offsets)
    req = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
    depth = (np.arange(t, dtype=np.int64) - offsets[req]).astype(np.int32)
    order = np.argsort(hashes, kind="stable").astype(np.int32)  # grouped by hash, in arrival order
    new = np.ones(t, dtype=bool)
    sorted_h = hashes[order]
    np.not_equal(sorted_h[1:], sorted_h[:-1], out=new[1:])
    del sorted_h
    starts = np.flatnonzero(new)
    node = np.empty(t, dtype=np.int32)
    node[order] = (np.cumsum(new) - 1).astype(np.int32)
    prev = np.full(t, -1, dtype=np.int32)
    same = ~new[1:]
    prev[order[1:][same]] = order[:-1][same]
    first = order[starts].astype(np.int64)
    count = np.diff(np.append(starts, t)).astype(np.int64)
    return BlockNodes(offsets, node, req, depth, first, count, prev)


def _segments(nd: BlockNodes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut the shared subtree at its branches: per position whether it is shared and its piece
    (-1 if not shared), the pieces' tops (first positions), and each node's parent node."""
    shared = nd.count[nd.node] >= 2  # per position; a prefix of each request's chain
    fd = nd.depth[nd.first]  # per node: its depth
    parent_node = np.where(fd > 0, nd.node[np.maximum(nd.first - 1, 0)], -1)
    shared_node = nd.count >= 2
    kids = np.bincount(parent_node[shared_node & (parent_node >= 0)], minlength=len(nd.count))
    is_top_node = shared_node & ((parent_node < 0) | (kids[np.maximum(parent_node, 0)] >= 2))
    # forward-fill each shared position with its latest top: a request's shared positions start
    # with a top (depth 0 has no parent), so the fill never crosses into another request's chain
    top_pos = np.where(shared & is_top_node[nd.node], np.arange(len(shared), dtype=np.int32), -1).astype(np.int32)
    np.maximum.accumulate(top_pos, out=top_pos)
    top_of = nd.first[nd.node[np.maximum(top_pos, 0)]][shared]  # a piece is named by its top's first position
    del top_pos
    tops = np.unique(top_of)
    seg = np.full(len(shared), -1, dtype=np.int32)
    seg[shared] = np.searchsorted(tops, top_of)
    return shared, seg, tops, parent_node


def reuse_tree(hashes: np.ndarray, nd: BlockNodes, min_own_blocks: int = 1) -> ReuseTree:
    """Cut the shared prefix tree into groups (module docstring); `nd` = block_nodes(hashes, ...);
    a group below a branch whose own part is shorter than `min_own_blocks` is folded into its parent."""
    offsets = nd.offsets
    n = len(offsets) - 1
    if not (nd.count >= 2).any():
        e = np.empty(0, dtype=np.int64)
        return ReuseTree(np.full(n, -1, dtype=np.int64), e, e, e, e, e, e, e, e)
    shared, seg, tops, parent_node = _segments(nd)
    pos = np.arange(len(hashes), dtype=np.int32)
    g_count = len(tops)
    end_depth = np.full(g_count, -1, dtype=np.int64)
    np.maximum.at(end_depth, seg[shared], nd.depth[shared])
    ends = shared & (nd.depth == end_depth[np.maximum(seg, 0)])
    end = np.full(g_count, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(end, seg[ends], pos[ends])  # the end node's first use
    top_parent = parent_node[nd.node[tops]]
    parent = np.where(top_parent >= 0, seg[nd.first[np.maximum(top_parent, 0)]], -1)
    n_shared = np.bincount(nd.req[shared], minlength=n)
    last = offsets[:-1] + n_shared - 1
    group = np.where(n_shared > 0, seg[np.maximum(last, 0)], -1)
    if min_own_blocks > 1:
        kept, new_of = _fold_short(parent, end_depth + 1 - nd.depth[tops], nd.depth[tops], min_own_blocks)
        group = np.where(group >= 0, new_of[np.maximum(group, 0)], -1)
        parent = parent[kept]
        parent = np.where(parent >= 0, new_of[np.maximum(parent, 0)], -1)
        tops, end, end_depth = tops[kept], end[kept], end_depth[kept]
        g_count = len(kept)
    members = np.bincount(group[group >= 0], minlength=g_count)
    users = nd.count[nd.node[tops]]
    end_hash = hashes[end]
    rank = np.lexsort((end_hash, -members, -users))  # canonical numbering (class docstring)
    renum = np.empty(g_count, dtype=np.int64)
    renum[rank] = np.arange(g_count, dtype=np.int64)
    parent = np.where(parent >= 0, renum[np.maximum(parent, 0)], -1)[rank]
    return ReuseTree(
        group=np.where(group >= 0, renum[np.maximum(group, 0)], -1),
        top=tops[rank], end=end[rank], top_depth=nd.depth[tops][rank].astype(np.int64),
        end_depth=end_depth[rank] + 1, parent=parent, users=users[rank], end_users=nd.count[nd.node[end]][rank],
        owner=nd.req[end][rank].astype(np.int64),
    )


def _fold_short(parent: np.ndarray, own: np.ndarray, top_depth: np.ndarray,
                min_own: int) -> tuple[np.ndarray, np.ndarray]:
    """The groups kept, and each group's index among them after folding every group below a
    branch with fewer than `min_own` blocks of its own into its nearest kept ancestor."""
    final = np.arange(len(parent), dtype=np.int64)
    fold = (parent >= 0) & (own < min_own)
    for g in np.argsort(top_depth, kind="stable").tolist():  # a parent's top is shallower
        if fold[g]:
            final[g] = final[parent[g]]
    kept = np.flatnonzero(final == np.arange(len(parent)))
    index = np.full(len(parent), -1, dtype=np.int64)
    index[kept] = np.arange(len(kept), dtype=np.int64)
    return kept, index[final]


# --- reuse distances ---------------------------------------------------------------------
@dataclass(frozen=True)
class Reuse:
    """Per request (arrays of length N): where its hit ends and how far back it was last used."""

    blocks: np.ndarray  # int64: leading blocks some earlier request also had (0: no hit)
    last_user: np.ndarray  # int64: the last earlier request holding its deepest hit block, -1 if none
    distance: np.ndarray  # int64: distinct blocks of requests last_user..r-1 (LRU stack distance), 0 if none


def reuse_distances(nd: BlockNodes) -> Reuse:
    """Each request's hit block, its last earlier user and the stack distance (module docstring)."""
    offsets = nd.offsets
    n = len(offsets) - 1
    seen = nd.first[nd.node] < offsets[nd.req]  # first used by an earlier request
    blocks = np.bincount(nd.req[seen], minlength=n).astype(np.int64)
    hit = np.flatnonzero(blocks > 0)
    x = offsets[hit] + blocks[hit] - 1
    assert (nd.prev[x] >= 0).all() and (nd.req[nd.prev[x]] < hit).all()
    last_user = np.full(n, -1, dtype=np.int64)
    last_user[hit] = nd.req[nd.prev[x]]
    distance = np.zeros(n, dtype=np.int64)
    lo, hi = offsets[last_user[hit]], offsets[hit]
    order = np.argsort(hi, kind="stable")
    counts = np.empty(len(hit), dtype=np.int64)
    counts[order] = _distinct_in_ranges(nd.prev, lo[order], hi[order])
    distance[hit] = counts
    return Reuse(blocks, last_user, distance)


@compiled
def _distinct_in_ranges(prev: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Distinct values in positions [lo[q], hi[q]) for queries sorted by hi: one sweep keeping a
    Fenwick tree with a 1 at each value's latest position so far (`prev` links equal values)."""
    t = len(prev)
    tree = np.zeros(t + 1, dtype=np.int64)
    out = np.zeros(len(lo), dtype=np.int64)
    i = 0
    for q in range(len(lo)):
        while i < hi[q]:
            if prev[i] >= 0:
                k = prev[i] + 1
                while k <= t:
                    tree[k] -= 1
                    k += k & -k
            k = i + 1
            while k <= t:
                tree[k] += 1
                k += k & -k
            i += 1
        total = 0
        k = hi[q]
        while k > 0:
            total += tree[k]
            k -= k & -k
        k = lo[q]
        while k > 0:
            total -= tree[k]
            k -= k & -k
        out[q] = total
    return out


def reuse_distances_reference(hash_lists: list[list[int]]) -> list[int]:
    """The readable twin of `reuse_distances(...).distance`: replay every request's blocks through
    an LRU stack (most recent last) and read, at each request's deepest hit block, how deep in the
    stack it sits (1 = most recently used)."""
    stack: list[int] = []
    seen: set[int] = set()
    out = []
    for hs in hash_lists:
        hit = 0
        while hit < len(hs) and hs[hit] in seen:
            hit += 1
        dist = 0
        for d, h in enumerate(hs):
            if d == hit - 1:
                dist = len(stack) - stack.index(h)
            if h in stack:
                stack.remove(h)
            stack.append(h)
        seen.update(hs)
        out.append(dist)
    return out
