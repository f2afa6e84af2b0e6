"""vLLM's own server log (`vllm serve --enable-log-requests`) -> one request per request id.

Input: the lines of a server log, as vLLM's text formatter writes them
(`(APIServer pid=7) DEBUG 11-03 10:00:05 [.../request_logger.py:55] <message>`, an optional
VLLM_LOGGING_PREFIX or a container runtime's ISO time before it, ANSI colours stripped), or
as its JSON formatter writes them (`--logging-config.formatter json`: one object per line
with "asctime" and "message"). Output: `Accepted` / `Rejected` records, one per request id.

The messages read are vllm/entrypoints/serve/utils/request_logger.py's `RequestLogger`
(worded the same in vLLM 0.32 and 0.34; docs/formats.md quotes them):
  DEBUG  Request <id> details: prompt: <repr>, prompt_token_ids: [...], prompt_embeds shape: ...
  INFO   Received request <id>: params: SamplingParams(...), lora_request: ...
  DEBUG  Request <uuid> JSON body: {...}          (0.34: at VLLM_REQUEST_BODY_LOG_LEVEL)
  INFO   Generated response <id>[ (streaming complete)]: output: <repr>, finish_reason: ...
  DEBUG  Generated response <id>[ ...] details: output_token_ids: [...]
The details line's prompt_token_ids are the ids vLLM scheduled: they are used as they are
(kind "tokens"), no tokenizer involved. The sampling parameters vLLM derived (n, logprobs,
prompt_logprobs, max_tokens) come from the "Received" line, the LoRA adapter from its
lora_request; the JSON body gives the model, cache_salt and session. The body is logged
under the request's own `request_id` (a bare uuid); the other lines under the server's id
(`chatcmpl-<uuid>`, `cmpl-<uuid>-<i>`): they are joined by that uuid.

`--max-log-len N` on the server cuts the prompt, the ids and the body to N: a request whose
ids may have been cut (N ids or more, N known from the ingest option or from a body cut to
N characters) is rejected as `cut_prompt`, never simulated shorter than it was.
"""

from __future__ import annotations

import ast
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from advisor import schema
from advisor.ingest.fields import (
    INT32_MAX,
    TOO_LONG,
    WRONG_FIELD,
    LineError,
    check_ids,
    parse_time,
)
from advisor.ingest.formats import parse_request
from advisor.ingest.reader import CorruptStream, Oversize
from advisor.ingest.records import Accepted, FileTally, Record, Rejected

# Reject causes of this format (the summary counts them).
NO_PROMPT = "no_prompt"
CUT_PROMPT = "cut_prompt"
NOT_MODELLED = "not_modelled"

# vllm/logger.py _FORMAT: "%(vllm_process_name)s pid=%(process)d) %(levelname)s %(asctime)s
# [%(fileinfo)s:%(lineno)d] %(message)s" with datefmt "%m-%d %H:%M:%S" (no year, local time).
_PREFIX = re.compile(
    r"(?:\((?P<proc>[^()]*) pid=\d+\) )?(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"(?P<month>\d\d)-(?P<day>\d\d) (?P<hms>\d\d:\d\d:\d\d) \[[^\]]*:\d+\] "
)
_ANSI = re.compile(rb"\x1b\[[0-9;]*m")
_ANSI_TEXT = re.compile(r"\x1b\[[0-9;]*m")
# `docker logs -t`, `kubectl logs --timestamps`: an RFC 3339 time before vLLM's own prefix
_LEAD_TIME = re.compile(r"^(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?)\s")
_STREAM = re.compile(r" \(streaming (?:delta|complete)\)$")
_SERVER_ID = re.compile(r"^(?:chatcmpl-|cmpl-)?(?P<base>.+?)(?:[-_]\d+)?$")
_N = re.compile(r"^SamplingParams\(n=(\d+), ")
_MAX_TOKENS = re.compile(r", ignore_eos=(?:True|False), max_tokens=(\d+|None), min_tokens=")
_LOGPROBS = re.compile(r", logprobs=(-?\d+|None), prompt_logprobs=(-?\d+|None), skip_special_tokens=")
_LORA_NAME = re.compile(r"^LoRARequest\(lora_name=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")")

# Unknown year: a leap year, so that a "02-29" line still parses; the report says so.
DEFAULT_YEAR = 2000
# Requests held after their "Received" line for their output lines (--enable-log-outputs),
# at most this many and this many prompt tokens, then written in arrival order.
PENDING_REQUESTS = 1024
PENDING_TOKENS = 4_000_000
PENDING_BODIES = 4096

INFO_ONLY_FIX = ("vLLM logs the prompt and its token ids at DEBUG only; restart the server with "
                 "VLLM_LOGGING_LEVEL=DEBUG vllm serve ... --enable-log-requests")


def is_server_log_line(text: str) -> bool:
    """Whether one text line carries vLLM's log prefix (how a server log is recognised)."""
    return _PREFIX.search(_ANSI_TEXT.sub("", text[:400])) is not None


def is_json_log_record(obj: dict[str, Any]) -> bool:
    """Whether a decoded JSON line is a vLLM log record written by its JSON formatter."""
    return isinstance(obj.get("message"), str) and "levelname" in obj and "asctime" in obj


@dataclass
class _Event:
    line: int
    time: float
    message: str
    raw: bytes
    n_bytes: int = 0  # set for a line longer than --max-line-mb: only its first bytes are here


class _Clock:
    """Prefix dates (month-day, no year) -> epoch seconds; the year steps on at a wrap."""

    def __init__(self, year: int | None, tally: FileTally) -> None:
        self.year = year if year is not None else DEFAULT_YEAR
        self.given = year is not None
        self.last_month = 0
        self.tally = tally

    def at(self, month: int, day: int, hms: str) -> float:
        if month < self.last_month - 6:  # December -> January: the log crossed a new year
            self.year += 1
        self.last_month = month
        if not self.given:
            self.tally.note(f"vLLM's log prefix has no year: times are read as {DEFAULT_YEAR} UTC, to "
                            "the second (only the gaps between requests matter; --log-year sets it)")
        h, m, s = (int(x) for x in hms.split(":"))
        try:
            return datetime(self.year, month, day, h, m, s, tzinfo=timezone.utc).timestamp()
        except ValueError:
            raise LineError(f"the log prefix date {month:02d}-{day:02d} is not a date in {self.year}") from None


def _events(lines: Iterable[tuple[int, bytes | Oversize | CorruptStream]], clock: _Clock,
            tally: FileTally, json_records: bool) -> Iterator[_Event]:
    """Log lines -> request-logger events; other lines are counted as skipped."""
    for line_no, data in lines:
        tally.lines += 1
        if isinstance(data, CorruptStream):
            tally.note(f"{data}; the lines before it were read")
            tally.skipped["damaged stream"] += 1
            continue
        try:
            head = data.head if isinstance(data, Oversize) else data
            event = (_json_event(line_no, head) if json_records else _text_event(line_no, head, clock))
        except LineError as e:  # an impossible time: the request's other lines still count it once
            tally.skipped[f"a request line whose time cannot be read ({e.reason[:60]})"] += 1
            continue
        if event is None or (isinstance(data, Oversize) and json_records):
            tally.skipped["not a request line" if event is None else "a JSON log line longer than --max-line-mb"] += 1
            continue
        if isinstance(data, Oversize):
            event.n_bytes = data.n_bytes
        yield event


def _text_event(line_no: int, data: bytes, clock: _Clock) -> _Event | None:
    text = _ANSI.sub(b"", data).decode("utf-8", "replace")
    m = _PREFIX.search(text)
    if m is None:
        return None
    message = text[m.end():]
    if not message.startswith(("Request ", "Received request ", "Generated response ")):
        return None
    lead = _LEAD_TIME.match(text[: m.start()])
    t = (parse_time(lead.group(1), "the line's leading time", 1.0) if lead
         else clock.at(int(m.group("month")), int(m.group("day")), m.group("hms")))
    return _Event(line_no, t, message, data)


def _json_event(line_no: int, data: bytes) -> _Event | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not is_json_log_record(obj):
        return None
    message = obj["message"]
    if not message.startswith(("Request ", "Received request ", "Generated response ")):
        return None
    # logging's default asctime: "2026-11-03 10:00:05,123" (local time, read as UTC)
    stamp = str(obj["asctime"]).replace(",", ".", 1)
    return _Event(line_no, parse_time(stamp, "asctime", 1.0), message, data)


@dataclass
class _Request:
    """What the log says about one request id so far."""

    rid: str
    line: int
    time: float
    raw: bytes
    ids: list[int] | None = None
    ids_logged: bool = False  # a details line was seen (ids may still be None: embeddings)
    prompt: str | None = None
    params: str | None = None
    lora: str | None = None
    received: bool = False
    output_tokens: int | None = None
    output_text: str | None = None
    output_seen: bool = False


class ServerLog:
    """Joins the lines of each request id and hands out finished requests in arrival order."""

    def __init__(self, max_log_len: int | None, tally: FileTally) -> None:
        self.max_log_len = max_log_len
        self.inferred = False
        self.tally = tally
        self.open: OrderedDict[str, _Request] = OrderedDict()  # arrival order
        self.tokens_held = 0
        self.bodies: OrderedDict[str, tuple[Any, bool]] = OrderedDict()  # uuid -> (body | text, used)
        self.saw_outputs = False
        # ids whose details line was rejected lately: their "Received" line is no new request
        self.rejected: OrderedDict[str, None] = OrderedDict()

    # --- events ---
    def take(self, ev: _Event) -> Iterator[Record]:
        msg = ev.message
        if ev.n_bytes:
            yield from self._oversize(ev)
        elif msg.startswith("Request "):
            rest = msg[len("Request "):]
            body_at, details_at = rest.find(" JSON body: "), rest.find(" details: prompt: ")
            if body_at >= 0 and (details_at < 0 or body_at < details_at):
                self._body(rest[:body_at], rest[body_at + len(" JSON body: "):])
            elif details_at >= 0:
                yield from self._details(ev, rest[:details_at], rest[details_at + len(" details: prompt: "):])
        elif msg.startswith("Received request "):
            rid, sep, rest = msg[len("Received request "):].partition(": params: ")
            if sep:
                yield from self._received(ev, rid, rest)
        elif msg.startswith("Generated response "):
            self._output(msg[len("Generated response "):])
        yield from self._release(final=False)

    def _oversize(self, ev: _Event) -> Iterator[Record]:
        """A line too long to read: a details line rejects its request, anything else is skipped."""
        rest = ev.message.removeprefix("Request ")
        at = rest.find(" details: prompt: ")
        if ev.message.startswith("Request ") and at >= 0:
            rid = rest[:at]
            self.open.pop(rid, None)
            self.rejected[rid] = None
            self._body_for(rid)  # its body is accounted for by this reject
            yield Rejected(ev.line, LineError(
                f"the details line of request {rid[:60]} is {ev.n_bytes:,} bytes, longer than --max-line-mb; "
                "raise it to read this request", TOO_LONG), ev.raw, ev.n_bytes)
        else:
            self.tally.skipped["a log line longer than --max-line-mb"] += 1

    def finish(self) -> Iterator[Record]:
        yield from self._release(final=True)
        unused = sum(1 for _, used in self.bodies.values() if not used)
        if unused:
            self.tally.skipped["JSON body without a request line"] += unused

    def _request(self, ev: _Event, rid: str, again: bool) -> Iterator[Record]:
        """Open `rid` (a client may reuse an id: `again` says this line starts a new request
        when the open one already has it, and the open one is written first)."""
        req = self.open.get(rid)
        if req is not None and again:
            del self.open[rid]
            self.tokens_held -= len(req.ids or ())
            yield self._record(req)
            req = None
        if req is None:
            self.open[rid] = _Request(rid, ev.line, ev.time, ev.raw)

    def _body(self, uuid: str, text: str) -> None:
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text  # cut by --max-log-len (or damaged): kept as text, only its length is known
            if self.max_log_len is None and text.lstrip().startswith("{"):
                self.max_log_len, self.inferred = len(text), True
                self.tally.note(f"the server cut logged bodies at {len(text):,} characters: it ran with "
                                f"--max-log-len {len(text)}, so prompts of that many tokens or more were cut")
        self.bodies[uuid] = (body, False)
        while len(self.bodies) > PENDING_BODIES:
            _, (_, used) = self.bodies.popitem(last=False)
            if not used:
                self.tally.skipped["JSON body without a request line"] += 1

    def _details(self, ev: _Event, rid: str, rest: str) -> Iterator[Record]:
        old = self.open.get(rid)
        yield from self._request(ev, rid, again=old is not None and (old.ids_logged or old.received))
        req = self.open[rid]
        req.line, req.raw, req.time, req.ids_logged = ev.line, ev.raw, ev.time, True
        try:
            head, sep, tail = rest.rpartition(", prompt_token_ids: ")
            ids_text, sep2, _shape = tail.rpartition(", prompt_embeds shape: ")
            if not sep or not sep2:
                raise LineError("a details line without its prompt_token_ids field (the line is cut?)")
            req.prompt = None if head == "None" else _literal_str(head, "prompt")
            if ids_text != "None":
                try:
                    ids = json.loads(ids_text)
                except ValueError:
                    raise LineError("prompt_token_ids is not a list of integers (the line is cut?)") from None
                req.ids = check_ids(ids, "prompt_token_ids", INT32_MAX, "token id")
        except LineError as e:
            del self.open[rid]
            self.rejected[rid] = None
            self._body_for(rid)  # its body is accounted for by this reject
            while len(self.rejected) > PENDING_BODIES:
                self.rejected.popitem(last=False)
            yield Rejected(ev.line, e, ev.raw, len(ev.raw))
            return
        self.tokens_held += len(req.ids or ())

    def _received(self, ev: _Event, rid: str, rest: str) -> Iterator[Record]:
        if rid in self.rejected:  # the rest of a request whose details line was rejected
            del self.rejected[rid]
            return
        old = self.open.get(rid)
        yield from self._request(ev, rid, again=old is not None and old.received)
        req = self.open[rid]
        params, sep, lora = rest.rpartition(", lora_request: ")
        req.params, req.received = (params, True) if sep else (rest, True)
        lora = lora.removesuffix(".")
        if sep and lora != "None":
            m = _LORA_NAME.match(lora)
            req.lora = _literal_str(m.group(1), "lora_request.lora_name") if m else None
        if not req.ids_logged:
            req.line, req.raw = ev.line, ev.raw

    def _output(self, rest: str) -> None:
        out_at, ids_at = rest.find(": output: "), rest.find(" details: output_token_ids: ")
        if out_at < 0 and ids_at < 0:
            return
        is_ids = ids_at >= 0 and (out_at < 0 or ids_at < out_at)
        rid = rest[:ids_at] if is_ids else rest[:out_at]
        if rid.endswith(" (streaming delta)"):
            return  # pieces of a stream; the "(streaming complete)" line carries the whole reply
        req = self.open.get(_STREAM.sub("", rid))
        if req is None:
            return  # a reply to a request written already, or whose lines are not in the log
        self.saw_outputs = True
        if is_ids:
            text = rest[ids_at + len(" details: output_token_ids: "):]
            if req.output_tokens is None and text != "None":
                try:
                    ids = json.loads(text)
                except ValueError:
                    return
                if isinstance(ids, list) and not (self.max_log_len and len(ids) >= self.max_log_len):
                    req.output_tokens = len(ids)
        else:
            req.output_seen = True  # log_outputs writes the INFO line last
        if not is_ids and req.output_text is None:
            text, _, _ = rest[out_at + len(": output: "):].rpartition(", finish_reason: ")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return
            if isinstance(value, str) and not (self.max_log_len and len(value) >= self.max_log_len):
                req.output_text = value

    # --- finished requests ---
    def _release(self, final: bool) -> Iterator[Record]:
        """Write the oldest requests that are done: received and answered, or held too long."""
        while self.open:
            rid, req = next(iter(self.open.items()))
            crowded = len(self.open) > PENDING_REQUESTS or self.tokens_held > PENDING_TOKENS
            if not (final or crowded or (req.received and req.output_seen)):
                return
            del self.open[rid]
            self.tokens_held -= len(req.ids or ())
            yield self._record(req)

    def _body_for(self, rid: str) -> Any:
        m = _SERVER_ID.match(rid)
        for key in (rid, rid.removeprefix("chatcmpl-").removeprefix("cmpl-"), m.group("base") if m else rid):
            hit = self.bodies.get(key)
            if hit is not None:
                self.bodies[key] = (hit[0], True)
                return hit[0]
        return None

    def _record(self, req: _Request) -> Record:
        body = self._body_for(req.rid)
        try:
            row = self._row(req, body)
        except LineError as e:
            return Rejected(req.line, e, req.raw, len(req.raw))
        return Accepted(req.line, row, len(req.raw))

    def _row(self, req: _Request, body: Any) -> dict[str, Any]:
        if req.params is not None and not req.params.startswith("SamplingParams("):
            what = req.params.split("(", 1)[0]
            raise LineError(f"params are {what[:40]}: not a sampled generation (beam search and pooling "
                            "requests are not modelled)", NOT_MODELLED)
        if req.ids_logged and req.ids is None:
            raise LineError("the prompt was given as embeddings (prompt_token_ids: None): not modelled",
                            NOT_MODELLED)
        if req.ids is not None:
            if self.max_log_len is not None and len(req.ids) >= self.max_log_len:
                how = ("the ingest option --max-log-len" if not self.inferred
                       else "the server's cut JSON bodies")
                raise LineError(
                    f"prompt_token_ids has {len(req.ids):,} ids, the server's --max-log-len {self.max_log_len} "
                    f"(from {how}): the prompt was cut and its length is unknown; rerun vllm serve "
                    "without --max-log-len (or a larger one) to log whole prompts", CUT_PROMPT)
            row = self._base_row(body)
            cut = self.max_log_len is not None and req.prompt is not None and len(req.prompt) >= self.max_log_len
            row["kind"], row["prompt_token_ids"] = schema.KIND_TOKENS, req.ids
            row["prompt"] = None if cut else req.prompt  # the text is only shown, never tokenized
        elif isinstance(body, dict):
            row = _body_request(body)
            self.tally.note("requests without a prompt_token_ids line (logged at DEBUG) were rendered from "
                            "their JSON body with the tokenizer instead")
        else:
            why = ("its JSON body was cut by --max-log-len" if isinstance(body, str)
                   else "the log has only its INFO line")
            raise LineError(f"no prompt for request {req.rid[:60]}: {why}. {INFO_ONLY_FIX}", NO_PROMPT)
        row["format"] = schema.FORMAT_VLLM_LOG
        row["logged_id"], row["timestamp"] = req.rid, req.time
        if req.params is not None:
            _apply_params(row, req.params)
        else:
            self.tally.note("requests without their 'Received request' line: sampling parameters from the "
                            "JSON body (or vLLM's defaults)")
        if req.lora is not None:
            row["lora"] = req.lora
        if req.output_tokens is not None:
            row["output_tokens"] = req.output_tokens
        if req.output_text is not None and row.get("output_tokens") is None:
            row["output_text"] = req.output_text
        return row

    def _base_row(self, body: Any) -> dict[str, Any]:
        """model, cache_salt, session, max_tokens and sampling fields from the JSON body, if any."""
        if not isinstance(body, dict):
            if isinstance(body, str):
                self.tally.note("some JSON bodies were cut: their model, cache_salt and session are unknown")
            return {"echo": False, "n": 1}
        try:
            row = _body_request(body)
        except LineError:  # a body of an endpoint whose shape ingest does not read
            row = {"model": body.get("model") if isinstance(body.get("model"), str) else None,
                   "cache_salt": body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None}
        keep = ("model", "max_tokens", "cache_salt", "session_id", "lora", "n", "echo", "logprobs",
                "prompt_logprobs")
        return {k: row.get(k) for k in keep}


def _body_request(body: dict[str, Any]) -> dict[str, Any]:
    row = parse_request(body, None, 1)
    row.pop("timestamp", None)  # a body's own times are not the arrival; the log line's is
    row.pop("logged_id", None)
    return row


def _apply_params(row: dict[str, Any], params: str) -> None:
    """The sampling parameters vLLM derived for the request (they include echo's effect)."""
    m = _N.match(params)
    if m:
        row["n"] = int(m.group(1))
    m = _MAX_TOKENS.search(params)
    if m and m.group(1) != "None" and row.get("max_tokens") is None:
        row["max_tokens"] = int(m.group(1))
    m = _LOGPROBS.search(params)
    if m:
        row["logprobs"] = None if m.group(1) == "None" else int(m.group(1))
        row["prompt_logprobs"] = None if m.group(2) == "None" else int(m.group(2))
        row["echo"] = False  # the server already turned echo into prompt_logprobs


def _literal_str(text: str, what: str) -> str:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise LineError(f"{what} is not a quoted string (the line is cut?)", WRONG_FIELD) from None
    if not isinstance(value, str):
        raise LineError(f"{what} is not a string")
    return value


def server_log_records(lines: Iterable[tuple[int, bytes | Oversize | CorruptStream]], tally: FileTally, *,
                       max_log_len: int | None, log_year: int | None, json_records: bool = False,
                       ) -> Iterator[Record]:
    """The requests of one server log, in arrival order (see the module docstring)."""
    log = ServerLog(max_log_len, tally)
    units = 0
    for ev in _events(lines, _Clock(log_year, tally), tally, json_records):
        for rec in log.take(ev):
            units += 1
            yield rec
    for rec in log.finish():
        units += 1
        yield rec
    if not units:
        tally.note("a vLLM server log without request lines: start vllm serve with --enable-log-requests "
                   "(and VLLM_LOGGING_LEVEL=DEBUG, for the prompts' token ids)")
    elif not log.saw_outputs:
        tally.note("no reply lines (vllm serve --enable-log-outputs): output lengths are unknown (0)")
