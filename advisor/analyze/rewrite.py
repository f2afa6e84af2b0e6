"""Cache breakers fixed: analyze's findings applied to the prompts as token rewrites.

Inputs: request ids and token ids in log (arrival) order, prefixes.parquet (`resembles_id`
per request) and stats.json (`breakers`: `label`, `position_token`/`end_token` or
`position_block`; `analysis_block_size`). Output: the token lists with each paired request's
differing regions fixed as the breaker's label says, and a record of what was rewritten (or
why nothing could be). The simulator predicts and the replay measures the log "after the
fixes" from these lists; `only` picks some breakers, to price each fix on its own.

Each paired request is re-aligned with its (already rewritten) partner over the whole prompt
(advisor/analyze/align.py); each region is matched to the breaker whose span holds it and
fixed the way that breaker's fix would change the prompt:

- a value (`timestamp`, `uuid/id`, `varying text`): when both spans are short (at most
  `MAX_VALUE_SPAN` tokens) the span takes the partner's value, as moving it out of the shared
  part or rounding it makes the shared part equal; a longer span (a document, a profile) is
  moved to the end of the prompt (the latest user turn), which is the fix itself: its own
  tokens stay unshared, and a later turn that repeats the rewritten prompt inherits it;
- `whitespace`, `formatting`: the span takes the partner's form (one serializer);
- an order (`tool order`, `schema key order`, `JSON key order`, `reordered content`): only when
  the region is the same tokens in another order, it takes the partner's order, as sorting would.

A family of near-identical prompts so converges on its first member, and a later request that
began with the same rewritten head (the next turn of a conversation) gets the same rewrite.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from advisor.analyze.align import Region, align, regions
from advisor.analyze.labels import NORMALIZE_LABELS, ORDER_LABELS, VALUE_LABELS

MAX_VALUE_SPAN = 64  # tokens: a date, an id or a name is far shorter; longer values are moved


def fix_breakers(
    request_ids: Sequence[str], token_ids: Sequence[Sequence[int] | np.ndarray], prefixes: pa.Table | None,
    stats: dict[str, Any] | None, *, synthetic: bool = False, only: set[int] | None = None,
) -> tuple[list[Sequence[int] | np.ndarray] | None, dict[str, Any]]:
    """(the token lists with analyze's cache breakers fixed, what was rewritten), or (None,
    {"reason": why not}). Requests are rewritten in order against their (already rewritten)
    partner. `only`: indices into stats["breakers"] to apply (None: all of them). A rewritten
    row is an int32 array; an unchanged one is the row given (no copy).
    `synthetic`: the token ids are stand-ins (a hash trace): nothing can be fixed."""
    if stats is None or prefixes is None:
        return None, {"reason": "analyze has not run (no stats.json / prefixes.parquet), so there are no "
                                "breaker findings to apply; run `pc-advise analyze RUN` first"}
    if synthetic:
        return None, {"reason": "a hash trace has no token content: breakers cannot be found or fixed"}
    breakers = stats.get("breakers") or []
    if not breakers:
        return None, {"reason": "analyze found no cache breaker in this log: there is nothing to fix, so (c) "
                                "would be (a)"}
    block = int(stats.get("analysis_block_size") or (stats.get("options") or {}).get("analysis_block_size") or 16)
    spans = _spans(breakers, block, only)
    rows = prefixes.select(["request_id", "resembles_id"]).to_pylist()
    partner = {r["request_id"]: r["resembles_id"] for r in rows if r["resembles_id"]}
    index = {rid: i for i, rid in enumerate(request_ids)}
    tokens = list(token_ids)  # rows are replaced, never changed in place: no copy of each prompt
    applied: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    # A rewritten prompt's old head -> its new head, by head length: later requests that
    # carried the same head (the next turns of a conversation, the rest of a task) get the
    # same fix, as they would from a client that fixed its prompt.
    heads = _Heads()
    inherited = changed = 0
    for i, rid in enumerate(request_ids):
        own = tokens[i]
        length, new_head = heads.longest(own)
        if new_head is not None:
            tokens[i] = np.concatenate([new_head, np.asarray(own[length:], dtype=np.int32)])
            inherited += 1
        if rid not in partner or tokens[i] is not own:
            continue
        a = index.get(partner[rid])
        if a is None or a >= i:
            skipped["its partner is not among the replayed requests"] += 1
            continue
        new, cut_old, cut_new, new_a = _fix_request(np.asarray(tokens[a], dtype=np.int64),
                                                    np.asarray(own, dtype=np.int64), spans, applied, skipped)
        if new is not None:
            tokens[i] = new
            heads.add(cut_old, own[:cut_old], new[:cut_new])
            changed += 1
        if new_a is not None:
            heads.add(len(new_a), tokens[a], new_a)
            tokens[a] = new_a
            changed += 1
    if not applied:
        found = ", ".join(sorted({str(breakers[k]["label"]) for k in range(len(breakers)) if only is None or k in only}))
        why = "; ".join(f"{n} regions: {r}" for r, n in skipped.most_common()) or "no request pairs"
        return None, {"reason": f"analyze's breakers ({found}) give no rewrite this replay can apply safely ({why})"}
    before = sum(len(t) for t in token_ids)
    after = sum(len(t) for t in tokens)
    return tokens, {
        "method": "each paired request is re-aligned with its earlier partner; a short differing value takes the "
                  "partner's value, a long one is moved to the end of the prompt, whitespace and formatting take "
                  "the partner's form, a reordered region takes the partner's order; later requests that began "
                  "with the same rewritten head get the same rewrite (same_head_requests)",
        "rewritten_requests": changed + inherited, "by_label": dict(applied),
        "same_head_requests": inherited,
        "skipped": dict(skipped), "prompt_tokens_before": before, "prompt_tokens_after": after,
    }


class _Heads:
    """Rewritten heads: a prompt's old head -> its new head, found for a later prompt by the
    longest old head it begins with. A head is looked up by its last TAIL tokens first, and
    by all of its tokens only where those match: each prompt is checked against every head
    length, and building the whole key of each would cost the prompt's length each time."""

    TAIL = 16

    def __init__(self) -> None:
        self._by_length: dict[int, tuple[set[bytes], dict[bytes, np.ndarray]]] = {}

    def add(self, length: int, old: Sequence[int], new: np.ndarray) -> None:
        """`old` -> `new`, found for prompts whose first `length` tokens are `old`."""
        tails, whole = self._by_length.setdefault(length, (set(), {}))
        tails.add(_head_key(old[max(0, len(old) - self.TAIL):]))
        whole[_head_key(old)] = new

    def longest(self, tokens: Sequence[int]) -> tuple[int, np.ndarray | None]:
        """(the length of the longest old head `tokens` begins with and is longer than, its new
        head), or (0, None)."""
        for length in sorted(self._by_length, reverse=True):
            if len(tokens) <= length:
                continue
            tails, whole = self._by_length[length]
            if _head_key(tokens[max(0, length - self.TAIL):length]) not in tails:
                continue
            new_head = whole.get(_head_key(tokens[:length]))
            if new_head is not None:
                return length, new_head
        return 0, None


def _head_key(head: Sequence[int]) -> bytes:
    """A head's tokens as a dict key: the same for a list and an int array of the same ids, and
    cheaper to build and hash than a tuple of Python ints."""
    return np.asarray(head, dtype=np.int32).tobytes()


def _spans(breakers: Sequence[dict[str, Any]], block: int, only: set[int] | None) -> list[tuple[int, int, str | None]]:
    """(first, last token, label) per breaker; label None for a breaker not to apply."""
    out = []
    for k, br in enumerate(breakers):
        start = br.get("position_token")
        start = int(start) if start is not None else int(br.get("position_block") or 0) * block
        end = br.get("end_token")
        end = int(end) if end is not None else start + block
        out.append((start - block, end + block, str(br.get("label")) if only is None or k in only else None))
    return out


def _breaker_at(spans: Sequence[tuple[int, int, str | None]], at: int) -> tuple[bool, str | None]:
    """(a breaker holds position `at`, its label if it is to be applied): the nearest start wins."""
    holding = [(abs(at - lo), label) for lo, hi, label in spans if lo <= at <= hi]
    if not holding:
        return False, None
    return True, min(holding, key=lambda x: x[0])[1]


def _fix_request(a: np.ndarray, b: np.ndarray, spans: Sequence[tuple[int, int, str | None]],
                 applied: Counter[str], skipped: Counter[str]) -> tuple[np.ndarray | None, int, int, np.ndarray | None]:
    """(b with its regions fixed, the length of b's head replaced, the length of the new
    head, the partner rewritten too or None), or (None, 0, 0, None) when nothing applies;
    counts what was applied and skipped. A moved value is moved in the partner as well when
    the partner still carries its own (the first request of a family has no partner)."""
    start, runs = align(a, b)
    todo: list[tuple[Region, str]] = []
    for g in regions(a, b, start, runs):
        held, label = _breaker_at(spans, g.b0)
        if not held:
            skipped["no breaker found at this region"] += 1
        elif label is not None:
            todo.append((g, label))
    out, partner = b, a
    cut_old = cut_new = 0
    for g, label in reversed(todo):  # from the end: a fix moves nothing before its region
        new, touched, why = _fix_region(a, out, g, label)
        if new is None:
            skipped[why] += 1
            continue
        applied[label] += 1
        if cut_old == 0:
            cut_old, cut_new = touched, touched + len(new) - len(out)
        else:
            cut_new += len(new) - len(out)
        out = new
        if touched == len(b) and g.a1 > g.a0:  # moved: the partner's own value moves too
            partner = np.concatenate([partner[: g.a0], partner[g.a1 :], partner[g.a0 : g.a1]])
    if out is b:
        return None, 0, 0, None
    return out.astype(np.int32), cut_old, cut_new, (partner.astype(np.int32) if partner is not a else None)


def _fix_region(a: np.ndarray, b: np.ndarray, g: Region, label: str) -> tuple[np.ndarray | None, int, str]:
    """(b with region g fixed as `label` says, the end of what changed in b, ""), or
    (None, 0, why not)."""
    if label in ORDER_LABELS:
        if not g.order:
            return None, 0, f"{label}: the aligned region is not a pure reordering of the partner's"
        return np.concatenate([b[: g.b0], a[g.a0 : g.a1], b[g.b1 :]]), g.b1, ""
    if label in NORMALIZE_LABELS or (label in VALUE_LABELS and max(g.a1 - g.a0, g.b1 - g.b0) <= MAX_VALUE_SPAN):
        return np.concatenate([b[: g.b0], a[g.a0 : g.a1], b[g.b1 :]]), g.b1, ""
    if label in VALUE_LABELS:
        return np.concatenate([b[: g.b0], b[g.b1 :], b[g.b0 : g.b1]]), len(b), ""
    return None, 0, f"{label}: no rewrite is defined for this label"
