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
    assert size <= 25_000_000
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


def test_greedy_answers_on_shipped_examples(loaded):
    model, processor = loaded
    examples = embedded_examples()
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
    correct = [a == [e["answer"]] for a, e in zip(answers, examples)]
    assert sum(correct) >= len(examples) - 2, list(zip(answers, [e["answer"] for e in examples]))
    # a one-word answer is followed by </s>
    assert (new[:, 1] == processor.tokenizer.eos_token_id).float().mean() > 0.9


def test_training_record():
    rec = embedded_training_record()
    assert rec["seed"] == 0
    assert rec["final_val_accuracy"]["overall"] >= 0.9
    json.dumps(rec)
