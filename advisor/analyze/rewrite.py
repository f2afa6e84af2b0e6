"""Cache breakers fixed: analyze's findings applied to the prompts as token rewrites.

Inputs: request ids and token ids in log (arrival) order, prefixes.parquet (`resembles_id`,
`diverge_token` per request) and stats.json (`breakers` with `label` and `position_block`,
`analysis_block_size`, `options.lead_tokens`). Output: the token lists with each paired
request rewritten so that its breaker's differing span equals its earlier partner's, and a
record of what was rewritten (or why nothing could be). The simulator predicts and the
replay measures the log "after the fixes" from these lists.

Only where the rewrite is the fix the breaker's label names and is safe at the token
level: a short varying value (`timestamp`, `uuid/id`, `whitespace`: the span, at most
`MAX_VALUE_SPAN` tokens, takes the earlier request's value, as "round it" or "move it out"
would make them equal), or a pure reordering (`tool order`, `reordered content`: the
aligned region is the same tokens in another order, and takes the earlier request's order,
as sorting would). Per-user text and unknown breakers are not rewritten (their fix moves
text within the prompt's structure, which a token splice cannot do faithfully).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from advisor.analyze.breakers import _ALIGN_WINDOW_FACTOR as ALIGN_WINDOW_FACTOR
from advisor.analyze.breakers import align_pair

VALUE_LABELS = ("timestamp", "uuid/id", "whitespace")
ORDER_LABELS = ("tool order", "reordered content")
MAX_VALUE_SPAN = 64  # tokens: a date, an id or a run of whitespace is far shorter


def fix_breakers(
    request_ids: Sequence[str], token_ids: Sequence[Sequence[int]], prefixes: pa.Table | None,
    stats: dict[str, Any] | None, *, synthetic: bool = False,
) -> tuple[list[list[int]] | None, dict[str, Any]]:
    """(the token lists with analyze's cache breakers fixed, what was rewritten), or (None,
    {"reason": why not}). Requests are rewritten in order against their (already rewritten)
    partner, so a family of near-identical prompts converges on its first member's text.
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
    opts = stats.get("options") or {}
    block = int(stats.get("analysis_block_size") or opts.get("analysis_block_size") or 16)
    window = ALIGN_WINDOW_FACTOR * int(opts.get("lead_tokens") or 1024)
    labels_at: dict[int, set[str]] = {}
    for b in breakers:
        labels_at.setdefault(int(b["position_block"]), set()).add(str(b["label"]))
    rows = prefixes.select(["request_id", "resembles_id", "diverge_token"]).to_pylist()
    partner = {r["request_id"]: (r["resembles_id"], r["diverge_token"]) for r in rows if r["resembles_id"]}
    index = {rid: i for i, rid in enumerate(request_ids)}
    tokens = [list(t) for t in token_ids]
    applied: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    # A rewritten prompt's old head -> its new head, by head length: later requests that
    # carried the same head (the next turns of a conversation, the rest of a task) get the
    # same fix, as they would from a client that fixed its prompt.
    heads: dict[int, dict[tuple[int, ...], list[int]]] = {}
    inherited = 0
    for i, rid in enumerate(request_ids):
        own = tokens[i]
        for length in sorted(heads, reverse=True):
            new_head = heads[length].get(tuple(own[:length])) if len(own) > length else None
            if new_head is not None:
                tokens[i] = new_head + list(own[length:])
                inherited += 1
                break
        if rid not in partner or tokens[i] is not own:
            continue
        a_id, diverge = partner[rid]
        a = index.get(a_id)
        labels = labels_at.get(int(diverge) // block, set()) if diverge is not None else set()
        if a is None or a >= i:
            skipped["its partner is not among the replayed requests"] += 1
        elif len(labels) != 1:
            skipped["no single breaker label at its divergence"] += 1
        else:
            label = next(iter(labels))
            new, cut_old, cut_new, why = _rewrite(np.asarray(tokens[a], dtype=np.int64),
                                                  np.asarray(own, dtype=np.int64), label, window)
            if new is None:
                skipped[why] += 1
            else:
                tokens[i] = new
                heads.setdefault(cut_old, {})[tuple(own[:cut_old])] = new[:cut_new]
                applied[label] += 1
    if not applied:
        found = ", ".join(sorted({str(b["label"]) for b in breakers}))
        why = "; ".join(f"{n} requests: {r}" for r, n in skipped.most_common()) or "no request pairs"
        return None, {"reason": f"analyze's breakers ({found}) give no rewrite this replay can apply safely ({why})"}
    before = sum(len(t) for t in token_ids)
    after = sum(len(t) for t in tokens)
    return tokens, {
        "method": "each paired request's differing span takes its earlier partner's tokens (value breakers), "
                  "or its reordered region takes the partner's order (order breakers); later requests that "
                  "began with the same rewritten head get the same rewrite (same_head_requests)",
        "rewritten_requests": sum(applied.values()) + inherited, "by_label": dict(applied),
        "same_head_requests": inherited,
        "skipped": dict(skipped), "prompt_tokens_before": before, "prompt_tokens_after": after,
    }


def _rewrite(a: np.ndarray, b: np.ndarray, label: str, window: int) -> tuple[list[int] | None, int, int, str]:
    """(b rewritten against its partner a, the length of b's head replaced, the length of
    the head that replaced it, ""), or (None, 0, 0, why not)."""
    p, qa, rb, end = align_pair(a, b, window)
    if label in VALUE_LABELS:
        if qa == p and rb == p:
            return None, 0, 0, f"{label}: common content does not resume after the divergence"
        if max(qa - p, rb - p) > MAX_VALUE_SPAN:
            return None, 0, 0, f"{label}: differing span longer than {MAX_VALUE_SPAN} tokens"
        return np.concatenate([a[:qa], b[rb:]]).tolist(), rb, qa, ""
    if label in ORDER_LABELS:
        if end <= p or end > len(a) or not np.array_equal(np.sort(a[p:end]), np.sort(b[p:end])):
            return None, 0, 0, f"{label}: the aligned region is not a pure reordering of the partner's"
        return np.concatenate([a[:end], b[end:]]).tolist(), end, end, ""
    return None, 0, 0, f"{label}: its fix moves text within the prompt, which a token rewrite cannot do faithfully"
