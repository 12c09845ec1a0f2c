"""The search commands (see hat.search):

    python -m hat.search index --checkpoint CKPT --images DIR [--out INDEX] [--batch-size N]
                               [--shard-size N] [--workers N] [--device cpu] [--rebuild] [--quiet]
    python -m hat.search query INDEX "a dog on the beach" [-k 10] [--json] [--device cpu]
    python -m hat.search serve INDEX [--host 127.0.0.1] [--port 8000] [--device cpu] [--batch-queries]

``index`` writes DIR/.hat-index unless --out says otherwise and prints what it did
(encoded, reused, dropped, skipped files); ``query`` prints one line per result,
``rank  score  path`` (the path relative to the index's image folder), or with --json a
JSON list of {"path", "score"}, best first. A query longer than the model reads is
truncated, with a note on stderr. ``serve`` runs a local web server (hat.search.server:
a search page, the same results as JSON, thumbnails, HAT's attention maps) until Ctrl-C
(status 0). Errors print one line, ``error: ...``, on stderr and exit with status 2 (for
``serve``: before anything is served); an interrupted ``index`` (Ctrl-C) exits with 130
and resumes when run again.
"""
from __future__ import annotations

import argparse
import json
import sys

from hat.search.checks import SearchError, check_k, check_text

PROG = "python -m hat.search"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``error: ...``, status 2)."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    main = _Parser(prog=PROG, description="Search your own pictures with a trained checkpoint.")
    commands = main.add_subparsers(dest="command", required=True, metavar="{index,query,serve}")
    index = commands.add_parser("index", help="encode the pictures of a folder into a search index",
                                description="Encode every picture under --images (jpg, jpeg, png, webp, bmp; "
                                            "recursively; hidden names left out) into an index folder; run again "
                                            "to add new or changed pictures, drop deleted ones or resume.")
    index.add_argument("--checkpoint", required=True, help="a trained checkpoint (the project's or a released one)")
    index.add_argument("--images", required=True, help="the folder of pictures")
    index.add_argument("--out", default=None, help="the index folder (default: IMAGES/.hat-index)")
    index.add_argument("--batch-size", type=int, default=None,
                       help="pictures per encoding batch (default: the checkpoint's eval_batch_size)")
    index.add_argument("--shard-size", type=int, default=None, help="pictures per shard file (default: 256)")
    index.add_argument("--workers", type=int, default=0, help="processes decoding the pictures (default: 0)")
    index.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    index.add_argument("--rebuild", action="store_true", help="start again: remove the index's files first")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    query = commands.add_parser("query", help="the pictures of an index that best match a sentence",
                                description="Rank the pictures of an index for a sentence.")
    query.add_argument("index", help="the index folder (what `index` wrote)")
    query.add_argument("text", help='the sentence, e.g. "a dog on the beach"')
    query.add_argument("-k", type=int, default=10, help="how many results (default: 10)")
    query.add_argument("--json", action="store_true", help='print a JSON list of {"path", "score"}, best first')
    query.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    query.add_argument("--shortlist", type=int, default=None, metavar="M",
                       help="large collections: a FAISS first stage, then HAT's exact scores of M pictures "
                            "(Multi-SEA: its ITM re-rank of the ITC top_k); default: every picture exact")
    serve = commands.add_parser("serve", help="a local web page (and JSON API) to search an index",
                                description="Serve a search page, its JSON API (/api/search?q=...&k=...), "
                                            "thumbnails and HAT's attention maps on http://HOST:PORT/ until "
                                            "Ctrl-C.")
    serve.add_argument("index", help="the index folder (what `index` wrote)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="the address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="the port (default: 8000; 0: any free one)")
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    serve.add_argument("--batch-queries", action="store_true",
                       help="score the queries that arrive together in one call (can be faster; their scores "
                            "then differ from the query command's in the last bits, ~1e-6); default: each query "
                            "alone, every answer exactly the query command's")
    return main


def run_index(args) -> int:
    from hat.search.build import SHARD_SIZE, build_index

    report = build_index(args.checkpoint, args.images, out=args.out, batch_size=args.batch_size, device=args.device,
                         progress=not args.quiet, shard_size=args.shard_size or SHARD_SIZE, rebuild=args.rebuild,
                         num_workers=args.workers)
    print(report.summary(), flush=True)
    return 0


def run_query(args) -> int:
    check_text(args.text)  # before anything loads
    check_k(args.k)
    if args.shortlist is not None:
        check_k(args.shortlist, "shortlist")
    from hat.search.index import SearchIndex

    index = SearchIndex.open(args.index, device=args.device)
    [hits] = index.search([args.text], args.k, shortlist=args.shortlist)
    if hits.note:
        print(f"note: {hits.note}", file=sys.stderr, flush=True)
    if not len(index):
        print(f"note: index {index.folder} holds no pictures", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps([{"path": hit.path, "score": hit.score} for hit in hits.results]), flush=True)
    else:
        for rank, hit in enumerate(hits.results, start=1):
            print(f"{rank}  {hit.score:.6f}  {hit.path}", flush=True)
    return 0


def run_serve(args) -> int:
    try:
        from hat.search.server import serve
    except ImportError as error:  # fastapi or uvicorn not installed
        raise SearchError(f"the serve command needs FastAPI and uvicorn ({error}); install them: pip install "
                          f"fastapi uvicorn") from None
    return serve(args.index, host=args.host, port=args.port, device=args.device, joint=args.batch_queries)


COMMANDS = {"index": run_index, "query": run_query, "serve": run_serve}


def main(argv=None) -> int:
    """Run one command -> the exit status (0; 2: an error, one line on stderr; 130: interrupted)."""
    if hasattr(sys.stdout, "reconfigure"):  # file names that are not UTF-8 print as their bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        args = parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, already printed)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return COMMANDS[args.command](args)
    except SearchError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        what = " (the shards encoded so far are kept: run the same command again to resume)" \
            if args.command == "index" else ""
        print(f"interrupted{what}", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
