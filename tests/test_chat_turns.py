"""The per-turn chat benchmark (eval/chat_turns.py): every turn goes through pumer-chat's
session, later turns on the cache the earlier ones left, and what it scores is what a fresh
prefill of the whole conversation answers."""

import sys
from pathlib import Path

import pytest
import torch

EVAL = Path(__file__).resolve().parents[1] / "eval"
sys.path.insert(0, str(EVAL))
import chat_turns  # noqa: E402
import proxy_task as task  # noqa: E402

from pumer_llava.cli.chat import ChatSession  # noqa: E402


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    convs = task.make_conversation_split(num_images=2)
    d = tmp_path_factory.mktemp("conv")
    paths = []
    for i, (scene, _) in enumerate(convs):
        paths.append(str(d / f"{i}.png"))
        task.render(scene).save(paths[-1])
    return convs, paths


def test_rows_score_every_turn(small_proxy, conversations):
    model, processor = small_proxy
    convs, paths = conversations
    rows = chat_turns.run(model, processor, convs, paths, ["pumer", "random"], [16], log=lambda *_: None)
    assert [(r["name"], r["keep_tokens"]) for r in rows] == [("unreduced", 64), ("pumer", 16), ("random", 16)]
    for r in rows:
        assert r["n"] == 8 and set(r["per_turn"]) == {"turn1", "turn2", "turn3", "turn4"}
    assert rows[2]["layers"] == [2] and getattr(model, "pumer", None) is None
    md = chat_turns.to_markdown(rows, {"conversations": 2, "turns": 4, "model": "small"})
    assert md.splitlines()[0] == "| method | kept | layers | all turns | turn1 | turn2 | turn3 | turn4 |"


def test_a_continued_turn_answers_what_a_fresh_prefill_answers(small_proxy, conversations):
    """Unreduced, the session's turn 3 (on the cache of turns 1-2) gives the greedy tokens
    of one prefill of the conversation with the session's own earlier answers."""
    model, processor = small_proxy
    convs, paths = conversations
    scene, questions = convs[0]
    session = ChatSession(model, processor, max_new_tokens=3)
    session.set_image(paths[0])
    said = [session.ask(q.question)[0] for q in questions[:3]]
    history = [(q.question, a) for q, a in zip(questions[:2], said[:2])]
    text = processor.apply_chat_template(task.conversation_messages(history, questions[2].question),
                                         add_generation_prompt=True)
    inputs = processor(images=[task.render(scene)], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    fresh = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert said[2] == fresh
