"""``align serve``: catalogue search by text, photo or sound (and recommendations) over HTTP.

    align serve --index runs/demo/index [--recommender runs/demo/rec] --port 8000

One uvicorn worker holds the model, the index and (with ``--recommender``) the recommender head;
queries arriving together share a forward of their tower (align/serve/batching.py), which runs in
a thread so the event loop keeps taking requests. Torch's thread count is left to the user
(``OMP_NUM_THREADS`` / ``torch.set_num_threads``): one worker, one forward at a time, no
oversubscription.

Endpoints (JSON answers; errors are ``{"detail": "<what is wrong and what to do>", "field": "<the
request field>"}`` with a 4xx status, and the server goes on serving):

``POST /search``
    JSON ``{"text": "red striped scarf", "k": 10, "where": {"category": "scarf"}}``, or a
    multipart upload with ONE file field ``image`` or ``audio`` (and optional form fields ``k`` and
    ``where``, the latter a JSON object). ``text`` is at most 8192 characters; ``k`` is 1..1000
    (default 10); ``where`` keeps the items whose metadata equals every given value: text, a
    number or a boolean, compared as the index keeps metadata (``metadata_text``: ``true`` or
    ``"true"`` matches a catalogue's JSON true, ``10`` or ``"10"`` its 10.0; keys and values are
    stripped). Answer: ``{"results": [{"id": "...", "score": 0.83,
    "metadata": {...}}, ...]}`` best first (``metadata`` when the index keeps some for the item).
``POST /recommend`` (with ``--recommender``)
    ``{"user": "u-17", "k": 10}`` (the user's history from the head's interaction log) or
    ``{"history": ["id1", "id2"], "k": 10}`` (oldest first). Answer: ``{"results": [{"id",
    "score"}], "history": [...]}``, scores being the head's cosine. A ``user``'s history is their
    log's items followed by their live events (``POST /events``); a user with live events only
    is served from those.
``POST /events`` (with ``--recommender``)
    ``{"user": "u-17", "item": "id1", "event": "click", "timestamp": 1714000000}`` (timestamp
    optional: seconds or ISO-8601; the server's clock when absent). Read by that user's next
    ``/recommend``, no retraining. Memory is bounded (align/rec/events.py): the newest
    ``--events-per-user`` events per user, at most ``--event-users`` users (least recently used
    forgotten first). Answer: ``{"user", "events": <held for the user>, "limits": {...}}``.
``"explain": true`` (a field of /search, JSON or form, and of /recommend)
    Each result also gets ``"explanation"``: ``{"modalities": {"method", "shares": {modality:
    share}, "score"}, "words": [{"word", "field", "score", ...}]}`` (on /search the modalities
    also give ``"rest"``: shares + rest = score), on /recommend also
    ``"history": {"method", "contributions": [{"id", "position", "contribution"}], "unread"}``;
    the answer gets ``query_words`` or ``user_words`` (align/explain/report.py). The first such
    request embeds the catalogue's words (seconds). 422 for an ``explain`` that is not true or
    false, 409 when the server cannot explain (the message says why).
``GET /healthz``
    ``{"status": "ok", "items", "dim", "modalities", "kind", "batching": {"forwards", "rows",
    "mean_batch", ...}, ...}``.

Statuses: 400 an unreadable upload, a photo of over 64M pixels, an unknown file field, text and a
file together, a modality the model lacks; 404 an unknown user, or /recommend or /events without
a recommender; 413 a body over ``--max-upload-mb``, a form field (not a file) over 64 KiB; 422
malformed JSON, empty text or text over 8192 characters, ``k`` outside 1..1000, an unknown or
mistyped field, unknown history items, an event's unknown item or event type or missing field.
Every answer is ASCII JSON (other characters escaped), so one that echoes a request's lone
surrogate still renders.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from align.errors import MODALITIES, ConfigError, RunError
from align.explain.report import Explainers, attach_explanation
from align.index.index import metadata_text
from align.index.search import FilterError, QueryEncoder, QueryError, open_catalogue, search
from align.rec.events import DEFAULT_EVENT_TYPES, EventError, LiveEvents, identity_map, names_list, parse_event
from align.serve.batching import MicroBatcher

log = logging.getLogger(__name__)

MAX_K = 1000
MIB = 1024 * 1024
FORM_SLACK = 64 * 1024  # multipart boundaries, part headers and the small fields around the file
# (also the most a form field other than a file may hold)
MAX_TEXT_CHARS = 8192  # a text query's most characters: it is tokenised on the event loop, and a
# text tower reads only its first tokens (CLIP: 77) anyway
DRAIN_FACTOR = 8  # an oversized body is read (and dropped) up to this many times the limit, so the
# client gets its 413 instead of a broken pipe; past that the connection is simply closed
FILE_FIELDS = tuple(m for m in MODALITIES if m != "text")
SEARCH_FIELDS = ("text", "k", "where", "explain")
RECOMMEND_FIELDS = ("user", "history", "k", "explain")


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped. A request may hold a lone surrogate
    (``"\\ud800"`` is valid JSON) that an answer echoes (an error naming the field, an event's
    user); UTF-8 cannot encode it, so starlette's JSONResponse would fail with a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, indent=None,
                          separators=(",", ":")).encode("ascii")


class RequestError(Exception):
    """A request the server refuses: an HTTP status, the request field at fault and a message."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


@dataclass
class SearchQuery:
    """One parsed /search request: the query (text, or a file's bytes) and what to return."""

    modality: str
    value: Any  # str for text, bytes for image and audio
    name: str  # how errors name the query (the field, and the file name when uploaded)
    k: int
    where: Dict[str, str]
    explain: bool = False  # answer each result's explanation too (align/explain)


# ------------------------------------------------------------------------------------------------
# request parsing: every refusal names the field
# ------------------------------------------------------------------------------------------------
def parse_k(value: Any, default: int = 10) -> int:
    """``k`` from JSON (an integer) or a form field (its digits); 422 outside 1..1000."""
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise RequestError(422, "k", f"k must be an integer from 1 to {MAX_K}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(422, "k", f"k must be an integer from 1 to {MAX_K}, got {value!r}")
    if not 1 <= value <= MAX_K:
        raise RequestError(422, "k", f"k must be from 1 to {MAX_K}, got {value}")
    return value


def parse_where(value: Any) -> Dict[str, str]:
    """``where``: a JSON object of metadata key -> text, number or boolean, each value in the text
    form the index keeps (``metadata_text``: ``true`` -> "true", ``10.0`` -> "10"), keys and values
    stripped; 422 naming ``where.<key>`` for an object, a list, null or an empty value."""
    if value is None:
        return {}
    if isinstance(value, str):  # a form field carries it as JSON text
        value = json_value(value, "where", "{\"category\": \"scarf\"}")
    if not isinstance(value, dict):
        raise RequestError(422, "where", f"where must be an object of metadata key -> value, got "
                                         f"{type(value).__name__}")
    where: Dict[str, str] = {}
    for key, item in value.items():
        key = key.strip()
        if isinstance(item, (dict, list)) or item is None:
            kind = "null" if item is None else "an object" if isinstance(item, dict) else "a list"
            raise RequestError(422, "where", f"where.{key}: the value must be text, a number or true/false, "
                                             f"got {kind}")
        text = metadata_text(item)
        if not key or text is None:
            empty = "the key is empty" if not key else "the value is empty or NaN"
            raise RequestError(422, "where", f"where.{key}: {empty}; give e.g. {{\"category\": \"scarf\"}}")
        if where.get(key, text) != text:
            raise RequestError(422, "where", f"where.{key}: given twice ({where[key]!r} and {text!r})")
        where[key] = text
    return where


def parse_explain(value: Any) -> bool:
    """``explain``: JSON true/false, or a form field's "true"/"false" (also 1/0, yes/no); 422 otherwise."""
    if value is None:
        return False
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if not isinstance(value, bool):
        raise RequestError(422, "explain", f"explain must be true or false, got {value!r}")
    return value


def json_value(data: Union[str, bytes], field: str, example: str) -> Any:
    """``data`` read as JSON; 422 naming ``field`` when it is not JSON, or nests so deeply that
    Python's decoder runs out of stack (a RecursionError: 100 KB of "[" is enough)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        what = "the body" if field == "body" else f"the {field} field"
        raise RequestError(422, field, f"{what} is not valid JSON ({reason}); send e.g. {example}") from None


def parse_json_object(body: bytes) -> Dict[str, Any]:
    """The request body as a JSON object; 422 naming the problem otherwise."""
    value = json_value(body, "body", "{\"text\": \"red scarf\", \"k\": 10}")
    if not isinstance(value, dict):
        raise RequestError(422, "body", f"the body must be a JSON object, got {type(value).__name__}")
    return value


def parse_text(value: Any) -> str:
    """``text`` (JSON or a form field): a string with some words, of at most ``MAX_TEXT_CHARS``
    characters; 422 naming ``text`` otherwise."""
    if not isinstance(value, str):
        raise RequestError(422, "text", f"text must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RequestError(422, "text", "text is empty; give some words to search for")
    if len(value) > MAX_TEXT_CHARS:
        raise RequestError(422, "text", f"text is {len(value):,} characters, over the limit of {MAX_TEXT_CHARS:,}; "
                                        f"send a shorter query (the text tower reads only its first tokens)")
    return value


def search_query_from_json(body: Dict[str, Any]) -> SearchQuery:
    """A /search JSON object -> ``SearchQuery`` (text queries; files come as multipart)."""
    for key in body:
        if key in FILE_FIELDS:
            raise RequestError(400, key, f"send an {key} as a multipart file field {key!r} "
                                         f"(curl -F {key}=@file), not inside JSON")
        if key not in SEARCH_FIELDS:
            raise RequestError(422, key, f"unknown field {key!r}; /search takes {', '.join(SEARCH_FIELDS)} "
                                         f"(or a multipart {' or '.join(FILE_FIELDS)} file)")
    if "text" not in body:
        raise RequestError(422, "text", "give the text to search for, or upload an image or audio file as multipart")
    return SearchQuery("text", parse_text(body["text"]), "text", parse_k(body.get("k")),
                       parse_where(body.get("where")), parse_explain(body.get("explain")))


def _declared_length(request: Request) -> Optional[int]:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


async def read_body(request: Request, max_upload: int, slack: int = 0) -> bytes:
    """The request body; 413 when it is over ``max_upload + slack`` bytes (``slack``: room for the
    multipart wrapping around a file of ``max_upload`` bytes). The refusal names the upload's file
    field when the body shows it, else ``body``."""
    limit = max_upload + slack
    declared = _declared_length(request)
    body, total = bytearray(), 0
    if declared is None or declared <= DRAIN_FACTOR * limit:
        async for chunk in request.stream():  # chunked bodies have no length: count as they come
            total += len(chunk)
            if total <= limit:
                body += chunk
            elif total > DRAIN_FACTOR * limit:
                break
    if max(total, declared or 0) > limit:
        field = re.search(rb'name="([A-Za-z_]+)"; filename=', bytes(body[:FORM_SLACK]))
        raise too_big(field.group(1).decode() if field else "body", max(total, declared or 0), max_upload)
    return bytes(body)


def too_big(field: str, size: int, max_upload: int) -> RequestError:
    """The 413 refusal of an upload of ``size`` bytes."""
    what = "request" if field == "body" else field
    return RequestError(413, field, f"the {what} is {size:,} bytes, over this server's upload limit of "
                                    f"{max_upload / MIB:g} MiB ({max_upload:,} bytes; align serve --max-upload-mb)")


def form_field_too_big(body: bytes, content_type: str) -> RequestError:
    """The 413 refusal of a multipart body with a field (not a file) over ``FORM_SLACK`` bytes.
    starlette does not say which field it was, so the body's largest such part is named (``form``
    when the body shows none)."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    field, size = "form", 0
    for part in body.split(b"--" + boundary.group(1).encode("latin-1")) if boundary else []:
        headers, _, data = part.partition(b"\r\n\r\n")
        name = re.search(rb'\bname="([^"]*)"', headers)
        if name and b"filename=" not in headers and len(data) > max(size, FORM_SLACK):
            field, size = name.group(1).decode("utf-8", "replace"), len(data)
    what = "a form field" if field == "form" else f"the form field {field!r}"
    hint = (f"; a text query is at most {MAX_TEXT_CHARS:,} characters" if field == "text"
            else "; send large content as a file field")
    return RequestError(413, field, f"{what} is over {FORM_SLACK // 1024} KiB ({FORM_SLACK:,} bytes), the most a "
                                    f"form field other than a file may hold{hint}")


async def search_query_from_form(request: Request, max_upload: int) -> SearchQuery:
    """A multipart /search request -> ``SearchQuery``: one file field ``image`` or ``audio`` (or a
    ``text`` field), optional ``k`` and ``where``."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    body = await read_body(request, max_upload, FORM_SLACK)
    replayed = False

    async def receive() -> Dict[str, Any]:  # the body again, for starlette's form parser
        nonlocal replayed
        if replayed:
            return {"type": "http.disconnect"}
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=4, max_fields=16, max_part_size=FORM_SLACK)
    except (HTTPException, MultiPartException) as error:
        message = str(getattr(error, "detail", None) or getattr(error, "message", None) or error)
        if message.startswith("Part exceeded maximum size"):  # starlette's words for a field over max_part_size
            raise form_field_too_big(body, request.headers.get("content-type", "")) from None
        raise RequestError(400, "body", f"malformed multipart form: {message}") from None
    try:
        files: List[Tuple[str, Any]] = []
        fields: Dict[str, str] = {}
        for key, value in form.multi_items():
            if not isinstance(value, str):  # an UploadFile
                if key not in FILE_FIELDS:
                    raise RequestError(400, key, f"unknown file field {key!r}; upload the query as "
                                                 f"{' or '.join(repr(f) for f in FILE_FIELDS)}")
                files.append((key, value))
            elif key in FILE_FIELDS:
                raise RequestError(400, key, f"{key!r} must be a file upload (curl -F {key}=@file), not a text field")
            elif key not in SEARCH_FIELDS:
                raise RequestError(422, key, f"unknown form field {key!r}; a multipart /search takes a file "
                                             f"{' or '.join(FILE_FIELDS)} and the fields k, where and explain")
            else:
                fields[key] = value
        if len(files) > 1:
            raise RequestError(400, files[1][0], f"one query per request: got files {[f[0] for f in files]}")
        if files and "text" in fields:
            raise RequestError(400, "text", f"give text or a file, not both (got text and {files[0][0]!r})")
        k, where = parse_k(fields.get("k")), parse_where(fields.get("where"))
        explain = parse_explain(fields.get("explain"))
        if not files:
            if "text" not in fields:
                raise RequestError(422, "body", f"no query: upload a file field {' or '.join(FILE_FIELDS)}, "
                                                f"or send JSON {{\"text\": ...}}")
            return SearchQuery("text", parse_text(fields["text"]), "text", k, where, explain)
        key, upload = files[0]
        data = await upload.read()
        if len(data) > max_upload:
            raise too_big(key, len(data), max_upload)
        name = f"{key} upload" + (f" {upload.filename!r}" if upload.filename else "")
        return SearchQuery(key, data, name, k, where, explain)
    finally:
        await form.close()


def recommend_request(body: Dict[str, Any]) -> Tuple[Optional[str], Optional[List[str]], int]:
    """A /recommend JSON object -> (user or None, history or None, k)."""
    for key in body:
        if key not in RECOMMEND_FIELDS:
            raise RequestError(422, key, f"unknown field {key!r}; /recommend takes {', '.join(RECOMMEND_FIELDS)}")
    if ("user" in body) == ("history" in body):
        raise RequestError(422, "user", "give either user (an id of the interaction log) or history "
                                        "(item ids, oldest first), not both or neither")
    k = parse_k(body.get("k"))
    if "user" in body:
        user = body["user"]
        if not isinstance(user, (str, int)) or isinstance(user, bool) or not str(user).strip():
            raise RequestError(422, "user", f"user must be a non-empty id string, got {user!r}")
        return str(user), None, k
    history = body["history"]
    if not isinstance(history, list) or not all(isinstance(i, str) and i.strip() for i in history):
        raise RequestError(422, "history", "history must be a list of item id strings, oldest first")
    return None, list(history), k


# ------------------------------------------------------------------------------------------------
# the service
# ------------------------------------------------------------------------------------------------
class UserHistories:
    """Each user's items in time order from the recommender's interaction log, read once on first
    use (as ``align recommend --user`` reads it, but not again per request)."""

    def __init__(self, recommender: Any) -> None:
        self.recommender = recommender
        self._items: Optional[Dict[str, List[str]]] = None
        self._lock = asyncio.Lock()

    def _read(self) -> Dict[str, List[str]]:
        from align.rec.interactions import read_catalogue_ids, read_interactions
        from align.rec.split import user_histories

        data = self.recommender.config.data
        log_rows, _ = read_interactions(data.interactions, read_catalogue_ids(data.catalogue, data.id_column),
                                        data.columns, data.max_bad_fraction)
        return {user: [log_rows.item_ids[i] for i in codes]
                for user, codes in zip(log_rows.user_ids, user_histories(log_rows))}

    async def of(self, user: str, live: Optional[List[str]] = None) -> List[str]:
        """The user's logged items, then ``live`` (their events since the server started, POST
        /events); a user the log lacks has ``live`` alone, and with none of it is a 404."""
        async with self._lock:
            if self._items is None:
                self._items = await asyncio.get_running_loop().run_in_executor(None, self._read)
        if user not in self._items and not live:
            raise RequestError(404, "user", f"no user {user!r} in {self.recommender.config.data.interactions}; "
                                            f"send {{\"history\": [item ids]}} for a new user, or their events to "
                                            f"POST /events")
        return self._items.get(user, []) + list(live or [])


class Service:
    """What the endpoints share: the query encoder, the index, the batcher, the recommender."""

    def __init__(self, encoder: QueryEncoder, index: Any, recommender: Any = None, max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_upload_mb: float = 10.0, events_per_user: int = 50,
                 event_users: int = 10_000, event_types: Tuple[str, ...] = DEFAULT_EVENT_TYPES) -> None:
        self.encoder, self.index, self.recommender = encoder, index, recommender
        self.max_upload = int(max_upload_mb * MIB)
        self.batcher = MicroBatcher(encoder.encode_prepared, encoder.modalities, max_batch, max_wait_ms)
        # Index searches are short and serial; their own thread keeps them off the event loop
        # without queueing behind a forward.
        self.search_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="align-search")
        self.histories = UserHistories(recommender) if recommender is not None else None
        self.explainers = Explainers(encoder, index, recommender)  # "explain": true, built on first use
        # POST /events: bounded per user and in users (align/rec/events.py)
        self.events = LiveEvents(events_per_user, event_users)
        self.event_items = identity_map(recommender.item_ids) if recommender is not None else {}
        self.event_types = identity_map(event_types)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.search_executor.shutdown(wait=True)

    def health(self) -> Dict[str, Any]:
        return {"status": "ok", "items": len(self.index), "dim": self.encoder.dim,
                "modalities": self.encoder.modalities, "kind": self.index.kind,
                "vectors": getattr(self.index, "modality", None), "checkpoint": self.encoder.checkpoint,
                "recommender": self.recommender is not None, "batching": self.batcher.stats.as_dict(),
                "events": self.events.stats()}

    async def search(self, query: SearchQuery) -> Dict[str, Any]:
        loop = asyncio.get_running_loop()
        try:
            self.encoder.check_modality(query.modality)
            if query.modality == "text":  # tokenising is cheap (cached, at most MAX_TEXT_CHARS): on the loop
                prepared = self.encoder.prepare("text", query.value, query.name)
            else:  # decoding a photo or a sound is not: in a thread
                prepared = await loop.run_in_executor(None, self.encoder.prepare, query.modality, query.value,
                                                      query.name)
        except QueryError as error:
            raise RequestError(422 if query.modality == "text" else 400, query.modality, str(error)) from None
        vector = await self.batcher.encode(query.modality, prepared)  # (D,)
        try:
            results = await loop.run_in_executor(self.search_executor, search, self.index, vector[None], query.k,
                                                 query.where)
        except FilterError as error:
            raise RequestError(422, "where", str(error)) from None
        answer = {"results": results[0]}
        if query.explain and results[0]:
            why = await self.explain(self.explainers.search, vector, [r["id"] for r in results[0]])
            attach_explanation(answer, answer["results"], why)
        return answer

    async def explain(self, explainer: Any, *args: Any) -> Dict[str, Any]:
        """An ``Explainers`` method's answer, run on the forwards' thread (it may embed the
        vocabulary with the text tower); 409 naming ``explain`` when this server cannot explain."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.batcher.executor, explainer, *args)
        except RunError as error:
            raise RequestError(409, "explain", f"cannot explain: {error}") from None

    def require_recommender(self) -> None:
        if self.recommender is None:
            raise RequestError(404, "recommender", "this server has no recommender; start it with "
                                                   "align serve --recommender <folder of align rec-train>")

    async def recommend(self, user: Optional[str], history: Optional[List[str]], k: int) -> Dict[str, Any]:
        self.require_recommender()
        if user is not None:
            history = await self.histories.of(user, self.events.user_items(user))  # log + live events
        try:
            rows = self.recommender.rows_of(history, "history" if user is None else f"user {user}'s history")
        except RunError as error:  # a history sent names unknown items (422); a logged one does (409)
            raise (RequestError(422, "history", str(error)) if user is None
                   else RequestError(409, "user", str(error))) from None
        picked, scores = await asyncio.get_running_loop().run_in_executor(
            self.batcher.executor, self.recommender.recommend, [rows], k)  # beside the forwards, not on top
        results = [{"id": self.recommender.item_ids[r], "score": float(s)}
                   for r, s in zip(picked[0].tolist(), np.asarray(scores[0]).tolist()) if r >= 0]
        return {"results": results, "history": history}

    def add_event(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """Keep one POST /events object for its user's next /recommend; 422 naming the field at fault."""
        self.require_recommender()
        try:
            event = parse_event(body, self.event_items, self.event_types)
        except EventError as error:
            raise RequestError(422, error.field, error.message) from None
        held = self.events.add(event)
        return {"user": event.user, "events": held,
                "limits": {"events_per_user": self.events.max_events_per_user, "users": self.events.max_users}}


def create_app(encoder: QueryEncoder, index: Any, recommender: Any = None, max_batch: int = 32,
               max_wait_ms: float = 5.0, max_upload_mb: float = 10.0, events_per_user: int = 50,
               event_users: int = 10_000, event_types: Tuple[str, ...] = DEFAULT_EVENT_TYPES) -> FastAPI:
    """The FastAPI app over ``index`` (``open_index``'s), queries encoded by ``encoder``,
    recommendations by ``recommender`` (an ``align.rec.recommend.Recommender``) when given, live
    events kept within ``events_per_user`` per user and ``event_users`` users."""
    service = Service(encoder, index, recommender, max_batch, max_wait_ms, max_upload_mb, events_per_user,
                      event_users, event_types)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        await service.start()  # the batcher's queues and workers live in the server's loop
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="align", description="Catalogue search by text, photo or sound; recommendations.",
                  lifespan=lifespan, default_response_class=AsciiJSONResponse)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def refused(_: Request, error: RequestError) -> JSONResponse:
        return AsciiJSONResponse({"detail": error.message, "field": error.field}, status_code=error.status)

    @app.get("/healthz")
    async def healthz() -> Dict[str, Any]:
        return service.health()

    @app.post("/search")
    async def search_endpoint(request: Request) -> Dict[str, Any]:
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("multipart/form-data"):
            query = await search_query_from_form(request, service.max_upload)
        else:  # JSON, whatever the header says (curl -d sends x-www-form-urlencoded)
            query = search_query_from_json(parse_json_object(await read_body(request, service.max_upload)))
        return await service.search(query)

    @app.post("/recommend")
    async def recommend_endpoint(request: Request) -> Dict[str, Any]:
        service.require_recommender()  # said before the body is looked at
        body = parse_json_object(await read_body(request, service.max_upload))
        user, history, k = recommend_request(body)
        explain = parse_explain(body.get("explain"))
        answer = await service.recommend(user, history, k)
        if explain and answer["results"]:  # the history the answer was made from, live events included
            results = answer["results"]
            why = await service.explain(service.explainers.recommend, answer["history"], [r["id"] for r in results],
                                        [r["score"] for r in results])
            attach_explanation(answer, results, why)
        return answer

    @app.post("/events")
    async def events_endpoint(request: Request) -> Dict[str, Any]:
        service.require_recommender()
        return service.add_event(parse_json_object(await read_body(request, service.max_upload)))

    return app


# ------------------------------------------------------------------------------------------------
# align serve
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="an `align index` folder or an `align embed` items folder")
    parser.add_argument("--checkpoint", help="model folder (default: the one recorded with the index)")
    parser.add_argument("--recommender", help="folder written by `align rec-train` (enables POST /recommend)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=32, help="most queries in one forward (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a query waits for others to share its forward (default 5)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MiB (default 10)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action="store_true", help="log every request (off: it costs throughput)")
    parser.add_argument("--events-per-user", type=int, default=50,
                        help="POST /events: newest events kept per user (default 50)")
    parser.add_argument("--event-users", type=int, default=10_000,
                        help="POST /events: most users held, least recently used forgotten first (default 10000)")
    parser.add_argument("--event-types", type=names_list, default=",".join(DEFAULT_EVENT_TYPES),
                        help=f"POST /events: the event types taken (default {','.join(DEFAULT_EVENT_TYPES)})")
    return parser


def check_serve_args(args: argparse.Namespace) -> None:
    """``ConfigError`` naming the flag for a value that cannot be used, before anything is loaded."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 0..65535")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch {args.max_batch}: must be at least 1")
    if not args.max_wait_ms >= 0:
        raise ConfigError(f"--max-wait-ms {args.max_wait_ms}: must be >= 0")
    if not args.max_upload_mb > 0:
        raise ConfigError(f"--max-upload-mb {args.max_upload_mb}: must be > 0")
    if args.recommender is not None and not os.path.isdir(args.recommender):
        raise ConfigError(f"--recommender {args.recommender}: no such folder (give the output of align rec-train)")
    if args.events_per_user < 1 or args.event_users < 1:
        raise ConfigError(f"--events-per-user {args.events_per_user} / --event-users {args.event_users}: "
                          f"each must be at least 1")
    if not args.event_types:
        raise ConfigError("--event-types: name at least one event type, e.g. view,click,purchase")


def main(argv: Optional[List[str]] = None) -> int:
    """``align serve``: runs until interrupted; a ``ConfigError`` / ``RunError`` is left to align/cli.py."""
    import uvicorn

    args = _parser().parse_args(argv)
    check_serve_args(args)
    index, encoder = open_catalogue(args.index, args.checkpoint, args.device)
    recommender = None
    if args.recommender is not None:
        from align.rec.recommend import Recommender

        recommender = Recommender.load(args.recommender)
    app = create_app(encoder, index, recommender, args.max_batch, args.max_wait_ms, args.max_upload_mb,
                     args.events_per_user, args.event_users, args.event_types)
    log.info("serving %d items (%s index, dim %d, %s queries%s) from %s", len(index), index.kind, encoder.dim,
             "/".join(encoder.modalities), ", recommendations" if recommender is not None else "", args.index)
    # One worker: the model is loaded once and each forward already uses torch's threads.
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, workers=1, log_level=args.log_level,
                                  access_log=args.access_log)).run()
    return 0
