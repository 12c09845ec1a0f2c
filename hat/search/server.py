"""The search page and JSON API of an index, served locally (FastAPI + uvicorn):

    python -m hat.search serve INDEX [--host 127.0.0.1] [--port 8000] [--device cpu] [--batch-queries]

`create_app(index)` is the application of an opened `SearchIndex` (tests drive it with
FastAPI's TestClient); `serve` opens the index, binds the socket and runs uvicorn.

Routes (every one a GET):

* ``/`` and ``/?q=...&k=...``: a search box (an HTML form sent with GET) and the results
  as a grid of thumbnails with their rank, score and file name, best first, rendered on
  the server: the page holds no script. A HAT result links to ``/attention``, a result
  of a model without attention maps (Multi-SEA) to the picture itself (``/image/...``).
  A query or k that cannot be searched shows its one-line message in the page, status 400.
* ``/attention?q=...&path=...``: HAT's word-region attention of the query over that
  picture, one row of heat maps per level, one map per token, drawn by the gallery's own
  functions (`hat.gallery.attention_table`, `attention_legend`, `STYLE`).
* ``/api/search?q=...&k=...`` -> ``{"results": [{"path", "score"}, ...], "note": str | null}``,
  exactly what ``python -m hat.search query INDEX Q -k K --json`` prints (the same order,
  the same float values), the truncation note included; ``/api/health`` -> ``{"status":
  "ok", "model", "pictures", "root", "scoring": {"mode", "batches", "requests", "calls",
  "largest_batch"}}`` (`Batcher.stats`). Their errors are JSON ``{"detail": "one line"}``:
  400 for a query or k that cannot be searched, 404 for an unknown picture or route.
* ``/thumb/{path}``: an indexed picture as a JPEG of at most THUMB_PX pixels a side
  (EXIF orientation applied, made once and kept in an in-memory LRU of THUMB_CACHE
  entries keyed by path, size and mtime); ``/image/{path}``: the file itself, with the
  content type of what it holds (PIL's format, not its name). Both serve only files of
  the index: the path must be one of ``index.paths`` (`SearchIndex.resolve`: '..',
  absolute paths, '%2e%2e', unindexed files are 404) and the file, links followed, must
  lie under the index's image folder (a link that points out of it is 404 too, even when
  it was indexed; so is the attention page of such a picture).

Query parameters and picture paths are decoded from the raw request (percent-escapes as
UTF-8 with surrogate escapes), so a query whose bytes are not UTF-8 is refused in one
line as the command line refuses it (`check_text`), where the framework would have
replaced the bytes with U+FFFD; file names whose bytes are not UTF-8 round-trip. JSON is
written ASCII-only (such names as \\udcXX escapes, as the query command's --json).

Concurrency: every model call (scoring, the attention maps, the tokenizer) runs on one
worker thread, one call at a time (`Batcher`); the search requests that arrived while a
call ran are taken together by the next one (at most MAX_BATCH). By default each
distinct request of such a batch is then computed as the query command computes it, so
that every answer is the query command's bit for bit; ``joint=True`` (``serve
--batch-queries``) scores them in one `SearchIndex.search` call instead, which saves
text-encoder time (one padded batch) but changes the scores' last bits (measured: up to
~1e-6 relative; HAT's per-pair scoring costs the same per query either way). The search
endpoints await the worker (``async``); the thumbnail, image and attention routes are
plain ``def`` (run in the threadpool), so nothing blocks the event loop.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import html
import io
import json
import os
import re
import socket
import threading
import urllib.parse

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from hat.search.checks import SearchError, check_k, check_text
from hat.search.index import Hits

THUMB_PX = 256  # longest side of a thumbnail
THUMB_CACHE = 1024  # thumbnails kept in memory (~10-20 kB each)
MAX_BATCH = 32  # search requests taken together at most
DEFAULT_K = 10  # results when the request names no k
SHOWN_PX = 192  # a thumbnail's box on the page (CSS pixels)


class _Job:
    """One piece of model work for the worker: a search (query, k) or a call (fn, args)."""

    __slots__ = ("kind", "payload", "future")

    def __init__(self, kind: str, payload):
        self.kind, self.payload, self.future = kind, payload, concurrent.futures.Future()


class Batcher:
    """The index's model work on one worker thread, one call at a time.

    `submit` queues a search and returns its Future; `call` runs any other function of
    the model (the attention maps) on the same thread, alone. The worker takes the oldest
    job; when it is a search, every other search then waiting (up to ``max_batch`` in
    all) goes with it: a batch. Each request's query and k are checked on the worker
    (the tokenizer is used by one thread only), so that a bad one fails alone. Then:

    * ``joint=False`` (the default, exact): every distinct (query, k) of the batch is one
      ``index.search([query], k)`` call, what the query command runs, so every answer is
      the query command's, bit for bit; a request repeated in the batch is computed once.
    * ``joint=True``: the batch's distinct queries are one ``index.search(queries, K)``
      call (K: the batch's largest k; each request gets its first k). Faster where text
      encoding is a large part of a query's cost (one padded batch instead of one per
      query), but the text encoder's results, and so the scores, differ from a query's
      alone in their last bits (up to ~1e-6 relative measured: padding and batch size
      change the GEMMs), which can swap two results whose scores are that close.

    ``stats()``: ``batches`` taken, ``requests`` answered, ``calls`` of ``index.search``
    (the scoring calls), ``largest_batch``. The thread starts with the first job (a
    daemon: it never keeps the process alive); `close` ends it once the queue is empty."""

    def __init__(self, index, max_batch: int = MAX_BATCH, joint: bool = False):
        self.index, self.max_batch, self.joint = index, max_batch, joint
        self.batches = self.requests = self.calls = self.largest_batch = 0
        self._jobs: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, query: str, k: int) -> concurrent.futures.Future:
        """Queue the search of ``query`` for ``k`` results -> a Future of its `Hits`
        (or of the SearchError that refused it)."""
        return self._put(_Job("search", (query, k)))

    def search(self, query: str, k: int):
        """`submit` and wait: the `Hits` of ``query``."""
        return self.submit(query, k).result()

    def call(self, function, *args):
        """Run ``function(*args)`` on the worker, alone, and wait for its result."""
        return self._put(_Job("call", (function, args))).result()

    def stats(self) -> dict:
        with self._ready:
            return {"mode": "joint" if self.joint else "exact", "batches": self.batches, "requests": self.requests,
                    "calls": self.calls, "largest_batch": self.largest_batch}

    def close(self) -> None:
        """Stop the worker once the jobs queued so far are done."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _put(self, job: _Job) -> concurrent.futures.Future:
        with self._ready:
            if self._closed:
                raise SearchError("the server is shutting down; try again when it runs")
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="hat-search-model", daemon=True)
                self._thread.start()
            self._ready.notify()
        return job.future

    def _take(self) -> list[_Job] | None:
        """The next job and, when it is a search, the searches waiting behind it."""
        with self._ready:
            while not self._jobs and not self._closed:
                self._ready.wait()
            if not self._jobs:
                return None
            first = self._jobs.popleft()
            taken = [first]
            if first.kind == "search":
                others = collections.deque()
                while self._jobs and len(taken) < self.max_batch:
                    job = self._jobs.popleft()
                    (taken if job.kind == "search" else others).append(job)
                self._jobs.extendleft(reversed(others))
        # a request whose client went away (its asyncio task cancelled the Future) is dropped
        return [job for job in taken if job.future.set_running_or_notify_cancel()]

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            if taken and taken[0].kind == "call":
                function, args = taken[0].payload
                _settle(taken[0].future, function, *args)
            elif taken:
                self._search(taken)

    def _search(self, jobs: list[_Job]) -> None:
        index, valid = self.index, []
        for job in jobs:
            query, k = job.payload
            try:
                index.check_query(query)
                index.check_k(k)
                valid.append(job)
            except Exception as error:  # noqa: BLE001 (the request's own answer)
                job.future.set_exception(error)
        if not valid:
            return
        wanted = list(dict.fromkeys(job.payload for job in valid))  # distinct (query, k), in arrival order
        try:
            if self.joint:
                queries = list(dict.fromkeys(query for query, _ in wanted))
                hits = dict(zip(queries, index.search(queries, max(k for _, k in wanted))))
                answers = {(query, k): Hits(hits[query].results[:k], hits[query].note) for query, k in wanted}
                calls = 1
            else:
                answers = {(query, k): index.search([query], k)[0] for query, k in wanted}
                calls = len(wanted)
        except BaseException as error:  # noqa: BLE001 (every request of the batch gets it)
            for job in valid:
                job.future.set_exception(error)
            return
        finally:
            with self._ready:
                self.batches += 1
                self.requests += len(valid)
                self.largest_batch = max(self.largest_batch, len(valid))
        with self._ready:
            self.calls += calls
        for job in valid:
            found = answers[job.payload]
            job.future.set_result(Hits(list(found.results), found.note))


def _settle(future, function, *args) -> None:
    try:
        future.set_result(function(*args))
    except BaseException as error:  # noqa: BLE001 (the caller's answer)
        future.set_exception(error)


class Thumbnails:
    """JPEG thumbnails (at most ``px`` a side) of picture files, an LRU of ``size``
    entries keyed by (file, size, mtime): a changed file gets a new one."""

    def __init__(self, px: int = THUMB_PX, size: int = THUMB_CACHE):
        self.px, self.size = px, size
        self._made: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, file: str) -> bytes:
        """The thumbnail of ``file`` (opened with `hat.images.open_image`: RGB, EXIF
        orientation applied); OSError / ValueError when it cannot be read."""
        from hat.images import open_image

        stat = os.stat(file)
        key = (file, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._made:
                self._made.move_to_end(key)
                return self._made[key]
        image = open_image(file)
        image.thumbnail((self.px, self.px))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self._lock:
            self._made[key] = data
            self._made.move_to_end(key)
            while len(self._made) > self.size:
                self._made.popitem(last=False)
        return data

    def __len__(self) -> int:
        return len(self._made)


# -- requests and answers ----------------------------------------------------------

class ASCIIJSONResponse(JSONResponse):
    """JSON written with ASCII escapes only (a file name's surrogate escapes stay
    \\udcXX, as ``json.dumps`` writes them for the query command's --json)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _escaped_bytes(raw: bytes) -> str:
    """``raw`` (a URL part) with every byte outside printable ASCII percent-escaped."""
    return re.sub(rb"[^\x21-\x7e]", lambda m: b"%%%02X" % m.group()[0], raw).decode("ascii")


def query_params(request: Request) -> dict:
    """The request's query parameters (the first value of each name) decoded from the
    raw query string: '+' and percent-escapes as UTF-8, with surrogate escapes for bytes
    that are not (`check_text` then names them)."""
    raw = request.scope.get("query_string", b"")
    pairs = urllib.parse.parse_qsl(_escaped_bytes(raw), keep_blank_values=True, encoding="utf-8",
                                   errors="surrogateescape")
    params = {}
    for name, value in pairs:
        params.setdefault(name, value)
    return params


def request_path(request: Request, prefix: str) -> str:
    """The part of the request's path after ``prefix`` (e.g. "/thumb/"), percent-escapes
    decoded as UTF-8 with surrogate escapes (so a file name's bytes round-trip)."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode("utf-8", "surrogateescape")
    raw = raw.split(b"?", 1)[0]
    tail = raw[len(prefix.encode()):] if raw.startswith(prefix.encode()) else b""
    return urllib.parse.unquote(_escaped_bytes(tail), encoding="utf-8", errors="surrogateescape")


def parse_k(text) -> int:
    """k from a query parameter: DEFAULT_K when absent, else a positive integer (SearchError)."""
    if text is None:
        return DEFAULT_K
    if not re.fullmatch(r"\s*[+-]?\d{1,9}\s*", text):
        raise SearchError(f"k={_shown(text)!r} is not a positive integer; pass k >= 1 (how many results)")
    return check_k(int(text))


def _shown(text: str) -> str:
    """Text fit to print: surrogate escapes (bytes that were not UTF-8) as U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that is no byte's escape
        return text.encode("utf-8", "replace").decode("utf-8")


def _escape(text: str) -> str:
    return html.escape(_shown(text))


def _url(prefix: str, path: str) -> str:
    """``prefix`` + the picture path percent-escaped (its bytes as the file system has them)."""
    return prefix + urllib.parse.quote(path, safe="/", encoding="utf-8", errors="surrogateescape")


def _query_url(route: str, **params) -> str:
    """``route?name=value&...``, the values percent-escaped (their bytes as given)."""
    return f"{route}?{urllib.parse.urlencode(params, encoding='utf-8', errors='surrogateescape')}"


def _one_line(error) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def served_file(index, path: str) -> str:
    """The real path of indexed picture ``path`` when it may be served: one of the
    index's paths (`SearchIndex.resolve`) whose file, links followed, lies under the
    index's image folder; SearchError otherwise."""
    file = index.resolve(path)
    real, root = os.path.realpath(file), os.path.realpath(index.root)
    if os.path.commonpath([real, root]) != root:
        raise SearchError(f"{_shown(path)!r} links to a file outside {index.root}; only the folder's own files "
                          f"are served")
    if not os.path.isfile(real):
        raise SearchError(f"{_shown(path)!r} is no longer a file under {index.root}; run the index command again")
    return real


# -- the pages ------------------------------------------------------------------------

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; max-width: 1240px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; }
.meta { color: #555; font-size: 13px; }
form.search { margin: 12px 0 16px; display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
form.search input[type=search] { font-size: 16px; padding: 6px 8px; width: min(640px, 90vw); }
form.search input[type=number] { font-size: 16px; padding: 6px; width: 5em; }
form.search button { font-size: 16px; padding: 6px 14px; }
.error { color: #a00; background: #fee; border: 1px solid #d99; padding: 8px 12px; border-radius: 4px; }
.note { color: #7a5500; background: #fff6e0; border: 1px solid #e0c070; padding: 6px 12px; border-radius: 4px; }
ol.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(%(box)spx, 1fr)); gap: 14px;
  list-style: none; padding: 0; margin: 0; }
ol.grid li { font-size: 12px; text-align: center; overflow-wrap: anywhere; }
ol.grid img { width: %(box)spx; height: %(box)spx; object-fit: contain; background: #f3f3f3;
  border: 1px solid #ddd; display: block; margin: 0 auto 4px; }
ol.grid .score { color: #555; }
""" % {"box": SHOWN_PX}


def _page(title: str, body: list[str], style: str = PAGE_STYLE) -> str:
    return "\n".join(["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
                      "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
                      f"<title>{_escape(title)}</title><style>{style}</style></head><body>", *body,
                      "</body></html>"])


def _search_form(query: str, k) -> str:
    return (f"<form class=\"search\" method=\"get\" action=\"/\"><input type=\"search\" name=\"q\" "
            f"value=\"{_escape(query)}\" placeholder=\"a dog on the beach\" aria-label=\"query\" autofocus>"
            f"<label>k <input type=\"number\" name=\"k\" min=\"1\" value=\"{_escape(str(k))}\"></label>"
            f"<button type=\"submit\">Search</button></form>")


def render_search_page(index, query: str | None, k, hits=None, error: str | None = None,
                       attention: bool | None = None) -> str:
    """The search page: the form, then the error, or the results of ``hits`` (a `Hits`)
    as a grid of thumbnails (``<li data-path data-score>`` in rank order, each with its
    ``<img src="/thumb/...">``), linking to their attention pages where the model draws
    them (``attention``; None: ask the index's plug-in), else to the pictures."""
    attention = _has_attention(index) if attention is None else attention
    body = ["<h1>Search your pictures</h1>",
            f"<p class=\"meta\">{len(index)} pictures under {_escape(index.root)} · model {_escape(index.model_name)}"
            f"{' · click a result for its word-region attention' if attention else ''}</p>",
            _search_form(query or "", k)]
    if error is not None:
        body.append(f"<p class=\"error\" role=\"alert\">{_escape(error)}</p>")
    elif hits is not None:
        if hits.note:
            body.append(f"<p class=\"note\">note: {_escape(hits.note)}</p>")
        if not hits.results:
            body.append("<p class=\"meta\">No pictures in this index.</p>")
        else:
            body.append(f"<p class=\"meta\">The {len(hits.results)} best matches for “{_escape(query)}”, best "
                        f"first (higher score = a better match).</p><ol class=\"grid results\">")
            for rank, hit in enumerate(hits.results, start=1):
                link = _query_url("/attention", q=query, path=hit.path) if attention else _url("/image/", hit.path)
                name = _escape(hit.path)
                body.append(f"<li data-rank=\"{rank}\" data-path=\"{name}\" data-score=\"{hit.score!r}\">"
                            f"<a href=\"{html.escape(link)}\"><img src=\"{html.escape(_url('/thumb/', hit.path))}\" "
                            f"alt=\"{name}\" title=\"{name}\"></a>{rank}. <span class=\"score\">score "
                            f"{hit.score:.4f}</span><br><span class=\"name\">{name}</span></li>")
            body.append("</ol>")
    return _page(f"{query} – search" if query else "Search your pictures", body)


def _has_attention(index) -> bool:
    from hat.plugins import ModelPlugin

    return type(index.retriever.plugin).gallery_attention is not ModelPlugin.gallery_attention


def render_attention_page(index, query: str, path: str, levels: list[dict], view, note: str | None = None) -> str:
    """The attention page of (``query``, picture ``path``): ``levels`` as
    `SearchIndex.attention` returns them, drawn over ``view`` (`SearchIndex.view`) by the
    gallery's `attention_table`, one row per level, one heat map per token."""
    from hat.gallery import STYLE, attention_legend, attention_table

    words = levels[0]["words"] if levels else []
    back = _query_url("/", q=query)
    body = ["<h1>Word-region attention</h1>",
            f"<p class=\"meta\"><a href=\"{html.escape(back)}\">← the results</a> · "
            f"<a href=\"{html.escape(_url('/image/', path))}\">the picture</a></p>",
            f"<p class=\"caption\">“{_escape(query)}” and {_escape(path)} ({len(words)} tokens, one map each; "
            f"{len(levels)} levels)</p>"]
    if note:
        body.append(f"<p class=\"note\">note: {_escape(note)}</p>")
    body.append("<p class=\"meta\">Each map is one token's attention weights over the picture's regions (its "
                "largest weight printed under it), on the picture as the model saw it. The maps of a level share "
                "one colour scale, from 0 to the largest weight of the row, printed beside it. i2t: the share of "
                "each region's attention that goes to the word; t2i: the word's attention over the regions.</p>")
    body.append(attention_legend())
    body.append(f"<div class=\"attention-pair\" data-path=\"{_escape(path)}\"><div class=\"scroll\">")
    body.extend(attention_table(view, [_shown(word) for word in words], levels))
    body.append("</div></div>")
    return _page(f"{query} – attention", body, PAGE_STYLE + STYLE)


# -- the application ----------------------------------------------------------------

def create_app(index, *, joint: bool = False, max_batch: int = MAX_BATCH, thumb_px: int = THUMB_PX,
               thumb_cache: int = THUMB_CACHE, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The FastAPI application serving the opened `SearchIndex` ``index`` (see the module
    docstring for its routes). ``app.state`` holds ``index``, ``batcher`` (a `Batcher`:
    its ``stats()`` count the batches and scoring calls) and ``thumbnails`` (`Thumbnails`).
    ``joint``: the Batcher's mode (False: every answer exactly the query command's).
    ``allowed_hosts``: the Host header names answered (others get 400: a web page whose
    name was re-pointed at 127.0.0.1 cannot read the pictures); None: any."""
    batcher = Batcher(index, max_batch, joint)
    thumbnails = Thumbnails(thumb_px, thumb_cache)
    attention = _has_attention(index)

    def search_page(query, k, hits=None, error=None, status: int = 200) -> HTMLResponse:
        return HTMLResponse(render_search_page(index, query, k, hits, error, attention), status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="hat.search", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.index, app.state.batcher, app.state.thumbnails = index, batcher, thumbnails
    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception):  # a bug, not the request: one line, and on serving
        return ASCIIJSONResponse({"detail": f"internal error: {type(error).__name__}: {_one_line(error)}"},
                                 status_code=500)

    def refused(error, status: int = 400) -> ASCIIJSONResponse:
        return ASCIIJSONResponse({"detail": _one_line(error)}, status_code=status)

    async def searched(params: dict):
        """The Hits of the request's q and k, or the SearchError that refuses them."""
        query = params.get("q")
        if query is None:
            raise SearchError('no query; pass q, e.g. ?q=a+dog+on+the+beach')
        check_text(query)
        k = parse_k(params.get("k"))
        return await asyncio.wrap_future(batcher.submit(query, k))

    @app.get("/api/health")
    async def health():
        return ASCIIJSONResponse({"status": "ok", "model": index.model_name, "pictures": len(index),
                                  "root": index.root, "scoring": batcher.stats()})

    @app.get("/api/search")
    async def api_search(request: Request):
        try:
            hits = await searched(query_params(request))
        except SearchError as error:
            return refused(error)
        return ASCIIJSONResponse({"results": [{"path": hit.path, "score": hit.score} for hit in hits.results],
                                  "note": hits.note})

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request):
        params = query_params(request)
        query, k = params.get("q"), params.get("k", DEFAULT_K)
        if query is None:
            return search_page(None, k)
        try:
            hits = await searched(params)
        except SearchError as error:
            return search_page(query, k, error=_one_line(error), status=400)
        return search_page(query, k, hits)

    @app.get("/attention", response_class=HTMLResponse)
    def attention_page(request: Request):
        params = query_params(request)
        query, path = params.get("q"), params.get("path")
        try:
            if path is None:
                raise SearchError("no picture; pass path, one of the index's paths (as the results name them)")
            served_file(index, path)
        except SearchError as error:
            return search_page(query, DEFAULT_K, error=_one_line(error), status=404)
        try:
            if query is None:
                raise SearchError('no query; pass q, e.g. ?q=a+dog+on+the+beach')
            check_text(query)
            if not attention:
                raise SearchError(f"model={index.model_name} has no attention maps; only HAT draws them")
            levels, note = batcher.call(lambda: (index.attention(query, path), index.check_query(query)))
            view = index.view(path)
        except SearchError as error:
            return search_page(query, DEFAULT_K, error=_one_line(error), status=400)
        return HTMLResponse(render_attention_page(index, query, path, levels, view, note))

    @app.get("/thumb/{path:path}")
    def thumb(request: Request, path: str):
        try:
            file = served_file(index, request_path(request, "/thumb/"))
            data = thumbnails.get(file)
        except SearchError as error:
            return refused(error, 404)
        except (OSError, ValueError) as error:
            return refused(SearchError(f"the picture cannot be read now ({_one_line(error)})"), 404)
        return Response(data, media_type="image/jpeg", headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/image/{path:path}")
    def image(request: Request, path: str):
        from PIL import Image

        try:
            file = served_file(index, request_path(request, "/image/"))
            with open(file, "rb") as handle:
                data = handle.read()
            with Image.open(io.BytesIO(data)) as opened:
                media_type = Image.MIME.get(opened.format or "", "application/octet-stream")
        except SearchError as error:
            return refused(error, 404)
        except (OSError, ValueError) as error:
            return refused(SearchError(f"the picture cannot be read now ({_one_line(error)})"), 404)
        return Response(data, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})

    return app


# -- the command --------------------------------------------------------------------

def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening (port 0: a free one); SearchError, one
    line, when it cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        raise SearchError(f"--host {host}: {_one_line(error)}; pass an address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise SearchError(f"cannot listen on {host}:{port} ({error.strerror or _one_line(error)}); pass another "
                          f"--port (or --host)") from None
    return sock


def serve(folder, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", joint: bool = False,
          log_level: str = "info") -> int:
    """Open the index in ``folder`` and serve it on http://host:port/ until Ctrl-C -> 0
    (``joint``: `Batcher`'s mode; the access log goes to stdout, uvicorn's way).
    A missing or foreign index, or an address that cannot be bound, is a SearchError
    (one line) before anything is served."""
    import uvicorn

    from hat.search.index import SearchIndex

    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise SearchError(f"--port {port!r} is not a port number; pass 0..65535 (0: any free port)")
    index = SearchIndex.open(folder, device=device)
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    loopback = ["127.0.0.1", "localhost"] if host in ("127.0.0.1", "localhost") else None
    server = uvicorn.Server(uvicorn.Config(create_app(index, joint=joint, allowed_hosts=loopback), log_level=log_level))
    print(f"serving {len(index)} pictures of {index.root} (model={index.model_name}) on "
          f"http://{shown}:{bound}/ (Ctrl-C stops)", flush=True)
    if joint:
        print("note: --batch-queries: queries that arrive together are scored in one call; their scores can "
              "differ from the query command's in the last bits (~1e-6)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: --host {host} lets other machines see these pictures", flush=True)
    if not len(index):
        print(f"note: index {index.folder} holds no pictures", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then raised the Ctrl-C again: done
        pass
    finally:
        sock.close()
    print("stopped", flush=True)
    return 0
