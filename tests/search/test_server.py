"""python -m hat.search serve (hat.search.server): the JSON API answers what the query
command prints, the page shows the same results with no script, the attention page draws
every level, thumbnails serve the index's files only, errors are one line and 4xx, and
concurrent requests, taken together in batches, get exactly the sequential answers (with
--batch-queries: one scoring call per batch, scores equal up to their last bits)."""
import base64
import contextlib
import http.client
import io
import json
import os
import shutil
import socket
import threading
import urllib.parse
from html.parser import HTMLParser

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient
from fastapi.testclient import TestClient  # noqa: E402

from hat.search import SearchIndex, build_index  # noqa: E402
from hat.search.__main__ import main  # noqa: E402
from hat.search.server import create_app, listening_socket  # noqa: E402
from tests.search.conftest import copy_pictures  # noqa: E402


class Page(HTMLParser):
    """What the tests read of a page: the result items in order (their attributes, the
    thumbnail and link of each), every tag's name, the attention table's rows."""

    def __init__(self, text: str):
        super().__init__()
        self.results, self.tags, self.rows, self.errors = [], [], [], []
        self._in_error = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        classes = (attrs.get("class") or "").split()
        if tag == "li" and "data-path" in attrs:
            self.results.append({"path": attrs["data-path"], "score": float(attrs["data-score"])})
        elif tag == "a" and self.results and "href" not in self.results[-1]:
            self.results[-1]["href"] = attrs["href"]
        elif tag == "img" and self.results and "src" not in self.results[-1]:
            self.results[-1]["src"] = attrs["src"]
        elif tag == "th" and "level" in classes:
            self.rows.append([])
        elif tag == "img" and "heatmap" in classes:
            self.rows[-1].append(attrs["src"])
        elif tag == "p" and "error" in classes:
            self._in_error = True

    def handle_data(self, data):
        if self._in_error:
            self.errors.append(data)
            self._in_error = False


def thumb_url(path: str) -> str:
    return "/thumb/" + urllib.parse.quote(path, errors="surrogateescape")


@pytest.fixture(scope="module")
def served(demo_indexes) -> dict:
    """model -> (the opened index, a TestClient of its app)."""
    out = {}
    for model, folder in demo_indexes.items():
        index = SearchIndex.open(folder)
        out[model] = (index, TestClient(create_app(index)))
    return out


def api(client, query, k):
    response = client.get("/api/search", params={"q": query, "k": k})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("model", ["hat", "multisea"])
def test_the_api_answers_what_the_query_command_prints(model, served, demo_indexes, queries, capsys):
    index, client = served[model]
    for query, k in ((queries[1], 5), (queries[3], 3)):
        [hits] = index.search([query], k)
        assert api(client, query, k) == {"results": [{"path": h.path, "score": h.score} for h in hits.results],
                                          "note": None}
    assert main(["query", demo_indexes[model], queries[1], "-k", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == api(client, queries[1], 5)["results"]
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["model"] == model and health["pictures"] == 200
    assert health["scoring"]["mode"] == "exact"


@pytest.mark.parametrize("model", ["hat", "multisea"])
def test_the_page_shows_the_api_results_with_thumbnails_and_no_script(model, served, queries):
    index, client = served[model]
    response = client.get("/", params={"q": queries[0], "k": 6})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = Page(response.text)
    expected = api(client, queries[0], 6)["results"]
    assert [{"path": r["path"], "score": r["score"]} for r in page.results] == expected
    assert "script" not in page.tags and "<script" not in response.text.lower()
    assert "form" in page.tags and 'method="get"' in response.text
    for result in page.results:
        assert result["src"] == thumb_url(result["path"])
        target = urllib.parse.urlsplit(result["href"])
        if model == "hat":  # its attention page; Multi-SEA draws none: the picture itself
            assert target.path == "/attention"
            assert urllib.parse.parse_qs(target.query) == {"q": [queries[0]], "path": [result["path"]]}
        else:
            assert result["href"] == "/image/" + urllib.parse.quote(result["path"])
    thumb = client.get(page.results[0]["src"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as image:
        assert image.format == "JPEG" and max(image.size) <= 256
    picture = client.get("/image/" + urllib.parse.quote(page.results[0]["path"]))
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
    assert picture.content == open(index.resolve(page.results[0]["path"]), "rb").read()
    empty = client.get("/")  # no query yet: the form alone
    assert empty.status_code == 200 and Page(empty.text).results == [] and "<script" not in empty.text


def test_the_attention_page_draws_a_row_of_maps_per_level(served, queries):
    index, client = served["hat"]
    path = api(client, queries[0], 1)["results"][0]["path"]
    response = client.get("/attention", params={"q": queries[0], "path": path})
    assert response.status_code == 200 and "<script" not in response.text.lower()
    levels = index.attention(queries[0], path)
    page = Page(response.text)
    assert len(page.rows) == len(levels) == 3
    assert all(len(row) == len(levels[0]["words"]) for row in page.rows)  # one map per token
    for source in (page.rows[0][0], page.rows[-1][-1]):
        assert source.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()
    assert 'class="colorbar"' in response.text  # the gallery's colour scale
    unknown = client.get("/attention", params={"q": queries[0], "path": "../demo001.jpg"})
    assert unknown.status_code == 404 and "is not a picture of index" in "".join(Page(unknown.text).errors)
    multisea = served["multisea"][1].get("/attention", params={"q": queries[0], "path": path})
    assert multisea.status_code == 400 and "has no attention maps" in multisea.text


@pytest.fixture(scope="module")
def odd_index(tmp_path_factory, demo_pictures, checkpoints):
    """A HAT index of 4 demo pictures, a file whose name is not UTF-8, and a link to a
    picture outside the folder (indexed: the builder follows links to files); then an
    unindexed picture beside them -> (folder of pictures, index folder, outside file)."""
    tmp = tmp_path_factory.mktemp("odd")
    folder, outside = tmp / "pictures", tmp / "outside"
    copy_pictures(demo_pictures, folder, 4)
    outside.mkdir()
    shutil.copy(demo_pictures / "demo001.jpg", outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", folder / "linked.jpg")
    shutil.copy(demo_pictures / "demo002.jpg", os.fsencode(folder) + b"/caf\xe9.jpg")
    report = build_index(checkpoints["hat"], folder, out=tmp / "index", progress=False)
    assert report.total == 6
    shutil.copy(demo_pictures / "demo004.jpg", folder / "extra.jpg")  # not in the index
    return folder, report.out, outside / "secret.jpg"


@contextlib.contextmanager
def live_server(app):
    """A real uvicorn serving ``app`` on a free port of 127.0.0.1 -> the port."""
    import uvicorn

    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(1200):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert server.started
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def live(odd_index):
    """The odd index's app, served by a real uvicorn -> (app, port)."""
    app = create_app(SearchIndex.open(odd_index[1]))
    with live_server(app) as port:
        yield app, port


def raw_get(port: int, target: str, host: str | None = None) -> tuple[int, bytes, str]:
    """GET ``target`` sent as it is (no client-side normalisation of '..'; ``host``: the
    Host header, default 127.0.0.1:port) -> (status, body, content type)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest("GET", target, skip_host=host is not None, skip_accept_encoding=True)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("content-type") or ""
    finally:
        connection.close()


def test_thumbnails_serve_the_indexed_files_and_nothing_else(odd_index, live):
    folder, index_folder, outside = odd_index
    app, port = live
    index = app.state.index
    assert sorted(index.paths) == ["caf\udce9.jpg", "demo001.jpg", "demo002.jpg", "demo004.jpg", "demo005.jpg",
                                   "linked.jpg"]
    for path in ("caf\udce9.jpg", "demo001.jpg"):
        status, body, kind = raw_get(port, thumb_url(path))
        assert (status, kind) == (200, "image/jpeg")
        Image.open(io.BytesIO(body)).verify()
    inside = str(folder / "demo001.jpg")
    refused = ["/thumb/../index/manifest.json", "/thumb/%2e%2e/index/manifest.json", "/thumb/%2E%2E%2Fsecret.jpg",
               "/thumb/sub/../demo001.jpg", "/thumb//etc/passwd", "/thumb/" + urllib.parse.quote(inside, safe=""),
               "/thumb" + inside, "/thumb/extra.jpg", "/thumb/linked.jpg", "/thumb/missing.jpg",
               "/thumb/.%2e/outside/secret.jpg", "/image/linked.jpg", "/image/extra.jpg", "/image/%2e%2e/x.jpg",
               "/thumb/demo001.jpg%00.png"]
    for target in refused:
        status, body, kind = raw_get(port, target)
        assert status == 404 and kind == "application/json" and "detail" in json.loads(body), target
    client = TestClient(app)  # the same through the test client (the paths it does not normalise)
    for target in ("/thumb/%2e%2e/index/manifest.json", "/thumb/extra.jpg", "/thumb/linked.jpg"):
        assert client.get(target).status_code == 404
    assert "links to a file outside" in client.get("/thumb/linked.jpg").json()["detail"]
    results = api(client, "a red circle", 6)["results"]
    assert sorted(r["path"] for r in results) == sorted(index.paths)  # searched, shown, its thumbnail refused
    assert client.get("/attention", params={"q": "a red circle", "path": "linked.jpg"}).status_code == 404
    made = app.state.thumbnails.get(str(folder / "demo001.jpg"))
    assert app.state.thumbnails.get(str(folder / "demo001.jpg")) is made  # made once, then from the cache


BAD = {  # query string -> what the one-line detail says
    "q=": "the query is empty",
    "q=%20%09": "the query is empty",
    "q=+++": "the query is empty",
    "k=3": "no query",
    "q=caf%E9": "not valid UTF-8 (byte 0xe9 at character 3)",
    "q=%FF%FE": "not valid UTF-8 (byte 0xff at character 0)",
    "q=a+red+circle&k=0": "k=0 is not a positive integer",
    "q=a+red+circle&k=-3": "k=-3 is not a positive integer",
    "q=a+red+circle&k=two": "k='two' is not a positive integer",
    "q=a+red+circle&k=2.5": "k='2.5' is not a positive integer",
    "q=a+red+circle&k=": "k='' is not a positive integer",
    "q=%00%01": "has no word the model's tokenizer reads",
}


def test_errors_are_one_line_4xx_json_and_the_server_keeps_serving(served, queries):
    index, client = served["hat"]
    good = api(client, queries[2], 3)
    for case, expected in BAD.items():
        response = client.get(f"/api/search?{case}")
        assert response.status_code == 400 and response.headers["content-type"] == "application/json", case
        detail = response.json()["detail"]
        assert expected in detail and "\n" not in detail, (case, detail)
        page = client.get(f"/?{case}")
        if case == "k=3":  # no query: the page is the form alone
            assert page.status_code == 200 and Page(page.text).errors == []
        else:
            assert page.status_code == 400 and expected in "".join(Page(page.text).errors), case
        assert api(client, queries[2], 3) == good  # and the next request is answered
    assert client.get("/api/nothing").status_code == 404
    long = " ".join(["a green cross at the lower left"] * 8)
    answer = api(client, long, 2)
    assert answer["note"].startswith("the query is 56 word pieces long and the model reads the first 30")
    assert answer["results"] == [{"path": h.path, "score": h.score} for h in index.search([long], 2)[0].results]
    page = client.get("/", params={"q": long, "k": 2})
    assert page.status_code == 200 and "note: the query is 56 word pieces long" in page.text


def concurrent_answers(app, asked: list, clients: int = 16, turns: int = 5) -> list:
    """``clients`` threads, each with its own connection to a real uvicorn serving ``app``,
    started together, each sending ``turns`` of the ``asked`` (query, k) in turn ->
    [((query, k), status, JSON answer)]."""
    answers, failures, start = [], [], threading.Barrier(clients)
    with live_server(app) as port:
        def client(number: int):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            start.wait()
            try:
                for turn in range(turns):
                    query, k = asked[(number + turn) % len(asked)]
                    connection.request("GET", "/api/search?" + urllib.parse.urlencode({"q": query, "k": k}))
                    response = connection.getresponse()
                    answers.append(((query, k), response.status, json.loads(response.read())))
            except Exception as error:  # noqa: BLE001 (reported below)
                failures.append(repr(error))
            finally:
                connection.close()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    assert failures == [] and len(answers) == clients * turns
    return answers


@pytest.fixture(scope="module")
def asked(demo_split, served) -> tuple[list, dict]:
    """Four (caption, k) requests and their answers computed alone, one at a time."""
    index, _ = served["hat"]
    asked = [(demo_split.captions(i)[0], k) for i, k in ((5, 4), (60, 10), (120, 1), (199, 6))]
    return asked, {(q, k): {"results": [{"path": h.path, "score": h.score} for h in index.search([q], k)[0].results],
                            "note": None} for q, k in asked}


def test_concurrent_requests_are_batched_and_get_exactly_the_sequential_answers(served, asked):
    """16 threads x 5 requests at a real uvicorn: every answer equals, bit for bit, the one
    computed alone before; the requests were taken together in batches, each distinct
    request of a batch scored once."""
    index, _ = served["hat"]
    asked, expected = asked
    app = create_app(index)
    answers = concurrent_answers(app, asked)
    assert all(status == 200 and answer == expected[request] for request, status, answer in answers)
    stats = app.state.batcher.stats()
    assert stats["requests"] == 80 and stats["batches"] < 80 and stats["largest_batch"] > 1, stats
    assert stats["calls"] < 80, stats  # a request repeated in a batch is computed once


def test_joint_batches_score_the_waiting_queries_in_one_call(served, asked):
    """serve --batch-queries: the same pictures in the same order, the scores equal up to
    their last bits, in fewer index.search calls than requests (one per batch)."""
    index, _ = served["hat"]
    asked, expected = asked
    app = create_app(index, joint=True)
    answers = concurrent_answers(app, asked)
    for request, status, answer in answers:
        assert status == 200 and answer["note"] is None
        want = expected[request]["results"]
        assert [r["path"] for r in answer["results"]] == [r["path"] for r in want]
        assert [r["score"] for r in answer["results"]] == pytest.approx([r["score"] for r in want], rel=1e-5)
    stats = app.state.batcher.stats()
    assert stats["mode"] == "joint" and stats["requests"] == 80
    assert stats["calls"] == stats["batches"] < 80 and stats["largest_batch"] > 1, stats


def test_serve_refuses_a_missing_or_foreign_index_or_a_taken_port_in_one_line(tmp_path, capsys, demo_indexes):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        for argv, expected in ((["serve", str(tmp_path / "missing")], "does not exist; build it with"),
                               (["serve", str(tmp_path / "foreign")], "is not a search index"),
                               (["serve", demo_indexes["hat"], "--port", str(taken.getsockname()[1])],
                                "cannot listen on 127.0.0.1:"),
                               (["serve", demo_indexes["hat"], "--port", "http"], "argument --port: invalid int")):
            assert main(argv) == 2
            out, err = capsys.readouterr()
            assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    finally:
        taken.close()


def test_the_serve_command_prints_where_it_listens_and_serves(demo_indexes, monkeypatch, capsys):
    """main(["serve", ...]) as the command runs it, on a free port (stopped the way uvicorn
    stops on Ctrl-C: should_exit)."""
    import uvicorn

    servers, codes, run = [], [], uvicorn.Server.run

    def recorded(self, sockets=None):
        servers.append((self, sockets))
        return run(self, sockets=sockets)

    monkeypatch.setattr(uvicorn.Server, "run", recorded)
    thread = threading.Thread(target=lambda: codes.append(main(["serve", demo_indexes["multisea"], "--port", "0"])))
    thread.start()
    try:
        for _ in range(1200):
            if servers and servers[0][0].started:
                break
            threading.Event().wait(0.05)
        server, sockets = servers[0]
        port = sockets[0].getsockname()[1]
        status, body, _ = raw_get(port, "/api/health")
        assert status == 200 and json.loads(body)["pictures"] == 200
        assert raw_get(port, "/api/health", host=f"localhost:{port}")[0] == 200
        assert raw_get(port, "/api/health", host="pictures.example.com")[0] == 400  # a re-pointed name
    finally:
        if servers:
            servers[0][0].should_exit = True
        thread.join(timeout=60)
    assert codes == [0]
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"serving 200 pictures of {served_root(demo_indexes)} (model=multisea) on "
                                   f"http://127.0.0.1:{port}/ (Ctrl-C stops)")
    assert out.splitlines()[-1] == "stopped"


def served_root(demo_indexes) -> str:
    return json.load(open(os.path.join(demo_indexes["multisea"], "manifest.json")))["root"]
