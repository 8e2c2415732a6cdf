"""Synthetic pictures of coloured shapes with short question/answer pairs.

Used by `finetune.py --recipe tiny-synthetic` to prove that a small XComposer2 trained from scratch
learns from images. Pictures are clean on purpose: a solid background and 1-4 well-separated shapes
(one per cell of a 2x2 grid, with a little jitter) in four distinct colours; at 56 px each cell is
2x2 patches of 14 px.

Question kinds (answers are one word):
- colour:   one shape,  "What colour is the shape?"                 -> red / green / blue / yellow
- shape:    one shape,  "What shape is it?"                          -> circle / square / triangle
- count:    1-4 shapes, "How many shapes are there?"                 -> 1 .. 4
- relation: two shapes, "Is the red shape left or right of the blue shape?" -> left / right
- compare:  two images of 1-4 circles, "Which image has more circles?" -> first / second
"""

import json
import os
import random

from PIL import Image, ImageDraw

IMAGE_PLACEHOLDER = "<ImageHere>"
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
KINDS = ("colour", "shape", "count", "relation", "compare")
BACKGROUND = (250, 250, 250)
GRID = 2


def draw_scene(objects, size: int = 56) -> Image.Image:
    """objects: [(shape, colour, (column, row), (dx, dy), radius)] -> an RGB picture of `size` px.
    The three shapes of one radius cover about the same area, so size does not give the shape away."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for shape, colour, (column, row), (dx, dy), radius in objects:
        cx, cy = (column + 0.5) * cell + dx, (row + 0.5) * cell + dy
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        elif shape == "square":
            r = radius * 0.886  # (2r)^2 = pi radius^2
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            r = radius * 1.2  # base 2r, height 1.8r: 1.8 r^2 ~ pi radius^2 / 1.2
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return image


def _objects(rng: random.Random, shapes, size: int, cells=None, colours=None):
    """Place each shape in its own grid cell (or in the given cells), with jitter and size variation."""
    cells = cells or rng.sample([(c, r) for c in range(GRID) for r in range(GRID)], len(shapes))
    cell = size / GRID
    jitter = cell * 0.08
    colours = colours or [rng.choice(list(COLOURS)) for _ in shapes]
    return [(shape, colour, where, (rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)),
             cell * rng.uniform(0.34, 0.40)) for shape, colour, where in zip(shapes, colours, cells)]


def random_scene(rng: random.Random, size: int = 56) -> list:
    """1-4 random shapes in random cells and colours (what make_sample draws from, without a question)."""
    return _objects(rng, [rng.choice(SHAPES) for _ in range(rng.randint(1, 4))], size)


def make_sample(rng: random.Random, kind: str | None = None, size: int = 56) -> dict:
    """One question: {"kind", "question" (with one <ImageHere> per image), "answer", "images": [PIL],
    "scenes": [[(shape, colour, (column, row), offset, radius)] per image]}."""
    kind = kind or rng.choice(KINDS)
    if kind in ("colour", "shape"):
        objects = _objects(rng, [rng.choice(SHAPES)], size)
        question = "What colour is the shape?" if kind == "colour" else "What shape is it?"
        answer = objects[0][1] if kind == "colour" else objects[0][0]
        scenes = [objects]
    elif kind == "count":
        count = rng.randint(1, 4)
        objects = _objects(rng, [rng.choice(SHAPES) for _ in range(count)], size)
        question, answer, scenes = "How many shapes are there?", str(count), [objects]
    elif kind == "relation":
        first, second = rng.sample(list(COLOURS), 2)
        columns = rng.sample(range(GRID), 2)
        cells = [(columns[0], rng.randrange(GRID)), (columns[1], rng.randrange(GRID))]
        objects = _objects(rng, [rng.choice(SHAPES), rng.choice(SHAPES)], size, cells, [first, second])
        question = f"Is the {first} shape left or right of the {second} shape?"
        answer = "left" if columns[0] < columns[1] else "right"
        scenes = [objects]
    elif kind == "compare":
        counts = rng.sample(range(1, 5), 2)
        scenes = [_objects(rng, ["circle"] * n, size) for n in counts]
        question = "Which image has more circles?"
        answer = "first" if counts[0] > counts[1] else "second"
    else:
        raise ValueError(f"unknown question kind {kind!r}; choose from {KINDS}")
    return {"kind": kind, "question": IMAGE_PLACEHOLDER * len(scenes) + question, "answer": answer,
            "images": [draw_scene(objects, size) for objects in scenes], "scenes": scenes}


def sample_at(seed: int, index: int, size: int = 56, kind: str | None = None) -> dict:
    """The `index`-th sample of the stream `seed`: deterministic, so a dataset can draw it lazily."""
    rng = random.Random(seed * 1_000_003 + index)
    return make_sample(rng, kind or KINDS[index % len(KINDS)], size)


def corpus() -> list[str]:
    """Every question and answer text the generator can produce (for training a tokenizer)."""
    lines = ["What colour is the shape?", "What shape is it?", "How many shapes are there?",
             "Which image has more circles?", *COLOURS, *SHAPES, "1", "2", "3", "4", "left", "right", "first",
             "second", "user\n", "assistant\n", "system\n"]
    lines += [f"Is the {a} shape left or right of the {b} shape?" for a in COLOURS for b in COLOURS if a != b]
    return lines


def write_dataset(out_dir: str, num_samples: int, seed: int = 0, size: int = 56) -> str:
    """Write `data.jsonl` in upstream's fine-tuning format plus PNG images; returns the JSONL path."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "data.jsonl")
    with open(path, "w") as f:
        for index in range(num_samples):
            sample = sample_at(seed, index, size)
            paths = []
            for j, image in enumerate(sample["images"]):
                paths.append(f"images/{index:06d}_{j}.png")
                image.save(os.path.join(out_dir, paths[-1]))
            f.write(json.dumps({"id": f"shapes-{index}", "image": paths, "conversations": [
                {"from": "user", "value": sample["question"]},
                {"from": "assistant", "value": sample["answer"]}]}) + "\n")
    return path
