"""Train the proxy LLaVA on the generated visual-question task.

Builds a real ``LlavaForConditionalGeneration`` (CLIP vision tower with [CLS],
2-layer projector, Llama decoder; one key/value head per query head by default, as in
LLaVA-1.5's Vicuna, ``--text-kv-heads 2`` for grouped-query attention) plus a
word-level tokenizer and a ``LlavaProcessor``, trains it from scratch on CPU,
and saves a ``save_pretrained`` folder that loads offline with
``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``.

Usage (55 minutes on two CPU cores each)::

    python eval/train_proxy.py --seed 0 --out pumer_llava/assets/proxy-llava
    python eval/train_proxy.py --seed 1 --out /tmp/proxy-seed1

What the model learns, besides the questions one at a time:

- Conversations: a step's questions about an image are cut into conversations of 1 to
  ``--turns`` turns in the chat template's format (``USER: <image>\n{q1} ASSISTANT: {a1}</s>
  USER: {q2} ASSISTANT: ...``), each later turn seeing the earlier ones, so any turn can be
  answered from the image.
- Reading the image late: the supervised hops that read the visual tokens (the cell-name
  lookup, the content search, the colour-and-shape conjunction) sit at decoder layer
  ``--read-layer`` (2) and the one after it, the text-to-text hops at layer 0 (``route_heads``).
  Every method that reduces from layer 2 on, as published, then removes tokens the answer
  still needs.

What makes it train in minutes on two cores:

- Prefix sharing: the image prefix ``<s> USER: <image>x64`` is computed once
  per image and several questions follow it in one row. A 4-D attention mask
  lets each question see the prefix and itself only, and its position ids
  restart where the prefix ends, so every question sees exactly what it would
  see alone (``USER: <image>\\n{q} ASSISTANT: {a}</s>``) at a fraction of the
  cost.
- Auxiliary losses on the vision tower: the [CLS] output predicts which
  colour-shape pairs are present (multi-label); without it the [CLS] attention
  that VisPruner reads stays untrained and training stalled in a trial. Each
  patch of the layer the projector reads (``vision_feature_layer=-2``) also
  predicts its own cell's colour and shape. The heads are training-only and
  are not saved.
- Visual tokens aligned to words (``align_loss``): each regresses onto the sum of the
  word embeddings of its cell's name, colour and shape, plus fixed vectors for its *cell
  facts* (``cell_facts``: its four neighbours' colours, how many objects share its colour and
  its shape). The tower sees all patches at once and learns those facts from dense targets
  (64 per image, on 24 extra tower-only images per step), with six of its heads supervised
  to find the neighbours and the equals (``tower_supervision``); a relation or count question
  then needs one lookup of a cell instead of a combination of cells, which a from-scratch
  language model did not learn in the budget (relation 26%, count 40%).
- Supervised attention hops in the language model: the cell-name lookup
  (``lookup_supervision``), the content search, previous word, direction word and the
  colour-and-shape conjunction (``Packer.question_routes``), and probes that make each hop
  carry what the answer needs (``relay_loss``), all decaying to zero or training-only.
- Captions next to the questions, several per image: the reading-order description, (cell,
  colour) and (cell, shape) lists, (cell, colour of its neighbour) lists per direction and
  (attribute, count) lists (``Packer.caption_segment``): one target per object where a
  question gives one per image.
- Loss only on the answer word and ``</s>``; AdamW with warm-up and a cosine
  schedule whose progress is ``max(step / steps, elapsed / budget)``, so a
  slow (shared) machine ends the schedule on time instead of overrunning.
"""

from __future__ import annotations

import os

# On a shared CPU, OpenMP's spinning threads of several processes fight each other:
# passive waiting made forward passes ~10x faster here (set before torch starts OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the package, when not installed
import proxy_task as task  # noqa: E402
from pumer_llava.reduce.scoring import apply_rope  # noqa: E402

IMAGE_TOKEN = "<image>"
# Kinds of caption targets (the token predicted): 0 prompt, 1 next cell name in reading order,
# 2 colour at its cell name, 3 shape after the colour (reading order), 4 </s>, 5 cell name (or
# attribute word) in a shuffled list (unpredictable), 6 shape at its cell name, 7 the colour of a
# cell's neighbour at its cell name, 8 a count at its colour or shape word.
CAPTION_KINDS = ("prompt", "name", "color", "shape_after_color", "eos", "shuffled_name", "shape", "neighbour", "count")
# Caption segments by name (``Packer.caption_segment``); an int segment k is the older
# numbering: 0 the reading-order caption, then (cell, colour) and (cell, shape) lists alternating.
NEIGHBOUR_SEGMENTS = tuple(task.DIRECTIONS)  # "left of", "right of", "above", "below"
NAMED_NEIGHBOUR_SEGMENTS = tuple(f"named {d}" for d in NEIGHBOUR_SEGMENTS)
SEGMENTS = ("order", "colors", "shapes") + NEIGHBOUR_SEGMENTS + NAMED_NEIGHBOUR_SEGMENTS + ("counts",)
CAPTION_POOL = SEGMENTS[3:]  # ``--caption-extra`` draws from these each step
# Attention hops supervised in the questions (``Packer.question_routes``) and the decoder
# (layer, head) that learns each.
ROUTES = ("content", "prev", "direction", "conj")


def route_heads(read_layer: int) -> dict[str, tuple[int, int]]:
    """The decoder (layer, head) that learns each route when the language model first reads
    the image at decoder layer ``read_layer``: the text-to-text hops (``prev``, ``direction``)
    at layer 0, the content search at ``read_layer`` and the conjunction one layer later."""
    return {"content": (read_layer, 1), "prev": (0, 2), "direction": (0, 3), "conj": (read_layer + 1, 0)}


SINK = 0  # position of <s>, where a search puts the attention it has nowhere else to put
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
PROMPT_WORDS = ["user:", "assistant:"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# USER: <image>\n{question} ASSISTANT: {answer}</s>  (multi-turn: turns joined by a space)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ ' ' }}{% endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'USER: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for item in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}{{ item['text'] }}{%- endfor -%}{%- endif -%}"
    "{{ '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)


def prompt_text(question: str) -> str:
    """The single-turn prompt the model is trained and evaluated on."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


# ------------------------------------------------------------------- tokenizer etc.


def build_tokenizer():
    """Word-level tokenizer: special tokens, prompt words, and the task's vocabulary.

    Input is lower-cased and ``?`` split off, so ``"What color is it?"`` works;
    unknown words map to ``<unk>``. ``<s>`` is prepended by the post-processor.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = PROMPT_WORDS + task.vocabulary()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Replace("?", " ?"), normalizers.Replace("colour", "color"), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=256,
    )
    return fast


def build_processor(tokenizer):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": task.IMAGE_SIZE},
        crop_size={"height": task.IMAGE_SIZE, "width": task.IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=task.CELL,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the tower's [CLS]
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, args):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=args.vision_hidden * 3,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_heads,
        image_size=task.IMAGE_SIZE,
        patch_size=task.CELL,
        projection_dim=args.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.text_hidden,
        intermediate_size=args.text_mlp,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_heads,
        num_key_value_heads=args.text_kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=args.text_init_range,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=task.NUM_CELLS,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config)
    # The default init gives position embeddings ~25x smaller than the patch
    # embeddings, so "which cell is this" takes long to emerge; start from a
    # 2-D sin-cos table (as MAE does) at the scale of the content instead.
    pos = _vision_embeddings(model).position_embedding.weight  # (1 + 64, Cv)
    with torch.no_grad():
        pos[0].zero_()
        pos[1:] = sincos_2d(task.GRID, pos.shape[1]) * args.pos_init_scale
    # Word embeddings at the scale of the visual tokens. With the usual std 0.02 a word
    # vector has norm ~0.3 while the projector's outputs (pulled up by the grounding loss,
    # whose logits are visual token . word embedding) grow to norm ~10-30: from the first
    # layer on, what attention brings in from the image swamps each word's own identity in
    # the residual stream, and the model could tell a colour question from a shape question
    # but never which cell was asked about (every run sat at chance).
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, args.embed_init_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _vision_embeddings(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).embeddings


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) table: first half of the channels encodes the row, second the column."""
    quarter = dim // 4
    omega = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))  # (dim/4,)
    idx = torch.arange(grid, dtype=torch.float32)
    out = torch.arange(grid * grid)
    rows, cols = idx[out // grid], idx[out % grid]  # (g*g,)
    parts = []
    for coord in (rows, cols):
        angle = coord[:, None] * omega[None, :]  # (g*g, dim/4)
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1)  # (g*g, 4*quarter)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))


def pixels(images: list[Image.Image]) -> torch.Tensor:
    """CLIP-normalised pixels, equal to the processor's output for 128x128 RGB
    images (checked in ``check_consistency``) but without its per-call overhead."""
    x = torch.stack([torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8) for im in images])
    x = x.view(len(images), task.IMAGE_SIZE, task.IMAGE_SIZE, 3).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------- batching


class Packer:
    """Turns (scene, questions) examples into prefix-shared rows (see module doc)."""

    def __init__(self, tokenizer, read_layer: int = 0):
        self.tok = tokenizer
        self.route_heads = route_heads(read_layer)
        self.relay_layer = relay_layers(read_layer)[0]
        self.pad = tokenizer.pad_token_id
        self.eos = tokenizer.eos_token_id
        full = tokenizer(prompt_text("what color is the object at row 1 column 1 ?").replace(
            IMAGE_TOKEN, IMAGE_TOKEN * task.NUM_CELLS))["input_ids"]
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        last_image = max(i for i, t in enumerate(full) if t == image_id)
        self.prefix = full[: last_image + 1]  # <s> USER: <image>x64
        assert self.prefix[SINK] == tokenizer.bos_token_id
        self.image_start = self.prefix.index(image_id)
        self._cache: dict[str, list[int]] = {}
        ids = tokenizer.convert_tokens_to_ids  # word id -> (attribute, value) for the content search
        self._attr = {ids(c): ("color", c) for c in task.COLORS}
        self._attr.update({ids(sh): ("shape", sh) for sh in task.SHAPES})
        self._attr.update({ids(pl): ("shape", sh) for sh, pl in task.SHAPE_PLURALS.items()})
        self._cell_of = {int(t): c for c, t in enumerate(cell_name_ids(tokenizer).tolist())}

    def suffix(self, question: str) -> list[int]:
        """Ids after the image for one question, up to and including ``ASSISTANT:``."""
        if question not in self._cache:
            self._cache[question] = self.tok(f"{question} ASSISTANT:", add_special_tokens=False)["input_ids"]
        return self._cache[question]

    def turn(self, question: str, first: bool) -> list[int]:
        """Ids of one turn's question up to ``ASSISTANT:``; a later turn starts with ``USER:``
        (the chat template joins turns with a space, after the last answer's ``</s>``)."""
        return self.suffix(question) if first else self.suffix(f"USER: {question}")

    def answer_id(self, answer: str) -> int:
        (i,) = self.tok(answer, add_special_tokens=False)["input_ids"]
        return i

    def caption_segment(self, scene, k: int | str = 0):
        """Ids of ``{CAPTION_PROMPT} ASSISTANT: {caption}</s>`` and, per caption word, its
        kind (see ``CAPTION_KINDS``).

        ``k == 0`` is the caption in reading order, the one a user gets: ``c5 red circle ...``.
        Its shape word is predicted at the colour word, one token after the cell name, so it
        needs two attention hops (carry "c5" forward, then find its cell), and its next cell
        name needs a search. Trained from the start, those targets kept the one-hop lookup
        "the word c5 finds the visual token of cell c5" from forming at all (colour
        targets alone learnt it in ~250 steps, with the shape and name targets added it was
        still at chance after 400). So the extra segments are one-hop pairs of the same objects
        in a shuffled order, after a prompt that says which attribute follows a cell name: ``k``
        odd ``list the colors ASSISTANT: c5 red d2 blue ...``, ``k`` even ``list the shapes
        ASSISTANT: c5 circle d2 square ...``; every target is predicted at its own cell name.
        (Without the two prompts, colour and shape pairs made the same "c5" ambiguous and the
        lookup stalled again.) The reading-order targets are weighted in later
        (``caption_weights``).

        ``k`` may also name a segment (``SEGMENTS``): ``"colors"``, ``"shapes"``, one of the
        directions, ``list the colors left of ASSISTANT: c5 red ...`` (the colour of the object
        left of each object that has one there, predicted at its cell name: the relation
        question's hop, one target per such object instead of one per question), the same
        direction after ``named``, ``list the colors left of ASSISTANT: red circle blue ...``
        (objects named by a colour-shape pair that only they have, the target predicted at the
        shape word: a named relation's hops), or
        ``"counts"``, ``how many ASSISTANT: red two circles three ...`` (every colour and shape
        plural with its count, 0-4, predicted at the attribute word: the count question's
        hop)."""
        if isinstance(k, int):
            k = "order" if k == 0 else ("colors" if k % 2 else "shapes")
        rng = random.Random(f"caption-{scene.key}-{k}")
        objs = list(scene.objects)
        rng.shuffle(objs)
        if k == "order":
            prompt = self.suffix(task.CAPTION_PROMPT)
            text, kinds_cycle = task.caption(scene), (1, 2, 3)
        elif k in ("colors", "shapes"):
            attr = k[:-1]
            prompt = self.suffix(task.LIST_PROMPTS[attr])
            text = " ".join(f"{task.cell_name(o.row, o.col)} {getattr(o, attr)}" for o in objs)
            kinds_cycle = (5, 2 if attr == "color" else 6)
        elif k in NEIGHBOUR_SEGMENTS or k in NAMED_NEIGHBOUR_SEGMENTS:
            named = k.startswith("named ")
            direction = k[len("named "):] if named else k
            prompt = self.suffix(f"{task.LIST_PROMPTS['color']} {direction}")
            pairs = [(o, scene.neighbour(o, direction)) for o in objs]
            pairs = [(o, nb) for o, nb in pairs if nb is not None]
            if named:
                pairs = [(o, nb) for o, nb in pairs if len(task.pair_cells(scene, o.color, o.shape)) == 1]
                text = " ".join(f"{o.color} {o.shape} {nb.color}" for o, nb in pairs)
                kinds_cycle = (5, 5, 7)
            else:
                text = " ".join(f"{task.cell_name(o.row, o.col)} {nb.color}" for o, nb in pairs)
                kinds_cycle = (5, 7)
        elif k == "counts":
            prompt = self.suffix("how many")
            counts = [(c, sum(o.color == c for o in objs)) for c in task.COLORS]
            counts += [(task.SHAPE_PLURALS[sh], sum(o.shape == sh for o in objs)) for sh in task.SHAPES]
            counts = [(w, n) for w, n in counts if n <= task.MAX_COUNT]
            rng.shuffle(counts)
            text = " ".join(f"{w} {task.NUMBER_WORDS[n]}" for w, n in counts)
            kinds_cycle = (5, 8)
        else:
            raise ValueError(f"unknown caption segment {k!r}; known: {SEGMENTS}")
        words = self.tok(text, add_special_tokens=False)["input_ids"] if text else []
        n = len(kinds_cycle)
        kinds = [0] * len(prompt) + [kinds_cycle[i % n] for i in range(len(words))] + [4]
        return prompt + words + [self.eos], kinds

    def attribute_cells(self, scene, token_id: int, also: int | None = None) -> list[int]:
        """Cells of ``scene`` whose object has the colour or shape the word ``token_id`` names
        (a shape's plural too), and the one word ``also`` names as well when given; [] for any
        other word or when none has it."""
        if token_id not in self._attr or (also is not None and also not in self._attr):
            return []
        wanted = [self._attr[token_id]] + ([self._attr[also]] if also is not None else [])
        return [o.cell for o in scene.objects if all(getattr(o, attr) == value for attr, value in wanted)]

    def question_routes(self, scene, question: str):
        """The attention hops that answer ``question`` about ``scene``, as supervision targets:
        ``(route, query word index, prefix key positions, question word indices)``; the
        route's decoder layer and head are in ``route_heads``. A cell ``c`` is the prefix
        position ``image_start + c``; ``SINK`` is ``<s>``.

        - ``content`` (layer 0): every colour or shape word -> the cells holding it, ``<s>``
          when none does (nothing to count, no such object). The count itself comes with the
          cells' tokens (``cell_facts``).
        - ``prev`` (layer 0): every question word -> the word before it, so the shape word of
          "a red circle" holds its colour for the next hop.
        - ``direction`` (layer 0): the last word of a relation's reference (the cell name or
          the shape) -> its direction word (left/right/above/below), which picks which of the
          reference's neighbour facts (``cell_facts``) is the answer.
        - ``conj`` (layer 1): the shape word of "is there a red circle" and of a relation's
          named reference -> the cells with that colour *and* shape, ``<s>`` when none (exists
          stayed at 65% when only one attribute was searched for at a time).

        A relation's reference is looked up like any cell name (or found by ``conj``), never its
        neighbour: addressing "the cell left of c5" from the words meant learning a shifted copy
        of all 64 cell names, and a supervised hop for it never formed.
        With ``route_supervision(..., mass=True)`` (the default) a route's ``<s>`` counts only
        when nothing else is a key.
        """
        words = question.split()
        out = []
        for i, w in enumerate(words):
            tid = self.tok.convert_tokens_to_ids(w)
            if tid in self._attr:
                out.append(("content", i, [SINK] + [self.image_start + c for c in self.attribute_cells(scene, tid)], []))
            if i > 0:
                out.append(("prev", i, [], [i - 1]))
        if question.startswith("is there a "):
            color, shape = words[3], words[4]
            cells = [o.cell for o in scene.objects if o.color == color and o.shape == shape]
            out.append(("conj", 4, [SINK] + [self.image_start + c for c in cells], []))
        elif question.startswith("what color is the object ") and not question.startswith("what color is the object at "):
            d = 5  # "what color is the object {left|right} of ..." / "{above|below} ..."
            ref_start = d + (2 if words[d] in ("left", "right") else 1)
            ref = words[ref_start:-1]
            last = len(words) - 2  # the cell name or the shape word, before "?"
            out.append(("direction", last, [], [d]))
            if ref[:3] != ["the", "object", "at"]:  # ... the red circle ? (else: ... at cell c5 ?)
                (o,) = [o for o in scene.objects if o.color == ref[1] and o.shape == ref[2]]
                out.append(("conj", last, [SINK, self.image_start + o.cell], []))
        return out

    def caption_routes(self, scene, ids, kinds):
        """The hops of a caption segment (``caption_segment``'s ids and kinds), as
        ``question_routes`` gives them: at each cell name that predicts a neighbour's colour,
        ``direction`` to the prompt's direction word (as a relation question's reference holds
        its direction), and at the shape word of a named object also ``prev`` and ``conj`` to
        its cell (as for a relation's named reference); at each attribute word that predicts a
        count, ``content`` to ``<s>`` and the cells holding it."""
        out = []
        dir_words = {self.tok.convert_tokens_to_ids(name.split()[0]) for name in NEIGHBOUR_SEGMENTS}
        prompt_dirs = [j for j, (t, kind) in enumerate(zip(ids, kinds)) if kind == 0 and t in dir_words]
        for i in range(1, len(ids)):
            if kinds[i] == 7:
                out.append(("direction", i - 1, [], prompt_dirs))
                if ids[i - 1] in self._attr:  # a named object: "red circle" -> its one cell
                    (cell,) = self.attribute_cells(scene, ids[i - 1], also=ids[i - 2])
                    out.append(("prev", i - 1, [], [i - 2]))
                    out.append(("conj", i - 1, [SINK, self.image_start + cell], []))
            elif kinds[i] == 8:
                cells = self.attribute_cells(scene, ids[i - 1])
                out.append(("content", i - 1, [SINK] + [self.image_start + c for c in cells], []))
        return out

    def _add_hops(self, routes, relay, relay_count, b, start, ids, hops):
        """Adds a segment's hops (``question_routes`` / ``caption_routes``, word indices into
        ``ids``, which starts at row position ``start``) to the batch's routes, and the relay
        targets they imply (``relay_loss``): every cell name of the segment holds its cell once
        layer 0's lookup has run (the input of layer 1); a ``conj`` hop that finds one cell
        holds that cell after its layer; a ``content`` hop holds the count of what it searched
        for (0-5, 5 meaning 5 or more) after its layer."""
        for name, i, prefix_keys, word_keys in hops:
            keys = list(prefix_keys) + [start + j for j in word_keys]
            routes.append((ROUTES.index(name), b, start + i, keys))
            cells = [k - self.image_start for k in prefix_keys if k != SINK]
            layer = self.route_heads[name][0] + 1
            if name == "conj" and len(cells) == 1:
                relay.append((b, start + i, cells[0], layer))
            elif name == "content":
                relay_count.append((b, start + i, min(len(cells), MAX_FACT_COUNT), layer))
        for i, t in enumerate(ids):
            if t in self._cell_of:
                relay.append((b, start + i, self._cell_of[t], self.relay_layer))

    def pack(self, examples, captions: int | list = 0):
        """Rows for a batch of ``(scene, conversations)``: each conversation a list of
        ``Question`` asked one after the other (a bare ``Question`` is a one-turn
        conversation), in the chat template's format, every later turn seeing the earlier
        questions and their answers.

        Returns pixel_values (B,3,H,W), input_ids (B,T), position_ids (B,T),
        mask (B,1,T,T) bool, and per question: (row, position predicting the
        answer, answer id, position predicting </s>), plus the types and the turns (1-based).
        """
        P = len(self.prefix)
        rows, pos_rows, seg_rows, targets, types, turns = [], [], [], [], [], []
        routes = []  # (route, row, query position, key positions), see ``question_routes``
        relay = []  # (row, position, cell, layer): what a lookup brought there (``relay_loss``)
        relay_count = []  # (row, position, count, layer): what a content search brought there
        cap = []  # (row, position, next id, kind of the next id)
        for b, (scene, questions) in enumerate(examples):
            convs = [[c] if isinstance(c, task.Question) else list(c) for c in questions]
            ids, pos, seg = list(self.prefix), list(range(P)), [0] * P
            for j, k in enumerate(range(int(captions)) if isinstance(captions, int) else captions):
                s, kinds = self.caption_segment(scene, k)
                start = len(ids)
                ids += s
                pos += list(range(P, P + len(s)))
                seg += [len(convs) + 1 + j] * len(s)
                cap += [(b, start + i - 1, s[i], kinds[i]) for i in range(1, len(s)) if kinds[i] > 0]
                self._add_hops(routes, relay, relay_count, b, start, s, self.caption_routes(scene, s, kinds))
            for k, conv in enumerate(convs):
                conv_start = len(ids)
                for j, q in enumerate(conv):
                    lead = 0 if j == 0 else 1  # "USER:" before a later turn's question
                    s = self.turn(q.question, first=j == 0) + [self.answer_id(q.answer), self.eos]
                    start = len(ids)
                    ids += s
                    pos += list(range(P + start - conv_start, P + len(ids) - conv_start))
                    seg += [k + 1] * len(s)
                    # logits at "ASSISTANT:" predict the answer, at the answer predict </s>
                    targets.append((b, start + len(s) - 3, self.answer_id(q.answer), start + len(s) - 2))
                    types.append(q.type)
                    turns.append(j + 1)
                    self._add_hops(routes, relay, relay_count, b, start + lead, s[lead:],
                                   self.question_routes(scene, q.question))
            rows.append(ids)
            pos_rows.append(pos)
            seg_rows.append(seg)
        T = max(len(r) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, T), self.pad, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        segment = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
        for b in range(B):
            n = len(rows[b])
            input_ids[b, :n] = torch.tensor(rows[b])
            position_ids[b, :n] = torch.tensor(pos_rows[b])
            segment[b, :n] = torch.tensor(seg_rows[b])
        causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
        q_seg, k_seg = segment[:, :, None], segment[:, None, :]  # (B, T, 1), (B, 1, T)
        mask = causal & ((k_seg == 0) | (k_seg == q_seg)) & (k_seg >= 0)  # (B, T, T)
        mask |= torch.eye(T, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
        pv = pixels([task.render(scene) for scene, _ in examples])
        rwidth = max([1] + [len(k) for *_, k in routes])
        route_keys = torch.full((len(routes), rwidth), -1, dtype=torch.long)
        for i, (*_, keys) in enumerate(routes):
            route_keys[i, : len(keys)] = torch.tensor(keys, dtype=torch.long)
        return {
            "relay": torch.tensor(relay, dtype=torch.long).view(-1, 4),
            "relay_count": torch.tensor(relay_count, dtype=torch.long).view(-1, 4),
            "routes": torch.tensor([r[:3] for r in routes], dtype=torch.long).view(-1, 3),
            "route_keys": route_keys,
            "captions": torch.tensor(cap, dtype=torch.long).view(-1, 4),
            "pixel_values": pv,
            "input_ids": input_ids,
            "position_ids": position_ids,
            "mask": mask[:, None],
            "targets": torch.tensor(targets, dtype=torch.long).view(-1, 4),
            "types": types,
            "turns": turns,
            "route_heads": self.route_heads,
        }


def aux_targets(examples, device="cpu"):
    """[CLS] multi-label pair targets (B, C*S) and per-patch colour/shape classes (B, 64)."""
    colors, shapes = list(task.COLORS), list(task.SHAPES)
    B = len(examples)
    pairs = torch.zeros(B, len(colors) * len(shapes))
    cell_color = torch.full((B, task.NUM_CELLS), len(colors), dtype=torch.long)  # last class: empty
    cell_shape = torch.full((B, task.NUM_CELLS), len(shapes), dtype=torch.long)
    for b, (scene, _) in enumerate(examples):
        for o in scene.objects:
            ci, si = colors.index(o.color), shapes.index(o.shape)
            pairs[b, ci * len(shapes) + si] = 1.0
            cell_color[b, o.cell] = ci
            cell_shape[b, o.cell] = si
    return pairs, cell_color, cell_shape


# Cell facts: what a patch can know about its neighbourhood and the whole image, which the
# tower computes (bidirectional attention over all patches) and the visual token carries.
FACT_DIRECTIONS = tuple(task.DIRECTIONS)  # "left of", "right of", "above", "below"
MAX_FACT_COUNT = 5  # "how many objects share my colour / my shape", 5 meaning 5 or more (answers go to 4)
FACT_SLOTS = len(FACT_DIRECTIONS) + 2  # per cell: 4 neighbour colours, colour count, shape count


def _fact_index(slot: int, value: int) -> int:
    """Row of the fact table for ``value`` in ``slot``: neighbour slots hold a colour index,
    the two count slots a count 1..MAX_FACT_COUNT."""
    nc = len(task.COLORS)
    if slot < len(FACT_DIRECTIONS):
        return slot * nc + value
    return len(FACT_DIRECTIONS) * nc + (slot - len(FACT_DIRECTIONS)) * MAX_FACT_COUNT + (value - 1)


NUM_FACTS = _fact_index(FACT_SLOTS - 1, MAX_FACT_COUNT) + 1


def cell_facts(examples) -> torch.Tensor:
    """(B, 64, FACT_SLOTS) fact-table rows per cell (-1: none), for occupied cells only: the
    colour of the object left of / right of / above / below it (none when that cell is empty
    or off the grid), and how many objects of the scene share its colour and its shape.

    Relation and count questions need more than one cell, and a from-scratch language model
    did not learn to combine cells in the CPU budget (relation 26%, count 40%):
    "the object left of c5" meant finding c5, then addressing the cell beside it, and counting
    meant reading a count out of how attention spread. The vision tower sees every patch at
    once and is trained densely (64 targets per image), so it learns these facts quickly; a
    question then needs one lookup of its reference cell (or of any cell with the counted
    attribute), as real CLIP features also carry their surroundings."""
    colors = list(task.COLORS)
    out = torch.full((len(examples), task.NUM_CELLS, FACT_SLOTS), -1, dtype=torch.long)
    for b, (scene, _) in enumerate(examples):
        n_color = defaultdict(int)
        n_shape = defaultdict(int)
        for o in scene.objects:
            n_color[o.color] += 1
            n_shape[o.shape] += 1
        for o in scene.objects:
            for slot, name in enumerate(FACT_DIRECTIONS):
                if (nb := scene.neighbour(o, name)) is not None:
                    out[b, o.cell, slot] = _fact_index(slot, colors.index(nb.color))
            out[b, o.cell, -2] = _fact_index(FACT_SLOTS - 2, min(n_color[o.color], MAX_FACT_COUNT))
            out[b, o.cell, -1] = _fact_index(FACT_SLOTS - 1, min(n_shape[o.shape], MAX_FACT_COUNT))
    return out


def fact_table(dim: int, std: float, seed: int) -> torch.Tensor:
    """(NUM_FACTS, dim) fixed random vectors, one per fact, at ``std`` per channel (the word
    embeddings' init is std 1): the directions the visual tokens carry their facts in."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(NUM_FACTS, dim, generator=g) * std


def fact_sums(table: torch.Tensor, facts: torch.Tensor) -> torch.Tensor:
    """(B, 64, D): per cell, the sum of its facts' vectors (``facts`` from ``cell_facts``)."""
    return (table[facts.clamp_min(0)] * (facts >= 0).unsqueeze(-1).to(table.dtype)).sum(2)


def fact_classes(facts: torch.Tensor) -> torch.Tensor:
    """(B, 64, FACT_SLOTS) class per slot for the linear probes: a neighbour slot's colour
    index, a count slot's count - 1; -100 where the slot holds nothing (empty cell, no
    neighbour there: with 8-16 objects of 64 cells most neighbours are empty, and a probe
    that also had to say "none" learnt to say only that)."""
    cls = torch.full_like(facts, -100)
    for slot in range(FACT_SLOTS):
        v = facts[..., slot]
        first = _fact_index(slot, 0 if slot < len(FACT_DIRECTIONS) else 1)
        cls[..., slot] = torch.where(v >= 0, v - first, torch.full_like(v, -100))
    return cls


def relay_layers(read_layer: int) -> tuple[int, int]:
    """Inputs the relay probes read: after the lookup and content layer ``read_layer``, and
    after the conjunction layer; the first is where a cell name holds its cell's facts."""
    return (read_layer + 1, read_layer + 2)

# Tower heads whose attention is supervised to gather the cell facts (``tower_supervision``):
# (layer, head) per neighbour direction (``FACT_DIRECTIONS`` order), then the colour and the
# shape count. Layer 0 finds neighbours by position alone; equal colours are plain in layer 1's
# input, equal shapes only later (a shape-count head in layer 1 decoded 52% of the counts).
TOWER_HEADS = ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (2, 0))


def tower_routes(examples):
    """Supervision targets of ``TOWER_HEADS`` in the tower's token order ([CLS] at 0, cell c at
    1 + c): ``(head slot, row, query token, key tokens)``.

    - neighbour slots: every cell -> the cell beside it in that direction (when on the grid),
      occupied or not, so the head learns a pure position offset;
    - count slots: every occupied cell -> [CLS] and every cell whose object shares its colour
      (its shape), itself included, uniformly: the share left on [CLS] is 1/(n+1), the count."""
    out = []
    for b, (scene, _) in enumerate(examples):
        for cell in range(task.NUM_CELLS):
            r, c = divmod(cell, task.GRID)
            for slot, name in enumerate(FACT_DIRECTIONS):
                dr, dc = task.DIRECTIONS[name]
                if 0 <= r + dr < task.GRID and 0 <= c + dc < task.GRID:
                    out.append((slot, b, 1 + cell, [1 + (r + dr) * task.GRID + (c + dc)]))
        for o in scene.objects:
            for slot, attr in ((len(FACT_DIRECTIONS), "color"), (len(FACT_DIRECTIONS) + 1, "shape")):
                same = [1 + p.cell for p in scene.objects if getattr(p, attr) == getattr(o, attr)]
                out.append((slot, b, 1 + o.cell, [0] + same))
    width = max(len(k) for *_, k in out)
    keys = torch.full((len(out), width), -1, dtype=torch.long)
    for i, (*_, k) in enumerate(out):
        keys[i, : len(k)] = torch.tensor(k)
    return torch.tensor([r[:3] for r in out], dtype=torch.long), keys


def tower_supervision(model, hidden_states, routes, keys) -> torch.Tensor:
    """Cross-entropy between each ``TOWER_HEADS`` head's attention (recomputed from the tower
    layer's input, ``hidden_states[layer]`` of ``output_hidden_states``) and the uniform
    distribution over its keys (``tower_routes``), averaged over the slots."""
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    logatt, parts = {}, []
    for slot, (layer_idx, head) in enumerate(TOWER_HEADS):
        sel = routes[:, 0] == slot
        if not sel.any():
            continue
        if layer_idx not in logatt:
            layer = layers[layer_idx]
            attn = layer.self_attn
            x = layer.layer_norm1(hidden_states[layer_idx])  # (B, N, Cv)
            B, N, hd = x.shape[0], x.shape[1], attn.head_dim
            q = attn.q_proj(x).view(B, N, -1, hd).transpose(1, 2)  # (B, H, N, hd)
            k = attn.k_proj(x).view(B, N, -1, hd).transpose(1, 2)
            logatt[layer_idx] = ((q @ k.transpose(-1, -2)) * attn.scale).log_softmax(-1)  # (B, H, N, N)
        rows, pos, cols = routes[sel, 1], routes[sel, 2], keys[sel]
        picked = logatt[layer_idx][rows, head, pos].gather(1, cols.clamp_min(0)) * (cols >= 0)  # (M, W)
        parts.append((-picked.sum(1) / (cols >= 0).sum(1)).mean())
    return torch.stack(parts).mean()


class AuxHeads(torch.nn.Module):
    """Training-only heads (not saved with the model).

    ``pairs`` reads the tower's pooled [CLS]; the per-patch heads read the
    projector's output, i.e. the visual tokens as the language model gets them,
    so each token carries its cell's colour, shape, row and column linearly.
    """

    def __init__(self, vision_hidden: int, text_hidden: int, read_layer: int = 0):
        super().__init__()
        nc, ns = len(task.COLORS), len(task.SHAPES)
        self.pairs = torch.nn.Linear(vision_hidden, nc * ns)
        self.color = torch.nn.Linear(text_hidden, nc + 1)  # last class: empty cell
        self.shape = torch.nn.Linear(text_hidden, ns + 1)
        self.row = torch.nn.Linear(text_hidden, task.GRID)
        self.col = torch.nn.Linear(text_hidden, task.GRID)
        self.neighbours = torch.nn.Linear(text_hidden, len(FACT_DIRECTIONS) * nc)
        self.counts = torch.nn.Linear(text_hidden, 2 * MAX_FACT_COUNT)
        # relay probes (``relay_loss``), per decoder layer whose input they read
        self.relay = torch.nn.ModuleDict()
        for layer in relay_layers(read_layer):
            self.relay[f"neighbours{layer}"] = torch.nn.Linear(text_hidden, len(FACT_DIRECTIONS) * nc)
            self.relay[f"counts{layer}"] = torch.nn.Linear(text_hidden, 2 * MAX_FACT_COUNT)
            self.relay[f"count{layer}"] = torch.nn.Linear(text_hidden, MAX_FACT_COUNT + 1)  # 0..5

        # the attribute each count head matches on, at that head's layer input (``tower_supervision``)
        self.tower_attr = torch.nn.ModuleDict({
            "color": torch.nn.Linear(vision_hidden, nc + 1), "shape": torch.nn.Linear(vision_hidden, ns + 1)})

    def tower_attr_loss(self, hidden_states, cell_color, cell_shape):
        """Linear probes of each patch's colour and shape at the input of the tower layer whose
        head counts by it (``TOWER_HEADS``): equal shapes were found only as well as shape
        was readable there (same-shape head 71% on its keys, shape counts 52%)."""
        nd = len(FACT_DIRECTIONS)
        loss = 0.0
        for attr, target, (layer, _) in (("color", cell_color, TOWER_HEADS[nd]), ("shape", cell_shape, TOWER_HEADS[nd + 1])):
            x = hidden_states[layer][:, 1:]  # (B, 64, Cv), [CLS] dropped
            loss = loss + F.cross_entropy(self.tower_attr[attr](x).flatten(0, 1), target.flatten())
        return loss

    def fact_loss(self, image_embeds, classes, relay: int | None = None):
        """Linear probes of the cell facts (``fact_classes``, (..., FACT_SLOTS)) on the visual
        tokens (``image_embeds``, (..., D)), or, with ``relay`` a decoder layer, on that layer's
        input at the tokens that looked them up (``relay_loss``)."""
        nd, nc = len(FACT_DIRECTIONS), len(task.COLORS)
        if relay is None:
            neighbours, counts = self.neighbours, self.counts
        else:
            neighbours, counts = self.relay[f"neighbours{relay}"], self.relay[f"counts{relay}"]
        nb = neighbours(image_embeds).reshape(-1, nc)  # (N*4, 6)
        cnt = counts(image_embeds).reshape(-1, MAX_FACT_COUNT)  # (N*2, 5)
        return (F.cross_entropy(nb, classes[..., :nd].flatten(), ignore_index=-100)
                + F.cross_entropy(cnt, classes[..., nd:].flatten(), ignore_index=-100))


def packed_forward(model, batch, capture_layers=()):
    """Answer logits (N, V) and </s> logits (N, V), plus the tower's outputs (for the
    language model's images, then any tower-only ``batch["extra_pixels"]``).

    For each of ``capture_layers``, the input hidden states and position embeddings of that
    decoder layer are stored in ``batch["captured"][layer]`` (for attention supervision)."""
    inner = model.model
    handles = []
    batch["captured"] = {}
    for idx in set(capture_layers):
        def grab(module, args, kwargs, idx=idx):
            hs = args[0] if args else kwargs["hidden_states"]
            batch["captured"][idx] = (hs, kwargs["position_embeddings"])
        handles.append(inner.language_model.layers[idx].register_forward_pre_hook(grab, with_kwargs=True))
    cfg = model.config
    pv = batch["pixel_values"]
    B = pv.shape[0]  # rows of the language model; tower-only images (``extra_pixels``) follow
    if "extra_pixels" in batch:
        pv = torch.cat([pv, batch["extra_pixels"]])
    vis = inner.vision_tower(pv, output_hidden_states=True, return_dict=True)
    feats = vis.hidden_states[cfg.vision_feature_layer][:, 1:]  # (B + extra, 64, Cv), [CLS] dropped
    image_embeds = inner.multi_modal_projector(feats)  # (B + extra, 64, D)
    mix = float(batch.get("oracle_visual", 0.0))
    if mix > 0 and "ground" in batch:
        # Teacher forcing of the visual tokens (``--oracle-until``): the language model gets, instead of (or
        # mixed into) the projector's output, the exact sum of the word embeddings of each
        # cell's name, colour and shape, the tokens the projector is being aligned to. With
        # both sides moving at once the lookup never formed; on fixed tokens it
        # forms in ~450 steps, and by the time the mix fades out the projector's tokens are
        # within a few percent of those sums (the alignment loss).
        oracle = word_sums(model, [t[:B] for t in batch["ground"]])
        if "fact_vectors" in batch:
            oracle = oracle + batch["fact_vectors"][:B]
        image_embeds_lm = mix * oracle + (1.0 - mix) * image_embeds[:B]
    else:
        image_embeds_lm = image_embeds[:B]
    ids = batch["input_ids"]
    embeds = inner.get_input_embeddings()(ids)  # (B, T, D)
    image_mask = (ids == cfg.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, image_embeds_lm.to(embeds.dtype))
    try:
        out = inner.language_model(
            inputs_embeds=embeds, attention_mask=batch["mask"], position_ids=batch["position_ids"], use_cache=False
        )
    finally:
        for handle in handles:
            handle.remove()
    h = out.last_hidden_state  # (B, T, D)
    t = batch["targets"]
    h_ans = h[t[:, 0], t[:, 1]]  # (N, D)
    h_eos = h[t[:, 0], t[:, 3]]
    c = batch.get("captions")
    if c is not None and len(c):
        batch["caption_logits"] = model.lm_head(h[c[:, 0], c[:, 1]])  # (M, V)
    return model.lm_head(h_ans), model.lm_head(h_eos), vis, image_embeds


def _head_attention_nll(model, batch, layer_idx: int, heads: int, rows, pos, cols, first_head: int = 0) -> torch.Tensor:
    """-log of the attention mass that the first ``heads`` heads of decoder layer ``layer_idx``
    give, from query positions ``(rows, pos)`` (N,), to the key columns ``cols`` (N, W; -1 =
    none), recomputed from the layer input captured by ``packed_forward``."""
    hs, (cos, sin) = batch["captured"][layer_idx]
    layer = model.model.language_model.layers[layer_idx]
    attn = layer.self_attn
    x = layer.input_layernorm(hs)  # (B, T, D)
    hd = attn.head_dim
    q = attn.q_proj(x[rows, pos])[:, first_head * hd : (first_head + heads) * hd].view(-1, heads, 1, hd)  # (N, h, 1, hd)
    k = attn.k_proj(x).view(x.shape[0], x.shape[1], -1, hd).transpose(1, 2)  # (B, Hkv, T, hd)
    q = apply_rope(q, cos[rows, pos][:, None], sin[rows, pos][:, None])
    k = apply_rope(k, cos, sin)[rows]  # (N, Hkv, T, hd)
    n_rep = attn.q_proj.out_features // attn.k_proj.out_features
    k = k[:, [h // n_rep for h in range(first_head, first_head + heads)]]  # (N, h, T, hd)
    logits = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # (N, h, T)
    allowed = batch["mask"][rows, 0, pos]  # (N, T)
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
    logp = logits.log_softmax(-1)  # (N, h, T)
    idx = cols.clamp_min(0)[:, None].expand(-1, heads, -1)  # (N, h, W)
    picked = logp.gather(2, idx).masked_fill(~(cols >= 0)[:, None], float("-inf"))
    return -torch.logsumexp(picked, dim=-1).mean()


def relay_loss(heads, batch) -> torch.Tensor:
    """Linear probes of what a hop brought to the token that made it (``Packer._add_hops``):
    at each cell name, the input of the layer after the lookup (``relay_layers``)
    decodes its cell's facts (``cell_facts``: the neighbours' colours, the colour and shape
    counts); at a named object's shape word, the input of the layer after ``conj`` decodes
    the found cell's facts; at a colour or shape word, the input of the layer after
    ``content`` decodes how many objects have it. One set of probes per layer.

    A relation asks for one of four neighbour colours, so its answer has to pick by the
    question's direction what the lookup brought (a product, not a sum: colour and shape
    answers are different words and needed no such choice). Left to the answer loss, neither
    part formed: the lookup's values dropped the neighbour facts (a probe decoded 40% of them
    after the lookup, 99% in the visual token itself), relation stayed at 30%, and the
    (cell name, colour left of it) captions at chance. With these probes they form."""
    parts = []
    r = batch["relay"]
    for layer in r[:, 3].unique().tolist():
        sel = r[r[:, 3] == layer]
        h = batch["captured"][layer][0][sel[:, 0], sel[:, 1]]  # (N, D)
        parts.append(heads.fact_loss(h, batch["fact_classes"][sel[:, 0], sel[:, 2]], relay=layer))
    rc = batch["relay_count"]
    for layer in rc[:, 3].unique().tolist():
        sel = rc[rc[:, 3] == layer]
        h = batch["captured"][layer][0][sel[:, 0], sel[:, 1]]
        parts.append(F.cross_entropy(heads.relay[f"count{layer}"](h), sel[:, 2]))
    return torch.stack(parts).sum() if parts else torch.zeros(())


def lookup_supervision(model, batch, layer_idx: int, heads: int, image_start: int, id_to_cell) -> torch.Tensor:
    """The one-hop lookup, supervised: a few heads of decoder layer ``layer_idx`` (default 0,
    which no reduction method in the registry reads) attend, from each caption cell name
    whose attribute is predicted right there, to that cell's visual token.

    Nothing else made this lookup form reliably in the CPU budget: with
    exact word-sum visual tokens it formed in one short run and not in the next five (RoPE at
    these distances takes most of the content match away, and the first layer's attention
    goes to the token itself). With this loss it forms in tens of steps; its weight decays to
    zero (``--lookup-sup-until``), so the final model keeps the lookup because it is useful.
    """
    c, ids = batch["captions"], batch["input_ids"]
    c = c[(c[:, 3] == 2) | (c[:, 3] == 6) | (c[:, 3] == 7)]
    if not len(c):
        return torch.zeros(())
    rows, pos = c[:, 0], c[:, 1]
    cell = id_to_cell.to(ids.device)[ids[rows, pos]]  # (N,) every one-hop target sits at a cell name
    return _head_attention_nll(model, batch, layer_idx, heads, rows, pos, (cell + image_start)[:, None])


def _layer_log_attention(model, batch, layer_idx: int) -> torch.Tensor:
    """(B, H, T, T) log attention of decoder layer ``layer_idx``, recomputed from the layer
    input captured by ``packed_forward`` (one batched product: gathering keys per supervised
    query made a training step 3x slower)."""
    hs, (cos, sin) = batch["captured"][layer_idx]
    layer = model.model.language_model.layers[layer_idx]
    attn = layer.self_attn
    x = layer.input_layernorm(hs)  # (B, T, D)
    B, T, hd = x.shape[0], x.shape[1], attn.head_dim
    q = apply_rope(attn.q_proj(x).view(B, T, -1, hd).transpose(1, 2), cos, sin)  # (B, H, T, hd)
    k = apply_rope(attn.k_proj(x).view(B, T, -1, hd).transpose(1, 2), cos, sin)  # (B, Hkv, T, hd)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, T, hd)
    logits = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, H, T, T)
    return logits.masked_fill(~batch["mask"], torch.finfo(logits.dtype).min).log_softmax(-1)


def route_supervision(model, batch, heads_of_routes, enabled=ROUTES, mass=False) -> dict:
    """Per route of ``Packer.question_routes``: the cross-entropy between the head's attention
    and the uniform distribution over the route's keys (``-mean log p`` of each key), or with
    ``mass`` -log of the attention the keys get together (any split among them; ``<s>`` only
    when it is the only key), over the
    routes present in ``batch``. Needs ``packed_forward(..., capture_layers=...)`` of every
    route's layer."""
    r, keys = batch["routes"], batch["route_keys"]
    out, logatt = {}, {}
    for name in enabled:
        sel = r[:, 0] == ROUTES.index(name)
        if not sel.any():
            continue
        layer, head = heads_of_routes[name]
        if layer not in logatt:
            logatt[layer] = _layer_log_attention(model, batch, layer)
        rows, pos, cols = r[sel, 1], r[sel, 2], keys[sel]
        logp = logatt[layer][rows, head, pos]  # (N, T)
        picked = logp.gather(1, cols.clamp_min(0))
        if mass:  # the sink counts only where nothing else is a key: it would always be the easy way out
            used = (cols >= 0) & ~((cols == SINK) & ((cols > SINK).sum(1, keepdim=True) > 0))
            out[name] = -torch.logsumexp(picked.masked_fill(~used, float("-inf")), dim=1).mean()
        else:
            picked = picked * (cols >= 0)
            out[name] = (-picked.sum(1) / (cols >= 0).sum(1)).mean()
    return out


def cell_name_ids(tokenizer) -> torch.Tensor:
    """(64,) the token id of each cell's name (``c5``), in cell order."""
    ids = tokenizer.convert_tokens_to_ids
    return torch.tensor([ids(task.cell_name(i // task.GRID, i % task.GRID)) for i in range(task.NUM_CELLS)])


def cell_of_token(tokenizer) -> torch.Tensor:
    """(V,) the cell index of each cell-name token id, -1 for other tokens."""
    table = torch.full((len(tokenizer),), -1, dtype=torch.long)
    table[cell_name_ids(tokenizer)] = torch.arange(task.NUM_CELLS)
    return table


def grounding_targets(tokenizer, cell_color, cell_shape):
    """Word ids each visual token should resemble: its cell's name (``c5``), and for an
    occupied cell its colour and shape words (-100 where empty)."""
    ids = tokenizer.convert_tokens_to_ids
    names = cell_name_ids(tokenizer)
    colors = torch.tensor([ids(c) for c in task.COLORS] + [-100])
    shapes = torch.tensor([ids(s) for s in task.SHAPES] + [-100])
    b = cell_color.shape[0]
    return names.expand(b, -1), colors[cell_color], shapes[cell_shape]


def word_sums(model, targets) -> torch.Tensor:
    """(B, 64, D): per cell, the sum of the (detached) word embeddings of ``targets``, the
    (B, 64) word-id tensors of ``grounding_targets`` (-100: no word)."""
    emb = model.get_input_embeddings().weight.detach()  # (V, D)
    return sum(emb[t.clamp_min(0)] * (t >= 0).unsqueeze(-1).to(emb.dtype) for t in targets)


def align_loss(model, image_embeds, targets, extra=None, occupied_weight=0.0):
    """Each visual token regresses onto the sum of the word embeddings of what its cell
    holds: its name (``c5``), and its colour and shape words when occupied (targets from
    ``grounding_targets``; the embeddings are detached, so only the vision side moves).

    The cross-entropy form of the grounding loss only asks the token to *score* highest on
    those words and leaves every other direction free; the projector then filled the tokens
    with components no word has, and the 1-hop lookup "the word c5 finds the token of cell
    c5" never formed (chance after 500 steps), while on tokens that are exactly such sums a
    toy of the same decoder learns it in ~150 steps.

    ``extra`` (B, 64, D), when given, is added to the target: the cell facts' vectors
    (``fact_sums``). ``occupied_weight`` adds that multiple of the mean error over occupied
    cells: with 8-16 objects the 48-56 empty cells (a name only) made most of the mean, and
    the objects' tokens, which carry what the questions ask, were fitted last."""
    target = word_sums(model, targets)
    if extra is not None:
        target = target + extra
    err = (image_embeds - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-6)  # (B, 64)
    loss = err.mean()
    if occupied_weight > 0:
        occupied = (targets[1] >= 0).to(err.dtype)  # a colour word: an object is there
        loss = loss + occupied_weight * (err * occupied).sum() / occupied.sum().clamp_min(1.0)
    return loss


def oracle_mix(progress: float, until: float) -> float:
    """Weight of the teacher-forced visual tokens: 1 for the first 60% of ``until``, then a
    linear fade to 0 at ``until`` (0 disables it)."""
    if until <= 0:
        return 0.0
    hold = 0.6 * until
    return 1.0 if progress <= hold else max(0.0, (until - progress) / (until - hold))


def caption_weights(order: float) -> torch.Tensor:
    """Loss weight per caption-target kind (``CAPTION_KINDS``); ``order`` in [0, 1] scales the
    reading-order targets that need more than one hop (the next cell name, the shape after the
    colour), which are weighted in once the one-hop lookup has formed."""
    return torch.tensor([0.0, 0.25 * order, 1.0, 1.0 * order, 0.25, 0.0, 1.0, 1.0, 1.0])


def losses(model, heads, batch, aux_pairs, aux_color, aux_shape, aux_weight, patch_weight=0.5,
           ground=None, caption_weight=1.0,
           align_weight=0.0, caption_kind_weights=None, lookup=None, lookup_weight=0.0, routes=(), route_weight=0.0,
           route_mass=False):
    look = lookup["layer"] if (lookup is not None and lookup_weight > 0) else None
    routes = tuple(routes) if route_weight > 0 else ()
    layers = ([] if look is None else [look]) + [batch["route_heads"][r][0] for r in routes]
    relay_w = batch.get("relay_weight", 0.0)
    if relay_w > 0:
        layers += torch.cat([batch["relay"][:, 3], batch["relay_count"][:, 3]]).unique().tolist()
    logits_ans, logits_eos, vis, image_embeds = packed_forward(model, batch, layers)
    t = batch["targets"]
    eos = torch.full_like(t[:, 2], model.config.text_config.eos_token_id)
    lm = 0.5 * (F.cross_entropy(logits_ans, t[:, 2]) + F.cross_entropy(logits_eos, eos))
    cls_loss = F.binary_cross_entropy_with_logits(heads.pairs(vis.pooler_output), aux_pairs)
    cells = torch.arange(task.NUM_CELLS)
    patch_loss = (
        F.cross_entropy(heads.color(image_embeds).flatten(0, 1), aux_color.flatten())
        + F.cross_entropy(heads.shape(image_embeds).flatten(0, 1), aux_shape.flatten())
        + F.cross_entropy(heads.row(image_embeds).flatten(0, 1), (cells // task.GRID).repeat(len(aux_color)))
        + F.cross_entropy(heads.col(image_embeds).flatten(0, 1), (cells % task.GRID).repeat(len(aux_color)))
    )
    if "fact_classes" in batch:
        patch_loss = patch_loss + batch.get("fact_weight", 1.0) * heads.fact_loss(image_embeds, batch["fact_classes"])
    tw = torch.zeros(())
    if batch.get("tower_weight", 0.0) > 0:
        tw = tower_supervision(model, vis.hidden_states, *batch["tower_routes"]) + heads.tower_attr_loss(
            vis.hidden_states, aux_color, aux_shape)
        total_tower = batch["tower_weight"] * tw
    else:
        total_tower = 0.0
    total = lm + aux_weight * (cls_loss + patch_weight * patch_loss) + total_tower
    al = torch.zeros(())
    if align_weight > 0:
        al = align_loss(model, image_embeds, ground, batch.get("fact_vectors"), batch.get("align_occupied_weight", 0.0))
        total = total + align_weight * al
    cap = torch.zeros(())
    c = batch.get("captions")
    if c is not None and len(c):
        ce = F.cross_entropy(batch["caption_logits"], c[:, 2], reduction="none")  # (M,)
        kw = caption_weights(1.0) if caption_kind_weights is None else caption_kind_weights
        w = kw[c[:, 3]]
        cap = (ce * w).sum() / w.sum().clamp_min(1e-6)
        total = total + caption_weight * cap
        cap_acc = (batch["caption_logits"].argmax(-1) == c[:, 2])[c[:, 3] == 2].float().mean().item()
    else:
        cap_acc = 0.0
    lk = torch.zeros(())
    if look is not None:
        lk = lookup_supervision(model, batch, look, lookup["heads"], lookup["image_start"], lookup["id_to_cell"])
        total = total + lookup_weight * lk
    rl = torch.zeros(())
    if relay_w > 0:
        rl = relay_loss(heads, batch)
        total = total + relay_w * rl
    route_parts = {}
    if routes:
        route_losses = route_supervision(model, batch, batch["route_heads"], enabled=routes, mass=route_mass)
        total = total + route_weight * sum(route_losses.values())
        route_parts = {name: v.item() for name, v in route_losses.items()}
    correct = (logits_ans.argmax(-1) == t[:, 2]).float()
    parts = {"lm": lm.item(), "cls": cls_loss.item(), "patch": patch_loss.item(), 
             "cap": cap.item(), "cap_color_acc": cap_acc, "align": al.item(), "lookup": lk.item(),
             "tower": tw.item(), "relay": rl.item()}
    parts.update({name: route_parts.get(name, 0.0) for name in ROUTES})
    return total, parts, correct


# ----------------------------------------------------------------------- evaluation


def per_type_accuracy(types, correct, turns=None) -> dict:
    """Accuracy per question type and overall; with ``turns`` spanning more than one turn,
    per turn too (``turn1``, ``turn2``...)."""
    by = defaultdict(list)
    for ty, c in zip(types, correct):
        by[ty].append(float(c))
    acc = {ty: sum(v) / len(v) for ty, v in sorted(by.items())}
    acc["overall"] = sum(float(c) for c in correct) / len(correct)
    if turns is not None and len(set(turns)) > 1:
        by_turn = defaultdict(list)
        for t, c in zip(turns, correct):
            by_turn[t].append(float(c))
        acc.update({f"turn{t}": sum(v) / len(v) for t, v in sorted(by_turn.items())})
    return acc


@torch.no_grad()
def evaluate_packed(model, packer, examples, batch_images=32) -> dict:
    """Teacher-forced accuracy of the answer word (= greedy first word)."""
    model.eval()
    types, turns, correct = [], [], []
    for i in range(0, len(examples), batch_images):
        batch = packer.pack(examples[i : i + batch_images])
        logits_ans, _, _, _ = packed_forward(model, batch)
        correct += (logits_ans.argmax(-1) == batch["targets"][:, 2]).tolist()
        types += batch["types"]
        turns += batch["turns"]
    model.train()
    return per_type_accuracy(types, correct, turns)


@torch.no_grad()
def evaluate_processor(model, processor, examples, batch_size=64, conversations=False) -> dict:
    """Accuracy through the public path: processor + plain ``model(**inputs)``,
    left padding, argmax of the last position (= the first greedy token).

    With ``conversations``, each example's questions are the turns of one conversation: turn
    ``j`` is asked after the earlier turns and their right answers, rendered by the
    processor's chat template."""
    model.eval()
    types, turns, correct = [], [], []
    flat = []  # (scene, question, earlier (question, answer) turns)
    for scene, qs in examples:
        for j, q in enumerate(qs):
            flat.append((scene, q, [(p.question, p.answer) for p in qs[:j]] if conversations else []))
    for i in range(0, len(flat), batch_size):
        chunk = flat[i : i + batch_size]
        texts = [processor.apply_chat_template(task.conversation_messages(h, q.question), add_generation_prompt=True)
                 for _, q, h in chunk]
        inputs = processor(images=[task.render(s) for s, _, _ in chunk], text=texts, return_tensors="pt", padding=True)
        logits = model(**inputs).logits[:, -1]  # (B, V)
        pred = processor.tokenizer.batch_decode(logits.argmax(-1)[:, None])
        correct += [p.strip() == q.answer for p, (_, q, _) in zip(pred, chunk)]
        types += [q.type for _, q, _ in chunk]
        turns += [len(h) + 1 for _, _, h in chunk]
    model.train()
    return per_type_accuracy(types, correct, turns)


def check_consistency(model, processor, packer, example):
    """The training path (fast pixels, packed rows) equals the public path."""
    scene, questions = example
    img = task.render(scene)
    pv_proc = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    assert torch.allclose(pv_proc, pixels([img]), atol=1e-5), "pixel preprocessing differs from the processor"
    enc = processor(images=[img], text=[prompt_text(questions[0].question)], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert ids == packer.prefix + packer.suffix(questions[0].question), "packed ids differ from the processor's"
    # A conversation: the last turn's prompt through the chat template, against the packed row.
    history = [(q.question, q.answer) for q in questions[:-1]]
    text = processor.apply_chat_template(task.conversation_messages(history, questions[-1].question),
                                         add_generation_prompt=True)
    conv = processor(images=[img], text=[text], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        batch = packer.pack([(scene, [questions[0], questions])])
        mine, _, _, _ = packed_forward(model, batch)
        last = batch["targets"][-1]
        packed_ids = [t for t, sg in zip(batch["input_ids"][0].tolist(), batch["mask"][0, 0, last[1]].tolist()) if sg]
        assert packed_ids == conv["input_ids"][0].tolist(), "a packed conversation differs from the chat template's ids"
        for enc_i, got in ((enc, mine[0]), (conv, mine[-1])):
            ref = model(**enc_i).logits[0, -1]
            err = (ref - got).abs().max().item()
            assert err < 1e-3, f"packed forward differs from model(**inputs) by {err}"
    model.train()


# ---------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="pumer_llava/assets/proxy-llava")
    p.add_argument("--steps", type=int, default=3000, help="planned optimizer steps")
    p.add_argument("--max-minutes", type=float, default=55.0, help="training wall-clock budget")
    p.add_argument("--images-per-step", type=int, default=8)
    p.add_argument("--questions-per-image", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--patch-weight", type=float, default=0.5, help="per-patch aux loss, relative to the [CLS] one")
    p.add_argument("--vision-hidden", type=int, default=192)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--text-hidden", type=int, default=256)
    p.add_argument("--text-mlp", type=int, default=512)
    p.add_argument("--text-layers", type=int, default=8)
    p.add_argument("--read-layer", type=int, default=2,
                   help="first decoder layer whose supervised hops read the image (route_heads); the hops "
                        "before it are text to text, so a reduction from that layer on costs accuracy")
    p.add_argument("--turns", type=int, default=4,
                   help="most turns of a training conversation (a step's questions about an image are split "
                        "into conversations of 1 to this many turns)")
    p.add_argument("--conversation-val-images", type=int, default=50)
    p.add_argument("--conversation-test-images", type=int, default=task.CONVERSATION_IMAGES)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--text-kv-heads", type=int, default=4)
    p.add_argument("--pos-init-scale", type=float, default=0.5, help="scale of the 2-D sin-cos position init")
    p.add_argument("--text-init-range", type=float, default=0.02, help="std of the language model's init")
    p.add_argument("--embed-init-std", type=float, default=1.0, help="std of the word embeddings' init")
    p.add_argument("--rope-theta", type=float, default=1e6,
                   help="RoPE base; large, so content similarity survives the ~80 positions from question to image")
    p.add_argument("--align-weight", type=float, default=1.0,
                   help="visual tokens regress onto the sum of their cell's word embeddings (0: off)")
    p.add_argument("--fact-std", type=float, default=0.7,
                   help="scale of the cell-fact vectors added to the alignment target (neighbour colours, "
                        "colour and shape counts; see cell_facts); 0: off")
    p.add_argument("--vision-lr-mult", type=float, default=2.0, help="learning rate of the tower and projector, relative")
    p.add_argument("--tower-images", type=int, default=24,
                   help="extra images per step that only the vision tower's losses see")
    p.add_argument("--relay-weight", type=float, default=1.0,
                   help="weight of the probes of what each supervised hop brought to its token (relay_loss); 0: off")
    p.add_argument("--fact-weight", type=float, default=3.0, help="weight of the cell-fact probes in the patch loss")
    p.add_argument("--align-occupied-weight", type=float, default=4.0,
                   help="extra weight of the occupied cells' mean alignment error (see align_loss)")
    p.add_argument("--tower-sup-weight", type=float, default=1.0,
                   help="weight of the tower's attention supervision (TOWER_HEADS gather the cell facts); 0: off")
    p.add_argument("--captions", type=int, default=3, help="caption segments per image per step")
    p.add_argument("--caption-extra", type=int, default=3,
                   help="caption segments per image per step drawn from CAPTION_POOL (neighbour colours, counts)")
    p.add_argument("--caption-weight", type=float, default=1.0,
                   help="weight of the dense caption loss (one caption segment per image; 0: off)")
    p.add_argument("--oracle-until", type=float, default=0.35,
                   help="training progress until which the language model is fed (fading out from 60%% of it) the "
                        "word-embedding sums the visual tokens are aligned to, instead of the projector's output")
    p.add_argument("--caption-order-from", type=float, default=0.2,
                   help="training progress at which the reading-order caption's two-hop targets start")
    p.add_argument("--caption-order-ramp", type=float, default=0.1, help="...and the progress they take to reach full weight")
    p.add_argument("--lookup-sup-weight", type=float, default=1.0,
                   help="weight of the one-hop lookup supervision (caption cell name -> its visual token)")
    p.add_argument("--lookup-sup-layer", type=int, default=None,
                   help="decoder layer of the lookup-supervised heads (default: --read-layer)")
    p.add_argument("--lookup-sup-heads", type=int, default=1)
    p.add_argument("--routes", nargs="*", default=list(ROUTES), choices=list(ROUTES),
                   help="attention hops supervised in the questions (Packer.question_routes); none: off")
    p.add_argument("--route-sup-weight", type=float, default=1.0)
    p.add_argument("--route-target", choices=["uniform", "mass"], default="mass",
                   help="a route's loss: cross-entropy to uniform attention over its keys, or -log of their total")
    p.add_argument("--route-sup-until", type=float, default=0.6, help="progress at which their weight reaches 0")
    p.add_argument("--lookup-sup-until", type=float, default=0.5, help="progress at which its weight reaches 0")
    p.add_argument("--qtypes", nargs="*", default=list(task.QUESTION_TYPES), help="question types to train on")
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--test-images", type=int, default=task.TEST_IMAGES)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--untrained", action="store_true",
                   help="save the freshly built model, processor and tokenizer without training (for CI's "
                        "end-to-end plumbing checks; its answers are chance)")
    return p.parse_args(argv)


def split_conversations(questions, max_turns: int, rng: random.Random) -> list[list]:
    """``questions`` cut, in order, into conversations of 1 to ``max_turns`` turns."""
    out, i = [], 0
    while i < len(questions):
        n = rng.randint(1, max(1, max_turns))
        out.append(list(questions[i : i + n]))
        i += n
    return out


def lr_factor(progress: float, step: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, args)
    model.train()
    if args.lookup_sup_layer is None:
        args.lookup_sup_layer = args.read_layer
    if not 0 <= args.read_layer <= args.text_layers - 4:
        raise SystemExit(f"--read-layer {args.read_layer}: the hops need it and three layers after it, "
                         f"so it must be 0..{args.text_layers - 4} for {args.text_layers} text layers")
    heads = AuxHeads(args.vision_hidden, args.text_hidden, args.read_layer)
    packer = Packer(tokenizer, args.read_layer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    if args.untrained:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        (out / "training_args.json").write_text(json.dumps({"seed": args.seed, "args": {k: v for k, v in vars(args).items() if k != "out"}, "untrained": True}, indent=2) + "\n")
        print(f"saved an untrained model to {out}", flush=True)
        return {"untrained": True}

    val = task.make_split("val", args.val_images, seed=0, qtypes=tuple(args.qtypes))
    val_conv = [(scene, [qs]) for scene, qs in task.make_conversation_split(
        "conv-val", args.conversation_val_images, seed=0, turns=args.turns, qtypes=tuple(args.qtypes))]
    check_consistency(model, processor, packer, val[0])

    def is_lm(name):
        return "language_model" in name or name.startswith("lm_head")

    def decays(name, p):
        return p.ndim >= 2 and "embed" not in name

    named = list(model.named_parameters())
    lm_params = [p for n, p in named if is_lm(n)]
    vision_params = [p for n, p in named if not is_lm(n)]  # tower and projector
    groups = []
    for lm_side, mult in ((True, 1.0), (False, args.vision_lr_mult)):
        side = [(n, p) for n, p in named if is_lm(n) == lm_side]
        extra = [] if lm_side else list(heads.parameters())
        groups.append({"params": [p for n, p in side if decays(n, p)] + extra, "weight_decay": args.weight_decay,
                       "lr_mult": mult})
        groups.append({"params": [p for n, p in side if not decays(n, p)], "weight_decay": 0.0, "lr_mult": mult})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    lookup = {
        "layer": args.lookup_sup_layer % args.text_layers,
        "heads": args.lookup_sup_heads,
        "image_start": packer.image_start,
        "id_to_cell": cell_of_token(tokenizer),
    }
    facts_table = fact_table(args.text_hidden, args.fact_std, args.seed) if args.fact_std > 0 else None
    qtypes = tuple(args.qtypes)
    stream = task.iter_train_examples(args.seed, qtypes=qtypes)
    rng = random.Random(f"train-questions-{args.seed}")
    budget = args.max_minutes * 60
    t0 = time.time()
    history = []
    step, progress = 0, 0.0
    run_correct, run_loss = [], []
    while progress < 1.0:
        examples = []
        for _ in range(args.images_per_step):
            scene, qs = next(stream)  # one question of every type...
            extra = task.sample_questions(scene, args.questions_per_image - len(qs), rng, qtypes) if (
                args.questions_per_image > len(qs)) else []
            qs = (qs + extra)[: args.questions_per_image]  # ...plus random extra ones
            rng.shuffle(qs)
            examples.append((scene, split_conversations(qs, args.turns, rng)))
        segments = list(range(args.captions)) + rng.sample(CAPTION_POOL, min(args.caption_extra, len(CAPTION_POOL)))
        batch = packer.pack(examples, captions=segments if args.caption_weight > 0 else 0)
        # Images for the tower only (its losses, no language model): the tower's facts need
        # more images than the language model has time for, and a tower pass is cheap.
        extra = [(next(stream)[0], []) for _ in range(args.tower_images)]
        if extra:
            batch["extra_pixels"] = pixels([task.render(scene) for scene, _ in extra])
        seen = examples + extra  # everything the tower sees this step, in its batch order
        pairs, cell_color, cell_shape = aux_targets(seen)
        for g in opt.param_groups:
            g["lr"] = args.lr * g["lr_mult"] * lr_factor(progress, step, args.warmup, args.min_lr_ratio)
        batch["ground"] = ground = grounding_targets(tokenizer, cell_color, cell_shape)
        if facts_table is not None:
            facts = cell_facts(seen)
            batch["fact_vectors"] = fact_sums(facts_table, facts)
            batch["fact_classes"] = fact_classes(facts)
        if args.tower_sup_weight > 0:
            batch["tower_routes"] = tower_routes(seen)
            batch["tower_weight"] = args.tower_sup_weight
        batch["oracle_visual"] = oracle_mix(progress, args.oracle_until)
        batch["fact_weight"] = args.fact_weight
        batch["relay_weight"] = args.relay_weight if facts_table is not None else 0.0
        batch["align_occupied_weight"] = args.align_occupied_weight
        loss, parts, correct = losses(
            model, heads, batch, pairs, cell_color, cell_shape, args.aux_weight, args.patch_weight,
            ground,
            args.caption_weight, args.align_weight,
            caption_weights(min(1.0, max(0.0, (progress - args.caption_order_from) / args.caption_order_ramp))),
            lookup, args.lookup_sup_weight * max(0.0, 1.0 - progress / args.lookup_sup_until) if args.lookup_sup_until > 0 else 0.0,
            args.routes, args.route_sup_weight * max(0.0, 1.0 - progress / args.route_sup_until) if args.route_sup_until > 0 else 0.0,
            args.route_target == "mass",
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Clipped apart: one global norm let the tower's auxiliary gradients scale the language
        # model's updates down, and the lookup did not form.
        torch.nn.utils.clip_grad_norm_(lm_params, 1.0)
        torch.nn.utils.clip_grad_norm_(vision_params + list(heads.parameters()), 1.0)
        opt.step()
        step += 1
        elapsed = time.time() - t0
        progress = max(step / args.steps, elapsed / budget)
        run_correct.append(correct.mean().item())
        run_loss.append(parts)
        if step % 20 == 0:
            n = len(run_loss)
            avg = {k: sum(d[k] for d in run_loss) / n for k in run_loss[0]}
            print(
                f"step {step} {elapsed / 60:5.1f}min lr {opt.param_groups[0]['lr']:.2e} "
                f"lm {avg['lm']:.3f} cls {avg['cls']:.3f} patch {avg['patch']:.3f} "
                f"align {avg['align']:.3f} tower {avg['tower']:.3f} relay {avg['relay']:.3f} lookup {avg['lookup']:.3f} routes {' '.join(f'{r} {avg[r]:.2f}' for r in ROUTES)} cap {avg['cap']:.3f} cap-color {avg['cap_color_acc']:.2f} "
                f"train-acc {sum(run_correct) / len(run_correct):.3f}",
                flush=True,
            )
            run_correct, run_loss = [], []
        if step % args.eval_every == 0 or progress >= 1.0:
            acc = evaluate_packed(model, packer, val)
            conv_acc = evaluate_packed(model, packer, val_conv)
            history.append({"step": step, "minutes": round(elapsed / 60, 2), "val": acc, "val_conversations": conv_acc})
            print(f"  val {json.dumps({k: round(v, 3) for k, v in acc.items()})}", flush=True)
            print(f"  val conversations {json.dumps({k: round(v, 3) for k, v in conv_acc.items() if k.startswith('turn')})}",
                  flush=True)
    train_minutes = (time.time() - t0) / 60

    val_acc = evaluate_processor(model, processor, val)
    print(f"final val (processor path): {val_acc}", flush=True)
    test_acc = conv_acc = None
    if args.test_images > 0:
        test = task.make_split("test", args.test_images, seed=task.TEST_SEED)
        test_acc = evaluate_processor(model, processor, test)
        print(f"test ({sum(len(q) for _, q in test)} questions): {test_acc}", flush=True)
    if args.conversation_test_images > 0:
        conv = task.make_conversation_split(num_images=args.conversation_test_images, turns=args.turns)
        conv_acc = evaluate_processor(model, processor, conv, conversations=True)
        print(f"test conversations ({sum(len(q) for _, q in conv)} questions): {conv_acc}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {
        "seed": args.seed,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "parameters": n_params,
        "steps": step,
        "train_minutes": round(train_minutes, 2),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "final_val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "test_questions": args.test_images * len(task.QUESTION_TYPES),
        "test_conversation_accuracy": conv_acc,
        "test_conversation_questions": args.conversation_test_images * args.turns,
        "history": history,
    }
    (out / "training_args.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved to {out} after {train_minutes:.1f} min of training", flush=True)
    return record


if __name__ == "__main__":
    main()
