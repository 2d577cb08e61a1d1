"""Generated visual-question task for the proxy LLaVA.

Every image is a 128x128 scene on an 8x8 grid of 16-px cells, so a CLIP tower
with patch 16 sees one cell per visual token (64 tokens, row-major index
``row * 8 + col``). A scene holds 8-16 coloured shapes (at most one per cell,
each roughly filling its cell, with small size/offset jitter) on a tinted
background covered with low-contrast clutter (faint lines, dots, blobs).

The questions are built so that keeping the right visual tokens requires
reading the question (with few objects on a plain
background a question-blind rule won): most types ask about one or two cells
among many objects. Each question carries

- ``needed_cells``: the patch indices the answer depends on, and
- ``object_cells``: every occupied cell of the scene,

so the accuracy benchmark can build question-aware and question-blind oracles.

Question types (answers are one word):

``color_at``   colour of the object at a named cell (chess-style, ``c5``)            -> 1 cell
``shape_at``   shape of the object at a named cell             -> 1 cell
``relation``   colour of the object left of/right of/above/below a
               named object (a unique colour-shape pair) or a named
               cell                                                  -> 2 cells
``exists``     is there a <colour> <shape>? (yes: the pair occurs
               exactly once; no: it does not occur)                  -> 1 or 0 cells
``count``      how many <colour> objects / <shape>s (0-4)             -> the counted cells
``rare``       shape of the only object of a named colour            -> 1 cell

Cells are named chess-style in the text: column letter a..h, row number 1..8. Generation is deterministic:
scene ``i`` of split ``s`` with seed ``k`` comes from ``random.Random("s-k-i")``
(string seeds are hashed with SHA-512, independent of PYTHONHASHSEED), so
splits with different names or seeds are different scene streams.

Usage::

    python eval/proxy_task.py --out eval/data/proxy_test      # writes the test split
    python eval/proxy_task.py --examples demo pumer_llava/assets/examples  # demo images
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

GRID = 8
CELL = 16
IMAGE_SIZE = GRID * CELL  # 128
NUM_CELLS = GRID * GRID  # 64 visual tokens

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 55, 205),
    "cyan": (40, 215, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
DIRECTIONS = {  # name -> (d_row, d_col) from the reference to the asked object
    "left of": (0, -1),
    "right of": (0, 1),
    "above": (-1, 0),
    "below": (1, 0),
}
QUESTION_TYPES: tuple[str, ...] = ("color_at", "shape_at", "relation", "exists", "count", "rare")
LOCALIZED_TYPES: tuple[str, ...] = ("color_at", "shape_at", "relation", "rare")
MIN_OBJECTS, MAX_OBJECTS = 8, 16
MAX_COUNT = len(NUMBER_WORDS) - 1

# Default test split: fixed seed, >= 2,000 questions (one per type per image).
TEST_SEED = 0
TEST_IMAGES = 400
# Conversation split: its own scenes (split name ``conv``), four turns each, 1,200 questions.
CONVERSATION_SPLIT = "conv"
CONVERSATION_IMAGES = 300


@dataclass(frozen=True)
class Obj:
    row: int
    col: int
    color: str
    shape: str
    size: int  # side of the bounding box in px
    dx: int  # offset of the box inside its cell
    dy: int

    @property
    def cell(self) -> int:
        return self.row * GRID + self.col


@dataclass
class Scene:
    key: str
    background: tuple[int, int, int]
    objects: list[Obj]
    clutter: list[tuple] = field(default_factory=list)  # drawing ops, see _make_clutter

    def at(self, row: int, col: int) -> Obj | None:
        for o in self.objects:
            if o.row == row and o.col == col:
                return o
        return None

    def neighbour(self, obj: Obj, direction: str) -> Obj | None:
        """The object in the cell ``direction`` (a ``DIRECTIONS`` key) of ``obj``, if any."""
        dr, dc = DIRECTIONS[direction]
        r, c = obj.row + dr, obj.col + dc
        return self.at(r, c) if 0 <= r < GRID and 0 <= c < GRID else None

    @property
    def object_cells(self) -> list[int]:
        return sorted(o.cell for o in self.objects)

    def signature(self) -> tuple:
        """Content identity of the scene (used to check that splits are disjoint)."""
        return tuple(sorted((o.cell, o.color, o.shape) for o in self.objects))


@dataclass
class Question:
    id: str
    scene_key: str
    type: str
    question: str
    answer: str
    needed_cells: list[int]
    object_cells: list[int]


# --------------------------------------------------------------------------- scenes


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _make_clutter(rng: random.Random, bg: tuple[int, int, int]) -> list[tuple]:
    """Low-contrast distractors drawn under the objects: lines, dots and blobs."""
    ops = []
    for _ in range(rng.randint(25, 45)):
        kind = rng.choice(("line", "dot", "blob"))
        color = _jitter(bg, rng, 28)
        x0, y0 = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
        if kind == "line":
            x1, y1 = x0 + rng.randint(-40, 40), y0 + rng.randint(-40, 40)
            ops.append(("line", (x0, y0, x1, y1), color, rng.randint(1, 2)))
        elif kind == "dot":
            r = rng.randint(1, 2)
            ops.append(("dot", (x0 - r, y0 - r, x0 + r, y0 + r), color, 0))
        else:
            w, h = rng.randint(3, 9), rng.randint(3, 9)
            ops.append(("blob", (x0, y0, x0 + w, y0 + h), color, 0))
    return ops


def make_scene(key: str, min_objects: int = MIN_OBJECTS, max_objects: int = MAX_OBJECTS) -> Scene:
    """One scene, fully determined by ``key`` (and the object-count range)."""
    rng = random.Random(key)
    bg = tuple(rng.randint(85, 135) + rng.randint(-10, 10) for _ in range(3))
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(NUM_CELLS), n)
    objects = []
    for cell in sorted(cells):
        size = rng.randint(11, 14)
        objects.append(
            Obj(
                row=cell // GRID,
                col=cell % GRID,
                color=rng.choice(list(COLORS)),
                shape=rng.choice(SHAPES),
                size=size,
                dx=rng.randint(1, CELL - size - 1),
                dy=rng.randint(1, CELL - size - 1),
            )
        )
    return Scene(key=key, background=bg, objects=objects, clutter=_make_clutter(rng, bg))


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for kind, box, color, width in scene.clutter:
        if kind == "line":
            draw.line(box, fill=color, width=width)
        elif kind == "dot":
            draw.ellipse(box, fill=color)
        else:
            draw.rectangle(box, fill=color)
    for o in scene.objects:
        x0, y0 = o.col * CELL + o.dx, o.row * CELL + o.dy
        x1, y1 = x0 + o.size - 1, y0 + o.size - 1
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        elif o.shape == "cross":
            t = max(2, o.size // 4)  # arm half-width
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            draw.rectangle((x0, cy - t + 1, x1, cy + t - 1), fill=fill)
            draw.rectangle((cx - t + 1, y0, cx + t - 1, y1), fill=fill)
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(o.shape)
    return img


# ------------------------------------------------------------------------ questions


COLUMN_LETTERS = "abcdefgh"


def cell_name(row: int, col: int) -> str:
    """Chess-style name of a cell, one word (``c5``: column c, row 5).

    One token per cell makes "find the cell" a single attention lookup; spelled as
    "row 5 column 3" a from-scratch model first has to combine two tokens, and the
    first training runs sat at chance for thousands of steps.
    """
    return f"{COLUMN_LETTERS[col]}{row + 1}"


def _cell_text(row: int, col: int) -> str:
    return f"cell {cell_name(row, col)}"


def _color_counts(scene: Scene) -> dict[str, int]:
    counts = {c: 0 for c in COLORS}
    for o in scene.objects:
        counts[o.color] += 1
    return counts


def pair_cells(scene: Scene, color: str, shape: str) -> list[int]:
    return [o.cell for o in scene.objects if o.color == color and o.shape == shape]


def _q_color_at(scene: Scene, rng: random.Random):
    o = rng.choice(scene.objects)
    return f"what color is the object at {_cell_text(o.row, o.col)} ?", o.color, [o.cell]


def _q_shape_at(scene: Scene, rng: random.Random):
    o = rng.choice(scene.objects)
    return f"what shape is the object at {_cell_text(o.row, o.col)} ?", o.shape, [o.cell]


def _q_relation(scene: Scene, rng: random.Random):
    named_object = rng.random() < 0.5
    options = []
    for ref in scene.objects:
        if named_object and len(pair_cells(scene, ref.color, ref.shape)) != 1:
            continue  # the reference must be unambiguous
        for name in DIRECTIONS:
            if (target := scene.neighbour(ref, name)) is not None:
                options.append((ref, name, target))
    if not options:
        return None
    ref, name, target = rng.choice(options)
    if named_object:
        where = f"the {ref.color} {ref.shape}"
    else:
        where = f"the object at {_cell_text(ref.row, ref.col)}"
    return f"what color is the object {name} {where} ?", target.color, [ref.cell, target.cell]


def _q_exists(scene: Scene, rng: random.Random):
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    present_once = [p for p in pairs if len(pair_cells(scene, *p)) == 1]
    absent = [p for p in pairs if not pair_cells(scene, *p)]
    want_yes = rng.random() < 0.5
    if (want_yes and not present_once) or (not want_yes and not absent):
        want_yes = not want_yes
    if want_yes and not present_once:
        return None
    color, shape = rng.choice(present_once if want_yes else absent)
    cells = pair_cells(scene, color, shape)
    return f"is there a {color} {shape} ?", ("yes" if want_yes else "no"), cells


def _q_count(scene: Scene, rng: random.Random):
    # Balance the answers: draw the target count first, then an attribute with it.
    by_count: dict[int, list[tuple[str, str]]] = {}
    for color in COLORS:
        n = sum(o.color == color for o in scene.objects)
        by_count.setdefault(n, []).append(("color", color))
    for shape in SHAPES:
        n = sum(o.shape == shape for o in scene.objects)
        by_count.setdefault(n, []).append(("shape", shape))
    counts = [n for n in by_count if n <= MAX_COUNT]
    if not counts:
        return None
    n = rng.choice(sorted(counts))
    kind, value = rng.choice(by_count[n])
    if kind == "color":
        text = f"how many {value} objects are there ?"
        cells = [o.cell for o in scene.objects if o.color == value]
    else:
        text = f"how many {SHAPE_PLURALS[value]} are there ?"
        cells = [o.cell for o in scene.objects if o.shape == value]
    return text, NUMBER_WORDS[n], cells


def _q_rare(scene: Scene, rng: random.Random):
    unique = [c for c, n in _color_counts(scene).items() if n == 1]
    if not unique:
        return None
    color = rng.choice(unique)
    (o,) = [o for o in scene.objects if o.color == color]
    return f"what shape is the only {color} object ?", o.shape, [o.cell]


_GENERATORS = {
    "color_at": _q_color_at,
    "shape_at": _q_shape_at,
    "relation": _q_relation,
    "exists": _q_exists,
    "count": _q_count,
    "rare": _q_rare,
}


def make_question(scene: Scene, qtype: str, rng: random.Random, qid: str) -> Question | None:
    """One question of ``qtype`` about ``scene``, or None when the scene has none."""
    out = _GENERATORS[qtype](scene, rng)
    if out is None:
        return None
    text, answer, needed = out
    return Question(
        id=qid,
        scene_key=scene.key,
        type=qtype,
        question=text,
        answer=answer,
        needed_cells=sorted(needed),
        object_cells=scene.object_cells,
    )


def answer_from_scene(scene: Scene, question: str) -> str:
    """Re-derive the answer of a question text from the scene alone (a checker).

    Parses the templates above independently of the generators, so tests can
    confirm that every stored answer is what the scene says.
    """
    words = question.rstrip(" ?").split()

    def cell_after(i: int) -> tuple[int, int]:
        assert words[i] == "cell", question
        name = words[i + 1]
        return int(name[1:]) - 1, COLUMN_LETTERS.index(name[0])

    if question.startswith("what color is the object at "):
        o = scene.at(*cell_after(words.index("cell")))
        return o.color
    if question.startswith("what shape is the object at "):
        o = scene.at(*cell_after(words.index("cell")))
        return o.shape
    if question.startswith("what color is the object "):
        rest = " ".join(words[5:])
        for name, (dr, dc) in DIRECTIONS.items():
            if rest.startswith(name + " "):
                ref_text = rest[len(name) + 1 :].split()
                break
        else:
            raise ValueError(question)
        if ref_text[:3] == ["the", "object", "at"]:
            r, c = int(ref_text[4][1:]) - 1, COLUMN_LETTERS.index(ref_text[4][0])
        else:
            (ref,) = [o for o in scene.objects if o.color == ref_text[1] and o.shape == ref_text[2]]
            r, c = ref.row, ref.col
        return scene.at(r + dr, c + dc).color
    if question.startswith("is there a "):
        color, shape = words[3], words[4]
        return "yes" if pair_cells(scene, color, shape) else "no"
    if question.startswith("how many "):
        what = words[2]
        if what in COLORS:
            n = sum(o.color == what for o in scene.objects)
        else:
            (shape,) = [s for s, p in SHAPE_PLURALS.items() if p == what]
            n = sum(o.shape == shape for o in scene.objects)
        return NUMBER_WORDS[n]
    if question.startswith("what shape is the only "):
        (o,) = [o for o in scene.objects if o.color == words[5]]
        return o.shape
    raise ValueError(f"unknown template: {question}")


# --------------------------------------------------------------------------- splits


def scene_key(split: str, seed: int, index: int) -> str:
    return f"{split}-{seed}-{index}"


def make_example(split: str, seed: int, index: int, qtypes=QUESTION_TYPES) -> tuple[Scene, list[Question]]:
    """Scene ``index`` of a split with one question per type in ``qtypes``.

    A scene that cannot host every requested type is replaced by the next
    candidate (``key#1``, ``key#2``...), so the output stays deterministic.
    """
    base = scene_key(split, seed, index)
    for attempt in range(100):
        key = base if attempt == 0 else f"{base}#{attempt}"
        scene = make_scene(key)
        rng = random.Random("q-" + key)
        questions = []
        for j, qtype in enumerate(qtypes):
            q = make_question(scene, qtype, rng, f"{base}-q{j}")
            if q is None:
                break
            questions.append(q)
        else:
            return scene, questions
    raise RuntimeError(f"no scene for {base} hosts all of {qtypes}")  # pragma: no cover


def make_split(split: str, num_images: int, seed: int = 0, qtypes=QUESTION_TYPES):
    """``num_images`` scenes of a split, each with one question per type."""
    return [make_example(split, seed, i, qtypes) for i in range(num_images)]


def iter_train_examples(seed: int, start: int = 0, qtypes=QUESTION_TYPES):
    """Endless training stream (split name ``train``), seeded by the training seed."""
    i = start
    while True:
        yield make_example("train", seed, i, qtypes)
        i += 1


def make_conversation(split: str, seed: int, index: int, turns: int = 4, qtypes=QUESTION_TYPES):
    """Scene ``index`` of a split with a conversation of ``turns`` questions of different types
    (``make_example``'s questions in a random order), asked one after the other about it."""
    scene, questions = make_example(split, seed, index, qtypes)
    rng = random.Random(f"conversation-{scene.key}")
    rng.shuffle(questions)
    return scene, questions[:turns]


def make_conversation_split(split: str = CONVERSATION_SPLIT, num_images: int = CONVERSATION_IMAGES,
                            seed: int = TEST_SEED, turns: int = 4, qtypes=QUESTION_TYPES):
    """``num_images`` scenes, each with one conversation of ``turns`` questions."""
    return [make_conversation(split, seed, i, turns, qtypes) for i in range(num_images)]


def conversation_messages(history: list[tuple[str, str]], question: str) -> list[dict]:
    """Chat messages (transformers' format) of a conversation about one image: the earlier
    ``(question, answer)`` turns, then ``question``; the image comes with the first turn."""
    messages = []
    for i, (q, a) in enumerate([*history, (question, None)]):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": q}]
        messages.append({"role": "user", "content": content})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return messages


def sample_questions(scene: Scene, k: int, rng: random.Random, qtypes=QUESTION_TYPES) -> list[Question]:
    """``k`` extra questions about one scene with random types (for training)."""
    out = []
    while len(out) < k:
        q = make_question(scene, rng.choice(qtypes), rng, f"{scene.key}-x{len(out)}")
        if q is not None:
            out.append(q)
    return out


# ----------------------------------------------------------------------- disk format


def write_split(out_dir: str | Path, split: str = "test", num_images: int = TEST_IMAGES, seed: int = TEST_SEED) -> Path:
    """Write a split as PNG images plus ``questions.jsonl``; returns the JSONL path.

    Each JSONL line: ``id, image`` (path relative to the JSONL file), ``question,
    answer, type, needed_cells, object_cells``, and ``scene_key``.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / "questions.jsonl"
    with open(path, "w") as f:
        for scene, questions in make_split(split, num_images, seed):
            rel = f"images/{scene.key.replace('#', '_')}.png"
            render(scene).save(out_dir / rel)
            for q in questions:
                f.write(json.dumps({"image": rel, **asdict(q)}) + "\n")
    return path


def read_split(jsonl_path: str | Path) -> list[dict]:
    """Read a written split; ``image`` becomes an absolute path."""
    jsonl_path = Path(jsonl_path)
    records = []
    with open(jsonl_path) as f:
        for line in f:
            rec = json.loads(line)
            rec["image"] = str((jsonl_path.parent / rec["image"]).resolve())
            records.append(rec)
    return records


def write_examples(out_dir: str | Path, num_images: int = 3, seed: int = TEST_SEED) -> Path:
    """The first ``num_images`` test scenes as ``example_<i>.png`` plus ``examples.jsonl``
    (one line per question: image file name, question, answer, type, cells), for the chat demo."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "examples.jsonl"
    with open(path, "w") as f:
        for i, (scene, questions) in enumerate(make_split("test", num_images, seed)):
            name = f"example_{i}.png"
            render(scene).save(out_dir / name)
            for q in questions:
                f.write(json.dumps({"image": name, **asdict(q)}) + "\n")
    return path


CAPTION_PROMPT = "describe the image"
# Training-only caption variants: (cell, colour) or (cell, shape) pairs, each answer predicted
# at its cell name; the prompt tells which attribute follows a cell name.
LIST_PROMPTS = {"color": "list the colors", "shape": "list the shapes"}


def caption(scene: Scene) -> str:
    """Dense description in reading order: ``"b1 red circle e1 blue cross ..."``.

    Trained as a caption (LLaVA's stage-1 alignment in miniature); it teaches the skill
    every localised question needs, finding the visual token of a named cell, with a
    target at every object instead of one per question."""
    objs = sorted(scene.objects, key=lambda o: o.cell)
    return " ".join(f"{cell_name(o.row, o.col)} {o.color} {o.shape}" for o in objs)


def vocabulary() -> list[str]:
    """Every word any question or answer can use (for the word-level tokenizer)."""
    words = {"what", "color", "shape", "is", "the", "object", "at", "cell", "?", "only"}
    words |= set(CAPTION_PROMPT.split())
    words |= {w for prompt in LIST_PROMPTS.values() for w in prompt.split()}
    words |= {"is", "there", "a", "how", "many", "objects", "are", "yes", "no"}
    words |= set(COLORS) | set(SHAPES) | set(SHAPE_PLURALS.values()) | set(NUMBER_WORDS)
    words |= {w for name in DIRECTIONS for w in name.split()}
    words |= {cell_name(r, c) for r in range(GRID) for c in range(GRID)}
    return sorted(words)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="eval/data/proxy_test")
    p.add_argument("--split", default="test")
    p.add_argument("--num-images", type=int, default=TEST_IMAGES)
    p.add_argument("--seed", type=int, default=TEST_SEED)
    p.add_argument("--examples", nargs="*", default=None, metavar="DIR",
                   help="instead: write the demo examples (first test scenes) to each DIR")
    a = p.parse_args(argv)
    if a.examples is not None:
        for d in a.examples:
            print(f"wrote {write_examples(d)}")
        return
    path = write_split(a.out, a.split, a.num_images, a.seed)
    n = sum(1 for _ in open(path))
    print(f"wrote {n} questions to {path}")


if __name__ == "__main__":
    main()
