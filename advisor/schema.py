"""Every Parquet column of the run folder, defined once.

Each artifact has one pyarrow schema here; stages build tables against it and
readers may rely on it. Columns are only ever added, never renamed.
"""

from __future__ import annotations

import pyarrow as pa

# --- requests.parquet: one row per accepted log line, in arrival (line) order ---
KIND_CHAT = "chat"  # OpenAI chat-completions body (messages, tools)
KIND_COMPLETION = "completion"  # text prompt
KIND_TOKENS = "tokens"  # pre-tokenized prompt_token_ids
KIND_HASH_TRACE = "hash_trace"  # block-hash trace (Mooncake style): no text, no tokens
KINDS = (KIND_CHAT, KIND_COMPLETION, KIND_TOKENS, KIND_HASH_TRACE)

# Input formats ingest recognises (per line); `--format` forces one.
FORMAT_CHAT = "openai-chat"  # bare chat body, or wrapped {"request": {...}, "response": ...}
FORMAT_BATCH = "openai-batch"  # {"custom_id", "method", "url", "body"}
FORMAT_COMPLETION = "completion"  # {"prompt": "..."} or {"prompt_token_ids": [...]}
FORMAT_HASH_TRACE = "hash-trace"  # {"timestamp", "input_length", "output_length", "hash_ids"}
FORMAT_VLLM_LOG = "vllm-log"  # vllm serve --enable-log-requests: its prompt_token_ids, joined by request id
FORMAT_ANTHROPIC = "anthropic"  # /v1/messages body {"model", "system"?, "messages", "max_tokens"}
FORMAT_LITELLM = "litellm"  # LiteLLM StandardLoggingPayload / spend-log row
FORMAT_LANGFUSE = "langfuse"  # Langfuse observation of type GENERATION
FORMAT_OTEL = "otel-genai"  # OTLP JSON spans with OpenTelemetry GenAI attributes / events
FORMATS = (FORMAT_CHAT, FORMAT_BATCH, FORMAT_COMPLETION, FORMAT_HASH_TRACE, FORMAT_VLLM_LOG,
           FORMAT_ANTHROPIC, FORMAT_LITELLM, FORMAT_LANGFUSE, FORMAT_OTEL)

# Chat content parts that carry media, not text (vLLM's chat_utils part types, and the media
# parts other formats map to): kept, their text counted, their own tokens not (docs/formats.md).
MEDIA_PARTS = frozenset({"image_url", "image", "input_image", "image_pil", "image_embeds", "input_audio", "audio_url",
                         "audio", "audio_embeds", "video_url", "video", "video_embeds", "file", "input_file",
                         "input_media", "input_video"})

REQUESTS = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),  # unique; from the log or "L<line>"
        pa.field("line", pa.int64(), nullable=False),  # 1-based source line number
        pa.field("timestamp", pa.float64()),  # seconds; line order at --rate when the log has none
        pa.field("kind", pa.string(), nullable=False),  # one of KINDS
        pa.field("format", pa.string(), nullable=False),  # one of FORMATS
        pa.field("model", pa.string()),
        # The request as given (JSON text, so any shape the API allows round-trips).
        pa.field("messages", pa.string()),  # JSON array of chat messages
        pa.field("tools", pa.string()),  # JSON array of tool definitions
        pa.field("prompt", pa.string()),  # completion prompt text
        pa.field("prompt_token_ids", pa.list_(pa.int32())),  # pre-tokenized prompt
        pa.field("output_tokens", pa.int64()),  # null when unknown
        pa.field("output_text", pa.string()),  # the logged response text, when given
        pa.field("hash_ids", pa.list_(pa.int64())),  # hash traces: one id per trace block
        pa.field("input_length", pa.int64()),  # hash traces: prompt tokens
        pa.field("trace_block_size", pa.int32()),  # hash traces: tokens per hash id
        pa.field("lora", pa.string()),  # LoRA adapter name (a block-hash extra key)
        pa.field("cache_salt", pa.string()),  # vLLM cache_salt (extra key of block 0)
        pa.field("session_id", pa.string()),  # conversation / user id when the log has one
        pa.field("latency_s", pa.float64()),  # logged end-to-end latency, when given
        pa.field("ttft_s", pa.float64()),  # logged time to first token, when given
        # False when the line had no time and `timestamp` is its place in line order at --rate
        pa.field("timestamp_logged", pa.bool_()),
        pa.field("max_tokens", pa.int64()),  # the request's max_(completion_)tokens: a bound only
        pa.field("prompt_tokens_logged", pa.int64()),  # response usage.prompt_tokens, when given
        pa.field("chat_template_kwargs", pa.string()),  # JSON object, when the body has one
        pa.field("logged_id", pa.string()),  # the id as logged (request_id adds "#n" to repeats)
        # Request fields vLLM treats differently (docs/simulate.md, "Requests vLLM treats apart"):
        pa.field("prompt_logprobs", pa.int64()),  # the body's prompt_logprobs; null: not asked
        pa.field("echo", pa.bool_()),  # the body's echo (false when absent; null for hash traces)
        # logprobs per sampled token: completions' `logprobs`, chat's `top_logprobs` (0 when
        # null) when its `logprobs` is true; null: not asked
        pa.field("logprobs", pa.int64()),
        pa.field("n", pa.int64()),  # completions asked for (vLLM fans them out); 1 when absent
        # The input file the request came from (a folder or glob: its path below the folder or
        # glob root; one file: its name; standard input: null). `line` is a line of that file.
        pa.field("source", pa.string()),
        # Anthropic requests: where the body had cache_control markers (JSON array of paths, e.g.
        # "system[0]", "messages[3].content[1]", "tools[11]"); vLLM caches without them
        pa.field("cache_control", pa.string()),
    ]
)

# --- tokens.parquet: same rows and order as requests.parquet ---
TOKENS = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32())),  # null for hash traces
        pa.field("n_tokens", pa.int64(), nullable=False),  # prompt length (input_length for traces)
        # Why vLLM would refuse this request before scheduling it (template failed, empty
        # prompt, non-text part); then token_ids = [] and n_tokens = 0. Null when tokenized.
        pa.field("tokenize_error", pa.string()),
        # The reply's length where the log has its text but no count (usage.completion_tokens,
        # output_tokens): the text's tokens + 1 for the stop token the model emitted. Null
        # otherwise; requests.output_tokens, when logged, is used instead.
        pa.field("output_tokens_from_text", pa.int64()),
        # Media content parts (schema.MEDIA_PARTS) left out of the rendered prompt: the text
        # around them is counted, their own tokens (a multimodal processor's) are not. Null: none.
        pa.field("media_parts", pa.int64()),
    ]
)

# --- sim.parquet: one row per (block_size, budget, policy, mode, window) ---
POLICY_LRU = "lru"  # vLLM's free queue
POLICY_FIFO = "fifo"
POLICY_BELADY = "belady"
# concurrent mode's baseline: prefix caching off (vllm serve --no-enable-prefix-caching), the
# same engine and clock with no cache read
POLICY_OFF = "off"
MODE_SEQUENTIAL = "sequential"
MODE_CONCURRENT = "concurrent"
WINDOW_COLD = "cold"  # whole log counted
WINDOW_WARM = "warm"  # only requests after the warm-up window counted

SIM = pa.schema(
    [
        pa.field("block_size", pa.int32(), nullable=False),
        pa.field("num_blocks", pa.int64()),  # usable blocks; null = infinite-cache ceiling row
        pa.field("kv_gib", pa.float64()),  # KV memory of num_blocks; null when no model known
        pa.field("policy", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("window", pa.string(), nullable=False),
        pa.field("requests", pa.int64(), nullable=False),  # requests counted in this window
        pa.field("queries", pa.int64(), nullable=False),  # prompt tokens (vLLM prefix_cache_queries)
        pa.field("hit_tokens", pa.int64(), nullable=False),  # vLLM prefix_cache_hits
        pa.field("hit_rate", pa.float64(), nullable=False),  # hit_tokens / queries
        pa.field("evictions", pa.int64(), nullable=False),  # hashed blocks evicted
        pa.field("peak_blocks_in_use", pa.int64(), nullable=False),
        pa.field("ceiling_hit_rate", pa.float64(), nullable=False),  # block ceiling, same window
        # requests too long for the whole pool (vLLM refuses them): not in requests/queries
        pa.field("refused", pa.int64()),
        pa.field("preemptions", pa.int64()),  # concurrent mode: recompute preemptions (vLLM's)
        # concurrent mode, on its clock (advisor.sim.steptime), over the window's requests:
        # seconds from arrival to the end of the step sampling the first / last token
        pa.field("ttft_p50_s", pa.float64()),
        pa.field("ttft_p95_s", pa.float64()),
        pa.field("ttft_p99_s", pa.float64()),
        pa.field("e2e_p50_s", pa.float64()),
        pa.field("e2e_p95_s", pa.float64()),
        # the whole run (both windows): first arrival to last finish, the steps' summed time,
        # the prefill chunks' part of it, finished requests and output tokens per second
        pa.field("makespan_s", pa.float64()),
        pa.field("busy_s", pa.float64()),
        pa.field("prefill_s", pa.float64()),
        pa.field("throughput_rps", pa.float64()),
        pa.field("output_tps", pa.float64()),
    ]
)

SIM_REQUESTS = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("block_size", pa.int32(), nullable=False),
        pa.field("num_blocks", pa.int64()),  # null = infinite cache
        pa.field("mode", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int64(), nullable=False),  # queries for this request
        pa.field("hit_tokens", pa.int64(), nullable=False),
    ]
)

# --- replicas.parquet: N engines behind a router (advisor.sim.routing), both modes, cold window ---
REPLICAS = pa.schema(
    [
        pa.field("block_size", pa.int32(), nullable=False),
        pa.field("num_blocks", pa.int64(), nullable=False),  # usable blocks PER REPLICA (each engine's pool)
        pa.field("kv_gib", pa.float64()),  # KV memory of num_blocks, per replica; null when no model known
        pa.field("replicas", pa.int32(), nullable=False),
        pa.field("router", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),  # sequential | concurrent (times: concurrent only)
        pa.field("requests", pa.int64(), nullable=False),  # requests that ran, all replicas
        pa.field("queries", pa.int64(), nullable=False),
        pa.field("hit_tokens", pa.int64(), nullable=False),
        pa.field("hit_rate", pa.float64(), nullable=False),  # hit_tokens / queries, all replicas
        pa.field("refused", pa.int64()),
        pa.field("evictions", pa.int64()),  # summed over replicas
        pa.field("preemptions", pa.int64()),  # summed over replicas
        pa.field("ttft_p50_s", pa.float64()),  # each request's on the replica it went to
        pa.field("ttft_p95_s", pa.float64()),
        pa.field("e2e_p50_s", pa.float64()),
        pa.field("e2e_p95_s", pa.float64()),
        pa.field("makespan_s", pa.float64()),  # first arrival to the last finish on any replica
        pa.field("busy_s", pa.float64()),  # the replicas' steps' time, summed
        pa.field("prefill_s", pa.float64()),  # the prefill chunks' share of it (the clock's compute term)
        pa.field("load_spread", pa.float64()),  # requests on the busiest replica / mean per replica
        pa.field("fallbacks", pa.int64()),  # requests the router could not key (sent round-robin)
        # prompt tokens computed (not hit, first scheduling) on the busiest replica / mean per replica
        pa.field("prefill_spread", pa.float64()),
        pa.field("replica_hit_rates", pa.list_(pa.float64())),  # per replica (index order): its hits / queries
    ]
)

# --- offload.parquet: the CPU offload tier (advisor.sim.offload), sequential mode, per window ---
OFFLOAD = pa.schema(
    [
        pa.field("block_size", pa.int32(), nullable=False),
        pa.field("num_blocks", pa.int64(), nullable=False),  # the GPU budget, usable blocks
        pa.field("kv_gib", pa.float64()),  # the GPU budget's KV memory per GPU
        pa.field("offload_gib", pa.float64(), nullable=False),  # --kv-offloading-size (all TP ranks); 0 = none
        pa.field("cpu_chunks", pa.int64(), nullable=False),  # the CPU tier's chunks (vLLM's num_chunks)
        pa.field("blocks_per_chunk", pa.int32(), nullable=False),
        pa.field("window", pa.string(), nullable=False),
        pa.field("requests", pa.int64(), nullable=False),
        pa.field("queries", pa.int64(), nullable=False),  # prefix_cache_queries
        pa.field("gpu_hit_tokens", pa.int64(), nullable=False),  # prefix_cache_hits
        pa.field("cpu_hit_tokens", pa.int64(), nullable=False),  # external_prefix_cache_hits
        pa.field("miss_tokens", pa.int64(), nullable=False),  # queries - both hits: computed
        pa.field("gpu_hit_rate", pa.float64(), nullable=False),  # of queries
        pa.field("cpu_hit_rate", pa.float64(), nullable=False),  # of queries
        pa.field("hit_rate", pa.float64(), nullable=False),  # both tiers, of queries
        pa.field("external_queries", pa.int64(), nullable=False),  # external_prefix_cache_queries
        # the CPU tier over the whole log (both windows): chunks loaded, stored, evicted; offers
        # refused whole and their new chunks
        pa.field("loads", pa.int64(), nullable=False),
        pa.field("stores", pa.int64(), nullable=False),
        pa.field("evictions", pa.int64(), nullable=False),
        pa.field("refused_offers", pa.int64(), nullable=False),
        pa.field("refused_chunks", pa.int64(), nullable=False),
        pa.field("load_gib", pa.float64()),  # bytes loaded, all ranks, whole log; null: no model
        pa.field("store_gib", pa.float64()),
        # seconds the loads / stores take at the GPU's host link peak, one way, per rank, whole
        # log; null where the GPU's datasheet link figure is unknown
        pa.field("load_s", pa.float64()),
        pa.field("store_s", pa.float64()),
    ]
)

# --- prefixes.parquet: per request prefix statistics (analysis) ---
PREFIXES = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int64(), nullable=False),
        # longest prefix shared with ANY earlier request, at token granularity (ceiling_tokens)
        pa.field("shared_tokens", pa.int64(), nullable=False),
        pa.field("shared_blocks", pa.int64(), nullable=False),  # at the analysis block size
        pa.field("best_match_id", pa.string()),  # the earlier request it shares most with
        pa.field("same_session", pa.bool_()),  # best match is from the same session
        pa.field("cluster", pa.int32()),
        # shared_tokens capped at n_tokens - 1 (vLLM always recomputes the last prompt token)
        pa.field("ceiling_tokens", pa.int64()),
        pa.field("same_session_tokens", pa.int64()),  # of them, from the same session; null: none
        pa.field("resembles_id", pa.string()),  # near-identical earlier request (cache breaker)
        pa.field("diverge_token", pa.int64()),  # where it diverges from resembles_id
    ]
)

CLUSTERS = pa.schema(
    [
        # one row per reuse group (advisor.analyze.clusters), plus one for the one-shots
        pa.field("cluster", pa.int32(), nullable=False),
        pa.field("parent", pa.int32()),  # the group whose prefix is the longest proper prefix of it
        pa.field("depth", pa.int32(), nullable=False),  # 1: top level; 0: the one-shot row
        pa.field("kind", pa.string(), nullable=False),  # "shared" | "one-shot"
        pa.field("requests", pa.int64(), nullable=False),  # members: deepest shared block is here
        pa.field("prefix_requests", pa.int64(), nullable=False),  # requests using its prefix (+ below)
        pa.field("tokens", pa.int64(), nullable=False),  # members' prompt tokens
        pa.field("shared_tokens", pa.int64(), nullable=False),  # members' ceiling tokens
        pa.field("ceiling", pa.float64(), nullable=False),  # shared_tokens / tokens
        pa.field("hit_share", pa.float64(), nullable=False),  # shared_tokens / all ceiling tokens
        pa.field("representative_id", pa.string()),  # first request with the whole prefix
        pa.field("start_tokens", pa.int64()),  # where its own part starts (its parent's prefix)
        pa.field("prefix_tokens", pa.int64()),  # its whole shared prefix
        pa.field("prefix_start_text", pa.string()),  # own part's first tokens decoded; null for traces
        pa.field("prefix_end_text", pa.string()),  # own part's last tokens decoded (null: fits the start)
        pa.field("reuses", pa.int64(), nullable=False),  # members with a hit (a block seen before)
        pa.field("gap_p50_s", pa.float64()),  # seconds since the hit block's last use; null: no times
        pa.field("gap_p90_s", pa.float64()),
        pa.field("distance_p50_blocks", pa.float64()),  # LRU stack distance, analysis blocks
        pa.field("distance_p90_blocks", pa.float64()),
    ]
)
