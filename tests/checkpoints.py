"""Tiny checkpoints of every adapter row written to a folder, as the tools load them (no download).

Each folder holds a model of tests/tiny.py, a word-level tokenizer whose special tokens sit at
the ids those models use, the row's processor with its PIL image processor, and a chat
template in the proxy model's format (``USER: <images>question ASSISTANT: answer</s>``).
Without torchvision the processors of OneVision and Qwen2-VL are built image-only
(:func:`pumer_llava.loading.image_only`), which is also how the tools load them then.
"""

from __future__ import annotations

from pathlib import Path

from tiny import IMAGE_SIZE, IMAGE_TOKEN, OV_PINPOINTS, PAD, PATCH, QWEN_PATCH, VIDEO_TOKEN, VOCAB

ROWS = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")

WORDS = (
    "user: assistant: what color shape is the object at row column ? red blue green yellow circle square "
    "triangle cross how many are there a an of left right one two three yes no it this image and"
).split()

# what a {"type": "image"} item becomes in the prompt, per row (the processor expands the image token)
_IMAGE_TEXT = {"llava": "<image>\n", "llava_next": "<image>\n", "llava_onevision": "<image>\n",
               "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def chat_template(image_text: str) -> str:
    return (
        "{%- for message in messages -%}"
        "{%- if not loop.first %}{{ ' ' }}{% endif -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
        "{%- for item in message['content'] | selectattr('type', 'equalto', 'image') -%}"
        "{{ '" + image_text.replace("\n", "\\n") + "' }}{%- endfor -%}"
        "{%- for item in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ item['text'] }}{%- endfor -%}"
        "{%- endif -%}"
        "{%- else -%}{{ 'ASSISTANT: ' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
        "{%- for item in message['content'] -%}{{ item['text'] }}{%- endfor -%}{%- endif -%}"
        "{{ '</s>' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
    )


def tokenizer(row: str):
    """Word-level tokenizer: <pad> 0, <s> 1, </s> 2, the image token 3, the video token 4, then words."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    qwen = row.startswith("qwen")
    image, video = ("<|image_pad|>", "<|video_pad|>") if qwen else ("<image>", "<video>")
    specials = ["<pad>", "<s>", "</s>", image, video, "<unk>"]
    tail = ["<|vision_end|>", "<|vision_start|>"] if qwen else []  # vision_start_token_id is VOCAB - 1
    words = WORDS + [f"w{i}" for i in range(VOCAB - len(specials) - len(WORDS) - len(tail))] + tail
    vocab = {w: i for i, w in enumerate(specials + words)}
    assert (vocab[image], vocab[video], vocab["<pad>"], len(vocab)) == (IMAGE_TOKEN, VIDEO_TOKEN, PAD, VOCAB)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("?", " ?"), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    extra = {"image_token": image, "video_token": video}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=extra, padding_side="left")
    if tail:
        fast.add_special_tokens({"additional_special_tokens": tail})
    return fast


def processor(row: str):
    import transformers as tf

    from pumer_llava.loading import image_only

    tok, template = tokenizer(row), chat_template(_IMAGE_TEXT[row])
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if row == "llava":
        images = tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop)
        return tf.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, chat_template=template,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if row == "llava_next":
        images = tf.LlavaNextImageProcessorPil(image_grid_pinpoints=OV_PINPOINTS, size={"shortest_edge": IMAGE_SIZE},
                                               crop_size=crop)
        return tf.LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, chat_template=template,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if row == "llava_onevision":
        images = tf.LlavaOnevisionImageProcessorPil(image_grid_pinpoints=OV_PINPOINTS, size=crop)
        cls = tf.LlavaOnevisionProcessor
        kw = dict(num_image_tokens=(IMAGE_SIZE // PATCH) ** 2, vision_feature_select_strategy="full",
                  image_token="<image>", video_token="<video>")
    else:
        images = tf.Qwen2VLImageProcessorPil(patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2,
                                             min_pixels=(4 * QWEN_PATCH) ** 2, max_pixels=(8 * QWEN_PATCH) ** 2)
        cls = tf.Qwen2VLProcessor if row == "qwen2_vl" else tf.Qwen2_5_VLProcessor
        kw = {}
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        cls = image_only(cls)
    return cls(image_processor=images, tokenizer=tok, chat_template=template, **kw)


def model(row: str, seed: int = 0):
    import tiny

    if row == "llava":
        return tiny.tiny_llava("llama", seed=seed)
    if row == "llava_next":
        return tiny.tiny_llava_next("llama", seed=seed)
    if row == "llava_onevision":
        return tiny.tiny_onevision(seed=seed)
    qwen = tiny.tiny_qwen_vl("2" if row == "qwen2_vl" else "2.5", seed=seed)
    # nor the vision markers: an answer holding one would not round-trip through the chat template
    qwen.generation_config.suppress_tokens += [VOCAB - 2, VOCAB - 1]
    return qwen


def write_checkpoint(row: str, path: str | Path) -> str:
    """Save row's tiny model and processor under ``path``; returns it as a string."""
    path = Path(path)
    model(row).save_pretrained(path)
    processor(row).save_pretrained(path)
    return str(path)
