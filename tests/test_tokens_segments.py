"""The segment cache: ids spliced from segments equal the whole prompt's ids, or it is not used.

The reference is the tokenizer itself: `encode_batch` on the whole rendered prompt (what vLLM
encodes). Checked on every sample log and fixture log with text, on generated chats, on user
tokenizer folders with lstrip/rstrip and single-word added tokens, a WordPiece (BERT-like)
tokenizer and a Metaspace one whose pre-tokenizer breaks the rule; the executor tests check the
file is the same bytes whichever executor wrote it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor import schema
from advisor.cli.stages import _tokenize as tokenize_line
from advisor.executor import ExecutorOptions, InlineExecutor, ProcessExecutor
from advisor.ingest import stage as ing
from advisor.runfolder import RunDir
from advisor.tokens import stage as tk
from advisor.tokens.chatprompt import render_chat
from advisor.tokens.segments import (
    ENTRY_OVERHEAD,
    SegmentCache,
    SegmentEncoder,
    SegmentRule,
    check_tokenizer,
)

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def whole(tok, texts: list[str], special: bool = False) -> list[list[int]]:
    """The reference: the tokenizer's own encode_batch on each whole text."""
    return [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=special)]


def spliced(tok, texts: list[str], special: bool = False, encoder: SegmentEncoder | None = None) -> list[list[int]]:
    encoder = encoder or tk.segment_encoder(tok)
    return [np.frombuffer(b, dtype=np.int32).tolist() for b in encoder.encode(texts, special)]


def forced(tok) -> SegmentEncoder:
    """The segment path whatever the check says (to show where the rule really fails)."""
    rule = check_tokenizer(tok)
    added = tok.backend_tokenizer.get_added_tokens_decoder()
    contents = sorted((t.content for t in added.values() if not t.normalized), key=len, reverse=True)
    return SegmentEncoder(tok.backend_tokenizer, SegmentRule(
        None, re.compile("(" + "|".join(map(re.escape, contents)) + ")"),
        {t.content: np.int32(i).tobytes() for i, t in added.items() if not t.normalized},
        special_prefix=rule.special_prefix, special_suffix=rule.special_suffix), SegmentCache())


# --- stories with hand-counted answers ---
def test_qwen_passes_the_check_and_splits_at_its_added_tokens(qwen):
    rule = check_tokenizer(qwen)
    assert rule.holds and rule.special_prefix == b"" and rule.special_suffix == b""  # Qwen adds no BOS
    im_start, im_end = (np.int32(qwen.convert_tokens_to_ids(t)).tobytes() for t in ("<|im_start|>", "<|im_end|>"))
    assert rule.split("<|im_start|>user\nhi<|im_end|>\n") == ["", im_start, "user\nhi", im_end, "\n"]
    # the longest added token wins where two start at the same place, as in the Rust scan
    assert rule.split("a<|im_start|><|im_start|>") == ["a", im_start, "", im_start, ""]


def test_cache_evicts_the_least_recently_used_segment_first():
    cache = SegmentCache(capacity=3 * (ENTRY_OVERHEAD + 1 + 4))  # three one-character, one-id segments
    for text in "abc":
        cache.put(text, b"\0\0\0\0")
    assert len(cache) == 3 and cache.used == cache.capacity
    assert cache.get("a") == b"\0\0\0\0"  # "a" is now the most recently used
    cache.put("d", b"\1\0\0\0")  # evicts "b", the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    cache.put("é" * 200, b"\0" * 4)  # larger than the whole cache: not kept, nothing evicted
    assert len(cache) == 3 and cache.get("c") is not None


def test_counts_say_what_was_reused(qwen):
    system = "<|im_start|>system\nYou are terse.<|im_end|>\n"
    texts = [system + "<|im_start|>user\nhi<|im_end|>\n",
             system + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n"]
    encoder = tk.segment_encoder(qwen)
    assert spliced(qwen, texts, encoder=encoder) == whole(qwen, texts)
    c = encoder.take_counts()
    # text segments: "system\nYou are terse.", "\n", "user\nhi", "\n" | the same four, "user\nbye", "\n"
    assert (c.segments, c.encoded, c.whole_texts) == (10, 4, 0)  # distinct: system, "\n", hi, bye
    assert c.chars == 2 * (21 + 1 + 7 + 1) + 8 + 1
    assert spliced(qwen, texts[:1], encoder=encoder) == whole(qwen, texts[:1])
    again = encoder.take_counts()
    assert (again.segments, again.encoded, again.tokens_encoded) == (4, 0, 0)  # all from the cache


# --- generated chats against the whole prompt ---
FRAGMENTS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "<|im_start", "im_end|>",
             "<|", "|>", " ", "  ", "\n", "\n\n", "\t", " \n ", "e\u0301", "\u0308", "中文", "日本語",
             "🤖", "hello", " world", "123", "'s", "\u3000", "\x85", "\x1c"]
chunk = st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8))
message_text = st.lists(chunk, max_size=8).map("".join)


@st.composite
def chats(draw) -> list[list[dict]]:
    """A few conversations drawn from a small pool of texts, so that messages share and differ."""
    pool = draw(st.lists(message_text, min_size=1, max_size=5))
    system = draw(st.one_of(st.none(), st.sampled_from(pool)))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        turns = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5))
        msgs = [{"role": "system", "content": system}] if system is not None else []
        msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        out.append(msgs)
    return out


@SETTINGS
@given(chats())
def test_generated_chats_splice_to_the_whole_prompts_ids(qwen, conversations):
    texts = [render_chat(qwen, msgs, None) for msgs in conversations]
    encoder = tk.segment_encoder(qwen)
    assert spliced(qwen, texts, encoder=encoder) == whole(qwen, texts)
    assert spliced(qwen, texts, encoder=encoder) == whole(qwen, texts)  # again, from the cache
    assert encoder.counts.whole_texts == 0


@SETTINGS
@given(st.lists(message_text, min_size=1, max_size=6))
def test_completions_and_raw_texts_splice_with_special_tokens_too(qwen, texts):
    assert spliced(qwen, texts, special=True) == whole(qwen, texts, special=True)


# --- every log with text ---
LOGS = sorted([*(ROOT / "sample_logs").glob("*.jsonl"), *(ROOT / "tests" / "fixtures").glob("*.jsonl"),
               *(ROOT / "tests" / "fixtures").glob("*.csv"), *(ROOT / "tests" / "fixtures").glob("*.log")])


@pytest.mark.parametrize("log", LOGS, ids=lambda p: p.name)
def test_every_log_tokenizes_as_whole_prompts_do(tmp_path, qwen, log):
    requests = tmp_path / "requests.parquet"
    ing.ingest_source(str(log), requests, tmp_path / "rejects.jsonl", ing.IngestOptions())
    table = pq.read_table(requests)
    if not tk.needs_tokenizer(requests):
        pytest.skip(f"{log.name} has no text to tokenize")
    baseline = SegmentEncoder(qwen.backend_tokenizer, SegmentRule("the reference"), SegmentCache())
    want, _ = tk.tokenize_batch(table, qwen, tk.EMBEDDED_SPEC, baseline)
    encoder = tk.segment_encoder(qwen)
    for batch_rows in (7, 1000):  # a cache across batches, and one batch
        got = [tk.tokenize_batch(b, qwen, tk.EMBEDDED_SPEC, encoder)[0] for b in table.to_batches(batch_rows)]
        assert all(t.equals(w) for t, w in zip(got, [want.slice(i, batch_rows) for i in range(0, len(want), batch_rows)]))
    c = encoder.take_counts()
    assert c.whole_texts == 0 and c.segments > c.encoded > 0


# --- user tokenizer folders ---
@pytest.fixture(scope="module")
def stripping(cache_dir, tmp_path_factory) -> object:
    """The embedded tokenizer saved with added tokens that swallow whitespace beside them."""
    from transformers import AddedToken

    tok = tk.load_tokenizer(None, cache_dir)  # a fresh object: adding tokens leaves `qwen` alone
    tok.add_tokens([AddedToken("<mark>", lstrip=True, rstrip=True, normalized=False, special=False),
                    AddedToken("<L>", lstrip=True, rstrip=False, normalized=False, special=True),
                    AddedToken("<R>", lstrip=False, rstrip=True, normalized=False, special=False),
                    AddedToken("stop", normalized=True, special=False)])  # matched after normalising
    folder = tmp_path_factory.mktemp("stripping")
    tok.save_pretrained(str(folder))
    return tk.load_tokenizer(str(folder), folder)


STRIP_TEXT = st.lists(st.sampled_from(["<mark>", "<L>", "<R>", "stop", " ", "  ", "\n", "\t", "\u3000", "\x85",
                                       "\x1c", "\x1f", "a", "中", "<|im_end|>", "e\u0301"]),
                      max_size=14).map("".join)


def test_lstrip_and_rstrip_tokens_take_their_whitespace(stripping):
    rule = check_tokenizer(stripping)
    assert rule.holds and rule.lstrip == {"<mark>", "<L>"} and rule.rstrip == {"<mark>", "<R>"}
    mark = np.int32(stripping.convert_tokens_to_ids("<mark>")).tobytes()
    assert rule.split("a  <mark> \n b") == ["a", mark, "b"]
    assert rule.split("a\x1c<mark>") == ["a\x1c", mark, ""]  # \x1c is not Unicode White_Space (Rust's \s)


@SETTINGS
@given(st.lists(STRIP_TEXT, min_size=1, max_size=5))
def test_stripping_tokens_splice_to_the_whole_texts_ids(stripping, texts):
    assert spliced(stripping, texts) == whole(stripping, texts)


def test_a_single_word_token_makes_the_stage_encode_whole_prompts(cache_dir):
    from transformers import AddedToken

    tok = tk.load_tokenizer(None, cache_dir)
    tok.add_tokens([AddedToken("<w>", single_word=True, normalized=False)])
    rule = check_tokenizer(tok)
    assert not rule.holds and "single word" in rule.reason
    texts = ["x<w> y", "x <w> y"]
    assert spliced(tok, texts) == whole(tok, texts)
    assert spliced(tok, texts, encoder=forced(tok)) != whole(tok, texts)  # why: "x<w>" is not a match


def _save(backend, folder: Path, **special: str):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(str(folder))
    return tk.load_tokenizer(str(folder), folder)


@pytest.fixture(scope="module")
def metaspace_first(tmp_path_factory):
    """A SentencePiece-like tokenizer whose pre-tokenizer adds '▁' only at the text's start."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(["hello world the cat sat", "world hello cat"] * 20,
                                trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"]))
    return _save(backend, tmp_path_factory.mktemp("metaspace"), unk_token="<unk>", bos_token="<s>",
                 eos_token="</s>")


def test_metaspace_first_falls_back_to_whole_prompts(metaspace_first, tmp_path):
    rule = check_tokenizer(metaspace_first)
    assert not rule.holds and "prepend_scheme: first" in rule.reason
    texts = ["<s>hello world</s><s>the cat", "hello</s>world"]
    assert spliced(metaspace_first, texts, encoder=forced(metaspace_first)) != whole(metaspace_first, texts)
    assert spliced(metaspace_first, texts) == whole(metaspace_first, texts)
    req = tmp_path / "requests.parquet"
    pq.write_table(_completions(texts), req)
    res = tk.tokenize_file(req, tmp_path / "tokens.parquet", metaspace_first,
                           tk.TokenizeOptions(str(tmp_path), 1))
    assert res.segments["used"] is False and res.segments["whole_texts"] == 2
    line, notes = tokenize_line(RunDir(tmp_path), res.as_counts())
    assert any("encoded whole" in n and "Metaspace" in n for n in notes)


def _completions(prompts: list[str]):
    import pyarrow as pa

    n = len(prompts)
    return pa.table({"request_id": [f"r{i}" for i in range(n)], "line": list(range(1, n + 1)),
                     "kind": [schema.KIND_COMPLETION] * n, "format": ["completion"] * n,
                     "messages": [None] * n, "tools": [None] * n, "prompt": prompts,
                     "prompt_token_ids": pa.nulls(n, pa.list_(pa.int32())), "input_length": pa.nulls(n, pa.int64())})


@pytest.fixture(scope="module")
def bert_like(tmp_path_factory):
    """WordPiece with BERT's normaliser (lowercase, accents stripped) and [CLS] ... [SEP]."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(["Hello world, the café sat on the mat.", "中文 hello WORLD"] * 20,
                                trainers.WordPieceTrainer(vocab_size=120,
                                                          special_tokens=["[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    backend.add_tokens([AddedToken("Mat", normalized=True)])  # matched in the normalised text ("mat")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", backend.token_to_id("[CLS]")), ("[SEP]", backend.token_to_id("[SEP]"))])
    return _save(backend, tmp_path_factory.mktemp("bert"), unk_token="[UNK]", cls_token="[CLS]",
                 sep_token="[SEP]", mask_token="[MASK]")


BERT_TEXT = st.lists(st.sampled_from(["[SEP]", "[CLS]", "[MASK]", "Hello", " world", "CAFÉ", "Mat", "mat", " ",
                                      "\n", "中", "e\u0301", ",", "[SE", "P]"]), max_size=12).map("".join)


@SETTINGS
@given(st.lists(BERT_TEXT, min_size=1, max_size=5))
def test_a_wordpiece_tokenizer_splices_with_and_without_its_cls_sep(bert_like, texts):
    rule = check_tokenizer(bert_like)
    assert rule.holds and rule.special_prefix == np.int32(bert_like.cls_token_id).tobytes()
    assert spliced(bert_like, texts) == whole(bert_like, texts)
    assert spliced(bert_like, texts, special=True) == whole(bert_like, texts, special=True)


# --- executors: the same file whoever ran it ---
def _chat_requests(path: Path, n: int) -> Path:
    import pyarrow as pa

    system = {"role": "system", "content": "You answer in one line. <|im_start|> is plain text here."}
    msgs = [json.dumps([system, *({"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k} of {i % 5}"}
                                  for k in range(i % 4 + 1))]) for i in range(n)]
    pq.write_table(pa.table({
        "request_id": [f"r{i}" for i in range(n)], "line": list(range(1, n + 1)),
        "kind": [schema.KIND_CHAT] * n, "format": ["openai-chat"] * n, "messages": msgs,
        "tools": pa.nulls(n, pa.string()), "prompt": pa.nulls(n, pa.string()),
        "prompt_token_ids": pa.nulls(n, pa.list_(pa.int32())), "input_length": pa.nulls(n, pa.int64())}), path)
    return path


def test_processes_write_the_same_bytes_as_one_process(tmp_path, qwen, cache_dir):
    req = _chat_requests(tmp_path / "requests.parquet", 40)
    options = tk.TokenizeOptions(None, 2, batch_rows=8)  # five pieces
    done: list[int] = []
    inline = tk.tokenize_file_with(InlineExecutor(), req, tmp_path / "a.parquet", options, cache_dir, done.append)
    with ProcessExecutor(2) as ex:
        procs = tk.tokenize_file_with(ex, req, tmp_path / "b.parquet", options, cache_dir)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert done == [8] * 5 and inline.tokens == procs.tokens
    assert inline.segments["used"] and inline.segments["segments"] == procs.segments["segments"]
    # each worker keeps its own cache: together they encode at least what one process does
    assert procs.segments["encoded"] >= inline.segments["encoded"]
    texts = [render_chat(qwen, json.loads(m), None) for m in pq.read_table(req).column("messages").to_pylist()]
    assert pq.read_table(tmp_path / "a.parquet").column("token_ids").to_pylist() == whole(qwen, texts)


def test_tokenizer_folders_load_as_autotokenizer_would(qwen, cache_dir, stripping, tmp_path):
    """The embedded folder and a user's tokenizer-only folder skip AutoTokenizer (and its torch
    import) for the class it would pick; a folder with a model config or an auto_map does not."""
    import shutil

    from transformers import AutoTokenizer

    from advisor.tokens.default_tokenizer import ensure_embedded

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|im_end|> <mark> stop"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    user = Path(stripping.name_or_path)
    for folder in (ensure_embedded(cache_dir), user):
        assert tk._direct_class(folder) is not None, folder
        auto = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        ours = tk.load_tokenizer(str(folder), cache_dir)
        assert type(auto) is type(ours)
        assert auto.backend_tokenizer.to_str() == ours.backend_tokenizer.to_str()
        assert auto.chat_template == ours.chat_template and auto.special_tokens_map == ours.special_tokens_map
        assert auto.added_tokens_decoder == ours.added_tokens_decoder
        text = render_chat(auto, msgs, tools)
        assert text == render_chat(ours, msgs, tools) and auto.encode(text) == ours.encode(text)
    for name, extra in (("config.json", {"model_type": "qwen2"}), ("auto_map", None)):
        folder = tmp_path / name
        shutil.copytree(user, folder)
        if extra is not None:
            (folder / name).write_text(json.dumps(extra))
        else:
            config = json.loads((folder / "tokenizer_config.json").read_text())
            (folder / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {}}))
        assert tk._direct_class(folder) is None, name  # AutoTokenizer decides


def test_a_warmed_up_worker_holds_what_the_first_piece_asks_for(tmp_path, cache_dir):
    """The pipeline starts tokenize's workers during ingest (`warm_up`): the tokenizer they load
    must be the one the pieces then find in the memo, or the warm-up is wasted."""
    import pyarrow.parquet as pq

    options = tk.TokenizeOptions(None, 2, batch_rows=8)
    tk._worker.clear()
    tk.warm_up(tk.warm_up_for(options, cache_dir))
    loaded = tk._worker[0].tokenizer
    req = _chat_requests(tmp_path / "requests.parquet", 8)
    piece = tk.TokenizePiece(next(pq.ParquetFile(req).iter_batches(8)), tk.resolve_spec(None), str(cache_dir),
                             json.dumps(options.as_dict(), sort_keys=True), "run", 1 << 20)
    assert tk._worker_for(piece).tokenizer is loaded
    # and a held, prestarted pool writes what one process writes
    inline = tk.tokenize_file_with(InlineExecutor(), req, tmp_path / "a.parquet", options, cache_dir)
    with ProcessExecutor(2) as ex:
        ex.prestart(tk.warm_up, tk.warm_up_for(options, cache_dir))
        held = tk.tokenize_file_with(ex, req, tmp_path / "b.parquet", options, cache_dir)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert inline.tokens == held.tokens


def test_a_small_log_runs_in_this_process_a_large_one_on_every_core():
    assert tk.local_executor(tk.TokenizeOptions(workers=2), 512).workers == 1  # one piece
    assert tk.local_executor(tk.TokenizeOptions(workers=2), 513).workers == 2
    assert tk.local_executor(tk.TokenizeOptions(workers=3, batch_rows=10), 25).workers == 3


def test_run_tokenize_takes_an_executor_and_keeps_its_fingerprint(tmp_path, cache_dir):
    run = tmp_path / "run"
    run.mkdir()
    _chat_requests(run / "requests.parquet", 12)
    first = tk.run_tokenize(run, tk.TokenizeOptions(None, 1), cache_dir=cache_dir,
                            executor=ExecutorOptions(workers=1))
    assert not first.skipped and first.counts["segments"]["used"]
    again = tk.run_tokenize(run, tk.TokenizeOptions(None, 4), cache_dir=cache_dir)
    assert again.skipped  # workers and executors are not part of the fingerprint
