"""The generated visual-question task: deterministic, disjoint splits, answers
that follow from the scene, oracle cells, and the on-disk format."""

import random
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import proxy_task as task  # noqa: E402


def _flat(split):
    return [(scene, q) for scene, qs in split for q in qs]


@pytest.fixture(scope="module")
def split60():
    return task.make_split("test", 60, seed=task.TEST_SEED)


def test_same_seed_same_data(split60):
    again = task.make_split("test", 60, seed=task.TEST_SEED)
    assert [(s.key, s.signature(), s.background, s.clutter) for s, _ in split60] == [
        (s.key, s.signature(), s.background, s.clutter) for s, _ in again
    ]
    assert [q for _, qs in split60 for q in qs] == [q for _, qs in again for q in qs]
    a, b = split60[3][0], again[3][0]
    assert task.render(a).tobytes() == task.render(b).tobytes()


def test_splits_and_seeds_are_disjoint(split60):
    test = {s.signature() for s, _ in split60}
    train = {s.signature() for s, _ in task.make_split("train", 60, seed=0)}
    train1 = {s.signature() for s, _ in task.make_split("train", 60, seed=1)}
    val = {s.signature() for s, _ in task.make_split("val", 60, seed=0)}
    assert not test & train and not test & val and not train & val and not train & train1


def test_scene_constraints(split60):
    for scene, _ in split60:
        assert task.MIN_OBJECTS <= len(scene.objects) <= task.MAX_OBJECTS
        cells = [o.cell for o in scene.objects]
        assert len(cells) == len(set(cells)), "at most one object per cell"
        assert all(0 <= c < task.NUM_CELLS for c in cells)
        assert task.render(scene).size == (task.IMAGE_SIZE, task.IMAGE_SIZE)


def test_every_type_per_image_and_answers_follow_from_the_scene(split60):
    for scene, qs in split60:
        assert [q.type for q in qs] == list(task.QUESTION_TYPES)
        for q in qs:
            assert task.answer_from_scene(scene, q.question) == q.answer, q
            assert len(q.answer.split()) == 1
            assert q.object_cells == scene.object_cells
            assert set(q.needed_cells) <= set(q.object_cells)


def test_extra_training_questions_are_consistent():
    scene, _ = task.make_example("train", 0, 5)
    rng = random.Random(0)
    for q in task.sample_questions(scene, 50, rng):
        assert task.answer_from_scene(scene, q.question) == q.answer


def test_needed_cells_match_the_question(split60):
    for scene, q in _flat(split60):
        if q.type in task.LOCALIZED_TYPES:
            assert q.needed_cells, q
        if q.type in ("color_at", "shape_at"):
            words = q.question.split()
            name = words[words.index("cell") + 1]
            row, col = int(name[1:]) - 1, "abcdefgh".index(name[0])
            assert q.needed_cells == [row * task.GRID + col]
        if q.type == "relation":
            assert len(q.needed_cells) == 2
            a, b = q.needed_cells
            assert abs(a // 8 - b // 8) + abs(a % 8 - b % 8) == 1, "reference and target are adjacent"
        if q.type == "exists":
            assert bool(q.needed_cells) == (q.answer == "yes")
        if q.type == "count":
            assert len(q.needed_cells) == task.NUMBER_WORDS.index(q.answer)


def test_answers_are_not_degenerate():
    flat = _flat(task.make_split("test", 200, seed=task.TEST_SEED))
    by_type = {t: Counter(q.answer for _, q in flat if q.type == t) for t in task.QUESTION_TYPES}
    assert set(by_type["exists"]) == {"yes", "no"}
    assert set(by_type["count"]) == set(task.NUMBER_WORDS)
    for t, counts in by_type.items():
        assert counts.most_common(1)[0][1] / sum(counts.values()) < 0.6, (t, counts)


def test_default_test_split_is_big_enough():
    assert task.TEST_IMAGES * len(task.QUESTION_TYPES) >= 2000


def test_vocabulary_covers_all_text(split60):
    vocab = set(task.vocabulary())
    for _, q in _flat(split60):
        assert set(q.question.split()) <= vocab and q.answer in vocab


def test_jsonl_round_trip(tmp_path):
    path = task.write_split(tmp_path / "split", "test", num_images=4, seed=task.TEST_SEED)
    records = task.read_split(path)
    expected = _flat(task.make_split("test", 4, seed=task.TEST_SEED))
    assert len(records) == len(expected) == 4 * len(task.QUESTION_TYPES)
    for rec, (scene, q) in zip(records, expected):
        assert {"id", "image", "question", "answer", "type", "needed_cells", "object_cells"} <= set(rec)
        assert (rec["id"], rec["question"], rec["answer"], rec["type"]) == (q.id, q.question, q.answer, q.type)
        assert rec["needed_cells"] == q.needed_cells and rec["object_cells"] == q.object_cells
        from PIL import Image

        with Image.open(rec["image"]) as im:
            assert im.convert("RGB").tobytes() == task.render(scene).tobytes()
