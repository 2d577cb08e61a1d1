"""The shipped proxy LLaVA loads offline and answers test-split questions."""

import json

import pytest
import torch
from PIL import Image

from pumer_llava.embedded import EMBEDDED_MODEL_DIR, embedded_examples, embedded_training_record, load_embedded

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_MODEL_DIR / "model.safetensors").exists(), reason="embedded checkpoint not trained yet"
)


@pytest.fixture(scope="module")
def loaded():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        yield load_embedded()
    finally:
        mp.undo()


def test_checkpoint_is_small_and_plain_from_pretrained_loads_it():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    size = sum(p.stat().st_size for p in EMBEDDED_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 50_000_000
    model = LlavaForConditionalGeneration.from_pretrained(EMBEDDED_MODEL_DIR)
    processor = AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR)
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert type(processor).__name__ == "LlavaProcessor"


def test_image_token_is_one_id_and_expands_to_64(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    ids = tok("<image>", add_special_tokens=False)["input_ids"]
    assert ids == [model.config.image_token_id]
    ex = embedded_examples()[0]
    inputs = processor(images=[Image.open(ex["image"])], text=["USER: <image>\nhi ASSISTANT:"], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64
    assert inputs["pixel_values"].shape == (1, 3, 128, 128)


def test_chat_template_gives_the_training_prompt(loaded):
    _, processor = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a red circle ?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "USER: <image>\nis there a red circle ? ASSISTANT:"


def _learned_types(threshold=0.95):
    """Question types the shipped model answers at >= ``threshold`` on the held-out test split,
    as its training record says (docs/accuracy.md has all of them)."""
    acc = embedded_training_record()["test_accuracy"]
    return {t for t, a in acc.items() if t != "overall" and a >= threshold}


def test_greedy_answers_on_shipped_examples(loaded):
    """Every shipped example of a type the model has learned is answered correctly, with
    ``generate`` (left-padded batch), and each answer word is followed by </s>."""
    model, processor = loaded
    learned = _learned_types()
    assert {"color_at", "shape_at"} <= learned  # the localised lookups every method is measured on
    examples = [e for e in embedded_examples() if e["type"] in learned]
    assert len(examples) >= 6
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        images=[Image.open(e["image"]) for e in examples],
        text=[f"USER: <image>\n{e['question']} ASSISTANT:" for e in examples],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    answers = [processor.tokenizer.decode(row, skip_special_tokens=True).split()[:1] for row in new]
    assert answers == [[e["answer"]] for e in examples]
    assert (new[:, 1] == processor.tokenizer.eos_token_id).all()


def test_training_record():
    rec = embedded_training_record()
    assert rec["seed"] == 0 and rec["args"]["seed"] == 0
    assert rec["test_questions"] >= 2000
    assert set(rec["test_accuracy"]) == {"color_at", "shape_at", "relation", "exists", "count", "rare", "overall"}
    assert all(0.0 <= a <= 1.0 for a in rec["test_accuracy"].values())
    conv = rec["test_conversation_accuracy"]
    assert rec["test_conversation_questions"] >= 1000 and {"turn1", "turn2", "turn3", "turn4"} <= set(conv)
    assert "out" not in rec["args"] and "/tmp" not in json.dumps(rec)  # nothing of the machine it ran on
    json.dumps(rec)


def test_a_conversation_about_a_shipped_example_through_the_chat_session(loaded):
    """The chat's own flow: the first turn prefills the image, each later turn continues the
    cache; every turn of a conversation of learned question types is answered right, with
    the reduction off and with PuMer at a quarter of the visual tokens."""
    from pumer_llava import remove_pumer
    from pumer_llava.cli.chat import ChatSession

    model, processor = loaded
    learned = _learned_types()
    by_image = {}
    for e in embedded_examples():
        if e["type"] in learned:
            by_image.setdefault(e["image"], []).append(e)
    session = ChatSession(model, processor, max_new_tokens=3)
    try:
        for reduction in (None, 0.25):
            if reduction is not None:
                session.set_reduction(ratio=reduction, method="pumer")
            for image, examples in by_image.items():
                session.set_image(str(image))
                answers = [session.ask(e["question"])[0] for e in examples[:4]]
                assert answers == [e["answer"] for e in examples[:4]], (reduction, image)
                assert session.turn == len(answers)
    finally:
        remove_pumer(model)
