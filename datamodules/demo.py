"""The embedded demo data set: coloured shapes in the quadrants of a small picture.

Every image holds two or three shapes, each in its own quadrant; its five captions name
colour, shape and position of every shape with varied templates, synonyms and orders.
No single word identifies an image: retrieval needs the combination of colour, shape
and position. All images (train, val and test) are pairwise distinct in content, so a
perfect model could reach 100% recall. Generation is deterministic (seeded) and
happens once, into a cache directory, as ViLT-format arrow files.
"""
from __future__ import annotations

import fcntl
import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from datamodules.arrow import SPLIT_FILES
from datamodules.atomic import atomic_file
from datamodules.writer import write_arrow

GENERATOR_VERSION = 2
COLOURS = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 90, 225),
    "yellow": (235, 215, 40), "purple": (150, 60, 195), "orange": (245, 140, 30),
}
SHAPE_WORDS = {
    "circle": ["circle", "disc", "round shape"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "triangular shape", "triangle"],
    "cross": ["cross", "plus sign", "cross"],
}
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
POSITION_WORDS = {
    "top left": ["in the top left", "at the upper left", "in the top-left corner"],
    "top right": ["in the top right", "at the upper right", "in the top-right corner"],
    "bottom left": ["in the bottom left", "at the lower left", "in the bottom-left corner"],
    "bottom right": ["in the bottom right", "at the lower right", "in the bottom-right corner"],
}


CAPTIONS_PER_IMAGE = 5


def cache_base() -> str:
    """Where generated demo sets live by default: $HAT_CACHE or ~/.cache/hat-toolkit."""
    return os.environ.get("HAT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hat-toolkit")


def demo_set_name(train_images: int, eval_images: int, image_size: int, seed: int) -> str:
    """The folder name of one demo set: generator version and every size parameter."""
    return f"demo-v{GENERATOR_VERSION}-{train_images}x{eval_images}-{image_size}px-seed{seed}"


def default_cache_dir(train_images: int = 2000, eval_images: int = 200, image_size: int = 64,
                      seed: int = 0) -> str:
    """Where the demo set with these parameters lives when no cache_dir is given."""
    return os.path.join(cache_base(), demo_set_name(train_images, eval_images, image_size, seed))


def _draw(objects, size: int, rng: np.random.Generator) -> bytes:
    shade = int(rng.integers(25, 60))
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cell = size / 2
    for quadrant, colour, shape in objects:
        row, col = divmod(QUADRANTS.index(quadrant), 2)
        radius = cell * rng.uniform(0.28, 0.4)
        cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[colour])
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
        else:  # cross
            arm = radius / 3
            draw.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=fill)
            draw.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(template: int, objects, rng: np.random.Generator) -> str:
    order = rng.permutation(len(objects))
    items = []
    for index in order:
        quadrant, colour, shape = objects[index]
        noun = SHAPE_WORDS[shape][rng.integers(len(SHAPE_WORDS[shape]))]
        where = POSITION_WORDS[quadrant][rng.integers(3)]
        items.append((quadrant, colour, noun, where))
    if template == 0:
        return _join([f"{_a(c)} {c} {n} {w}" for _, c, n, w in items])
    if template == 1:
        return "there is " + _join([f"{_a(c)} {c} {n} {w}" for _, c, n, w in items])
    if template == 2:
        return "; ".join(f"{q}: {c} {n}" for q, c, n, _ in items)
    if template == 3:
        return _join([f"{w} {_a(c)} {c} {n}" for _, c, n, w in items])
    if template == 4:
        return _join([f"the {n} {w} is {c}" for _, c, n, w in items])
    if template == 5:
        return "a dark picture with " + _join([f"{_a(c)} {c} {n} {w}" for _, c, n, w in items])
    return "shapes: " + _join([f"{c} {n} {w}" for _, c, n, w in items])


NUM_TEMPLATES = 7


def _sample_objects(rng: np.random.Generator):
    count = int(rng.integers(2, 4))
    quadrants = rng.choice(len(QUADRANTS), size=count, replace=False)
    colours, shapes = list(COLOURS), list(SHAPE_WORDS)
    return tuple(sorted(
        (QUADRANTS[q], colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])
        for q in quadrants
    ))


def plan_demo(train_images: int, eval_images: int, seed: int = 0) -> dict:
    """The content of every demo image: split -> list of objects, each a sorted tuple of
    (quadrant, colour, shape). Pairwise distinct over all splits."""
    rng = np.random.default_rng([seed, 1])
    seen: set = set()
    plan = {}
    for split, count in (("test", eval_images), ("val", eval_images), ("train", train_images)):
        plan[split] = []
        for _ in range(count):
            objects = _sample_objects(rng)
            while objects in seen:
                objects = _sample_objects(rng)
            seen.add(objects)
            plan[split].append(objects)
    return plan


def _rows(split: str, contents, rng, image_size: int):
    for index, objects in enumerate(contents):
        templates = rng.permutation(NUM_TEMPLATES)[:CAPTIONS_PER_IMAGE]
        captions = [_caption(int(t), objects, rng) for t in templates]
        yield _draw(objects, image_size, rng), captions, f"demo_{split}_{index:05d}.jpg", split


def _demo_paths(folder: str) -> dict:
    return {split: os.path.join(folder, files[0] + ".arrow") for split, files in SPLIT_FILES["demo"].items()}


def _read_meta(folder: str) -> dict | None:
    """The parameters of the complete demo set in ``folder`` (None: no complete set)."""
    meta_path = os.path.join(folder, "demo_meta.json")
    if not (os.path.isfile(meta_path) and all(os.path.isfile(p) for p in _demo_paths(folder).values())):
        return None
    try:
        with open(meta_path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def ensure_demo_data(cache_dir: str | None = None, train_images: int = 2000, eval_images: int = 200,
                     image_size: int = 64, seed: int = 0) -> str:
    """The folder of the demo set with these parameters (the demo's data_root),
    generated on first use.

    Each set of parameters has a folder of its own: ``cache_dir`` itself when it holds
    this set or no complete set, else ``cache_dir/<demo_set_name>``; without
    ``cache_dir``, ``$HAT_CACHE/<demo_set_name>``. A complete set is never rewritten, so
    runs of other sizes can use the same ``cache_dir`` at the same time. Generation
    happens under a lock (concurrent runs wait for one another) and the metadata file
    that marks a set complete is written last."""
    params = {"version": GENERATOR_VERSION, "train_images": train_images,
              "eval_images": eval_images, "image_size": image_size, "seed": seed}
    name = demo_set_name(train_images, eval_images, image_size, seed)
    if cache_dir is None:
        folder = default_cache_dir(train_images, eval_images, image_size, seed)
    elif _read_meta(cache_dir) in (params, None):
        folder = cache_dir
    else:
        folder = os.path.join(cache_dir, name)
    if _read_meta(folder) == params:
        return folder
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".demo.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        found = _read_meta(folder)
        if found == params:  # another run generated it meanwhile
            return folder
        if found is not None:  # another run put a set of other sizes there meanwhile
            return ensure_demo_data(os.path.join(folder, name), train_images, eval_images, image_size, seed)
        meta_path = os.path.join(folder, "demo_meta.json")
        if os.path.exists(meta_path):  # an incomplete set: its files are written again
            os.remove(meta_path)
        where = "" if cache_dir is None else " (data_root; leave it out to keep the demo data in the cache)"
        print(f"generating demo data ({train_images} train, {eval_images} val, {eval_images} test "
              f"images) in {os.path.abspath(folder)}{where}", flush=True)
        plan = plan_demo(train_images, eval_images, seed)
        paths = _demo_paths(folder)
        for offset, split in enumerate(("test", "val", "train")):
            rng = np.random.default_rng([seed, 2, offset])
            write_arrow(paths[split], _rows(split, plan[split], rng, image_size))
        with atomic_file(meta_path, "w") as handle:  # written last: marks the set complete
            json.dump(params, handle)
    return folder
