"""Search your own pictures with a trained checkpoint.

    python -m hat.search index --checkpoint runs/1/best.ckpt --images ~/Pictures   # -> ~/Pictures/.hat-index
    python -m hat.search query ~/Pictures/.hat-index "a dog on the beach" -k 10 [--json]
    python -m hat.search serve ~/Pictures/.hat-index      # http://127.0.0.1:8000/: a search page, its JSON API

or from Python (the same code):

    from hat.search import SearchIndex, build_index
    report = build_index("runs/1/best.ckpt", "~/Pictures")      # BuildReport
    index = SearchIndex.open(report.out)
    [hits] = index.search(["a dog on the beach"], k=10)           # Hits(results=[Hit(path, score, index)], note)

`build_index` (hat.search.build) encodes every picture of a folder once into an index
folder (safetensors shards and a JSON manifest, hat.search.store), updates it
incrementally and resumes an interrupted build; `SearchIndex` (hat.search.index) loads
it and ranks pictures for sentences as ``Retriever.search`` does on the same files.

Choices: the index of DIR is DIR/.hat-index unless ``out`` says otherwise (hidden, so
it is never indexed itself; the manifest records DIR's absolute path). Pictures are the
files ending in .jpg, .jpeg, .png, .webp or .bmp in any case, under DIR recursively, in
sorted order of their '/'-separated relative paths; hidden files and folders are left
out, links to folders are not followed. Every picture is opened by
`hat.images.open_image`, also used by the Retriever: EXIF orientation applied,
transparency composited over white. Features are kept as the plug-in encodes them; a
picture's features are the same whatever batch it is encoded in up to the last bits of
the GEMMs (the scores agree to ~1e-7 relative; bit for bit when the batches are the
same, e.g. a shard size that is a multiple of the batch size).

The server (hat.search.server, FastAPI + uvicorn: ``pip install fastapi uvicorn``) answers
what the query command prints, shows the results as thumbnails and HAT's attention maps.

Problems with an index or a query are a `SearchError` (a ValueError, in
hat.search.checks) with a one-line message.
"""
import importlib

_PUBLIC = {"BuildReport": "build", "build_index": "build", "Hit": "index", "Hits": "index", "SearchIndex": "index",
           "SearchError": "checks", "check_k": "checks", "check_text": "checks"}
__all__ = sorted(_PUBLIC)


def __getattr__(name):  # the public names load on first use: the command line refuses a bad query fast
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"hat.search.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'hat.search' has no attribute {name!r}")
