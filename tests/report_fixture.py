"""A complete run folder for the report tests, written straight from the schemas and contracts.

Prompt text, ids, model names and reject reasons carry hostile strings (`<script>`,
`</textarea>`, an `onerror=` image, Markdown pipes and backticks) so every renderer is tested
on them. Numbers are small and chosen by hand; they need not come from a real simulation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

import advisor.runfolder as rf
from advisor import schema

EVIL = '<script>alert("x")</script></textarea><img src=x onerror=alert(1)> | `tick` *bold* [l](http://e.x)'
SECRET = "SECRET-SYSTEM-PROMPT You are the assistant of ACME Corp."
BLOCK_SIZES = (16, 32)
BUDGETS = (64, 128, 256)
GIB_PER_BLOCK = {16: 0.002, 32: 0.004}


def _hit_rate(bs: int, nb: int | None) -> float:
    ceiling = {16: 0.62, 32: 0.58}[bs]
    return ceiling if nb is None else round(ceiling * min(1.0, nb / 300), 4)


def write_fixture_run(root: Path, *, replay_status: str = "mismatch") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    n = 10
    ids = [f"req-{i}" for i in range(n - 1)] + ["evil-" + EVIL]
    n_tokens = [100 + 10 * i for i in range(n)]
    stages = {
        "ingest": {"wall_s": 0.21, "counts": {
            "lines_read": 12, "accepted": 10, "rejected": 2,
            "first_rejects": [[3, "invalid JSON"], [7, "content is " + EVIL]],
            "by_kind": {"chat": 9, "completion": 1}}},
        "tokenize": {"wall_s": 1.5, "counts": {"rows": n, "tokens": sum(n_tokens), "tokenizer": "embedded:qwen2.5"}},
        "analyze": {"wall_s": 0.4, "counts": {}},
        "simulate": {"wall_s": 2.25, "counts": {}},
        "recommend": {"wall_s": 0.05, "counts": {}},
        "replay": {"wall_s": 12.0, "counts": {}},
    }
    rf.write_json(root / rf.MANIFEST, {"tool": "pc-advise", "version": "0.1.0", "stages": stages})
    (root / rf.REJECTS).write_text(
        json.dumps({"line": 3, "reason": "invalid JSON", "raw": "{"}) + "\n"
        + json.dumps({"line": 7, "reason": "content is " + EVIL, "raw": EVIL}) + "\n",
        encoding="utf-8",
    )
    rf.write_table(root / rf.REQUESTS, pa.Table.from_pylist(
        [{"request_id": rid, "line": i + 1, "timestamp": 1000.0 + 2.5 * i, "kind": "chat",
          "format": "openai-chat", "model": "m" if i < 6 else "model-" + EVIL}
         for i, rid in enumerate(ids)], schema=schema.REQUESTS))
    shared = [0] + [min(80, t - 5) for t in n_tokens[1:]]
    rf.write_table(root / rf.PREFIXES, pa.Table.from_pylist(
        [{"request_id": rid, "n_tokens": t, "shared_tokens": s, "shared_blocks": s // 16,
          "best_match_id": ids[0] if i else None, "same_session": i % 2 == 0, "cluster": i % 2}
         for i, (rid, t, s) in enumerate(zip(ids, n_tokens, shared))], schema=schema.PREFIXES))
    rf.write_table(root / rf.CLUSTERS, pa.Table.from_pylist([
        {"cluster": 0, "parent": None, "depth": 1, "kind": "shared", "requests": 1, "prefix_requests": 9,
         "tokens": 120, "shared_tokens": 0, "ceiling": 0.0, "hit_share": 0.0, "representative_id": "req-1",
         "start_tokens": 0, "prefix_tokens": 64, "prefix_start_text": "Classify the ticket:\n```\n",
         "reuses": 0},
        {"cluster": 1, "parent": 0, "depth": 2, "kind": "shared", "requests": 5, "prefix_requests": 5,
         "tokens": 700, "shared_tokens": 400, "ceiling": 400 / 700, "hit_share": 400 / 720,
         "representative_id": ids[-1], "start_tokens": 64, "prefix_tokens": 80,
         "prefix_start_text": SECRET + " " + EVIL, "prefix_end_text": "end of prefix " + EVIL, "reuses": 4,
         "gap_p50_s": 2.5, "gap_p90_s": 7.5, "distance_p50_blocks": 12.0, "distance_p90_blocks": 40.0},
        {"cluster": 2, "parent": 0, "depth": 2, "kind": "shared", "requests": 3, "prefix_requests": 3,
         "tokens": 630, "shared_tokens": 320, "ceiling": 320 / 630, "hit_share": 320 / 720,
         "representative_id": "req-2", "start_tokens": 64, "prefix_tokens": 96, "reuses": 3,
         "gap_p50_s": 5.0, "gap_p90_s": 10.0, "distance_p50_blocks": 20.0, "distance_p90_blocks": 30.0},
        {"cluster": 3, "parent": None, "depth": 0, "kind": "one-shot", "requests": 1, "prefix_requests": 1,
         "tokens": 0, "shared_tokens": 0, "ceiling": 0.0, "hit_share": 0.0, "representative_id": "req-3",
         "start_tokens": 0, "prefix_tokens": 0, "reuses": 0},
    ], schema=schema.CLUSTERS))
    total, ceil = sum(n_tokens), sum(shared)
    rf.write_json(root / rf.STATS, {
        "requests": n, "prompt_tokens": total, "ceiling_tokens": ceil, "ceiling_rate": ceil / total,
        "by_model": {"m": {"requests": 6, "prompt_tokens": 750, "ceiling_rate": 0.5},
                     "model-" + EVIL: {"requests": 4, "prompt_tokens": 700, "ceiling_rate": 0.4}},
        "shared_prefix_hist": {"edges": [0, 16, 64, 256, 1024], "counts": [1, 0, 9, 0]},
        "top_prefixes": [
            {"rank": 1, "tokens": 80, "requests": 9, "saved_tokens": 640, "text_first": SECRET,
             "text_last": "end of prefix " + EVIL, "clusters": [0, 1]},
            {"rank": 2, "tokens": 32, "requests": 3, "saved_tokens": 64, "text_first": "````four ticks",
             "text_last": "| a | b |\n|---|---|", "clusters": [1]},
        ],
        "breakers": [{
            "label": "timestamp", "position_token": 5, "position_block": 0, "requests_affected": 6,
            "tokens_lost": 300, "rate_lost": 300 / total, "description": "Prompts differ at a date: " + EVIL,
            "examples": [{"a_request_id": "req-1", "b_request_id": ids[-1],
                          "a_text": SECRET + " Current time: 2024-05-01T10:00", "b_text": EVIL},
                         {"a_request_id": "req-2", "b_request_id": "req-3",
                          "a_text": "10:00", "b_text": "<b>10:01</b>", "a_diff": "0", "b_diff": "1",
                          "a_context": "Current time: 10:00. " + SECRET,
                          "b_context": "Current time: <b>10:01</b>. " + SECRET}],
        }],
        "reuse_sources": {"same_session_tokens": 400, "cross_request_tokens": 320, "same_session_share": 400 / 720},
        "clusters": {"count": 3, "top_level": 1, "one_shot_requests": 1, "block_tokens": 16,
                     "method": "prefix tree over chained block hashes"},
        "analysis_block_size": 16, "tokenizer": "embedded:qwen2.5",
    })
    rows = []
    for bs in BLOCK_SIZES:
        for nb in (*BUDGETS, None):
            hr = _hit_rate(bs, nb)
            rows.append({"block_size": bs, "num_blocks": nb,
                         "kv_gib": None if nb is None else nb * GIB_PER_BLOCK[bs], "policy": "lru",
                         "mode": "sequential", "window": "cold", "requests": n, "queries": total,
                         "hit_tokens": round(hr * total), "hit_rate": hr, "evictions": 0 if nb is None else 300 // nb,
                         "peak_blocks_in_use": nb or 90, "ceiling_hit_rate": _hit_rate(bs, None)})
    # reference lines at block size 16: 64 and 256 blocks (rows[0] and rows[2])
    rows.append({**rows[0], "policy": "fifo", "hit_rate": 0.1})
    rows.append({**rows[0], "policy": "belady", "hit_rate": 0.25})
    rows.append({**rows[2], "policy": "fifo", "hit_rate": 0.5})
    rows.append({**rows[2], "policy": "belady", "hit_rate": 0.55})
    rf.write_table(root / rf.SIM, pa.Table.from_pylist(rows, schema=schema.SIM), schema.SIM)
    rf.write_table(root / rf.SIM_REQUESTS, pa.Table.from_pylist(
        [{"request_id": rid, "block_size": 16, "num_blocks": 256, "mode": "sequential", "n_tokens": t,
          "hit_tokens": (s // 16) * 16} for rid, t, s in zip(ids, n_tokens, shared)], schema=schema.SIM_REQUESTS))
    rec_row = {"block_size": 16, "num_blocks": 256, "kv_gib": 0.512, "hit_rate": _hit_rate(16, 256),
               "ceiling_hit_rate": 0.62, "queries": total, "hit_tokens": round(_hit_rate(16, 256) * total),
               "prefill_tokens_saved": round(_hit_rate(16, 256) * total), "marginal_tokens_per_gib": 1234.5}
    rf.write_json(root / rf.RECOMMENDATION, {
        "input_kind": "tokens",
        "recommended": rec_row,
        "runner_up": {**rec_row, "block_size": 32, "num_blocks": 128, "kv_gib": 0.512, "hit_rate": _hit_rate(32, 128),
                      "why_lost": "saves 120 fewer prefill tokens for the same memory"},
        "vllm_version": "0.34",
        "flags": ["--enable-prefix-caching", "--block-size 16", "--num-gpu-blocks-override 257"],
        "vllm_serve": "vllm serve MODEL --enable-prefix-caching --block-size 16 --num-gpu-blocks-override 257",
        "reasoning": ["The curve flattens after 256 blocks.", "Block size 16 keeps more partial prefixes."],
        "offload": None,
        "reuse_groups": {"groups": [1], "hit_share": 400 / 720, "budget_tokens": 512,
                         "beyond": [{"cluster": 1, "hit_share": 400 / 720, "distance_p90_tokens": 640}],
                         "needed_tokens": 640, "needed_gib": 0.08,
                         "note": "1 reuse group carries 56% of the hits, but its prefix comes back after more "
                                 "distinct blocks than the recommended budget holds (512 tokens): keeping 90% of "
                                 "their hits takes an LRU cache of about 640 tokens of KV cache (about 0.08 GiB)."},
        "prompt_fixes": [{"breaker": "timestamp", "hit_rate_gain": 0.12,
                          "description": "Move the timestamp after the instructions: " + EVIL}],
        "candidates": [{k: rec_row[k] for k in ("block_size", "num_blocks", "kv_gib", "hit_rate",
                                                  "prefill_tokens_saved", "marginal_tokens_per_gib")}
                       | {"ttft_gain_s": 0.042}],
        "constraints": ["CUDA FlashAttention: block size a multiple of 16"],
        "cost_model": {"prefill_tokens_per_s": 10000, "decode_tokens_per_s": 50},
    })
    rf.write_json(root / rf.REPLAY, {
        "status": replay_status, "reason": None, "engine": "vllm-inprocess", "vllm_version": "0.32.0",
        "model": "tiny random Llama (vocab 151936)", "synthetic_tokens": False,
        "notes": ["replayed the first 10 requests"],
        "configs": [{"block_size": 16, "num_blocks": 256, "mode": "sequential", "queries": total,
                     "predicted_hit_tokens": 512, "measured_hit_tokens": 496, "predicted_hit_rate": 512 / total,
                     "measured_hit_rate": 496 / total, "diff_points": (496 - 512) / total * 100,
                     "confirmable": True, "reason": None,
                     "mismatches": [{"request_id": ids[-1], "predicted": 80, "measured": 64}]}],
    })
    return root
