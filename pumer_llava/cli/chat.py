"""pumer-chat: chat with a LLaVA model in the terminal, its visual tokens reduced.

    pumer-chat                                     # embedded proxy model, a bundled example image
    pumer-chat --image photo.jpg --ratio 0.25 --method pumer
    pumer-chat --model llava-hf/llava-1.5-7b-hf --image photo.jpg --load-in-4bit --device cuda
    pumer-chat --image photo.jpg --prompt "what is on the table?"            # one shot
    pumer-chat --image photo.jpg --prompt "what is on the table?" --compare  # reduced vs. full

The image is encoded and reduced once, on the first turn of a conversation. Later
turns continue the KV cache of the previous answer: only the new text is prefilled,
attending to the visual tokens the first turn kept. Commands in the chat:
/image PATH, /ratio X, /keep N, /method NAME, /stats, /reset, /help, /quit.

Only the public API is used: apply_pumer, remove_pumer, disabled, model.pumer.last_stats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

EXIT_ERROR = 1
DEFAULT_MAX_NEW_TOKENS = 128
PREFILL_PAIRS = 21  # --compare: interleaved reduced / unreduced prefills behind the speed-up it prints

HELP = """commands:
  /image PATH    load another image and start a new conversation
  /ratio X       keep a fraction X in (0, 1] of the visual tokens (new conversation)
  /keep N        keep N visual tokens instead of a fraction (new conversation)
  /method NAME   reduction method (new conversation); /method alone lists them
  /stats         visual tokens per layer, prefill time, decode speed, peak memory of the last turn
  /show PATH     save the image with the patches the reduction kept, per reducing layer (PNG)
  /reset         forget the conversation, keep the image
  /help          this text
  /quit          leave (also Ctrl-D)
anything else is a question about the image."""


class CliError(Exception):
    """A problem the user can fix: printed as one message, never as a traceback."""


# ----------------------------------------------------------------------------- defaults


def _assets_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets"


def default_model() -> str:
    """The proxy LLaVA shipped in the package (see ``pumer_llava.embedded``)."""
    try:
        from ..embedded import EMBEDDED_MODEL_DIR
    except ImportError:
        EMBEDDED_MODEL_DIR = _assets_dir() / "proxy-llava"
    if not (Path(EMBEDDED_MODEL_DIR) / "config.json").is_file():
        raise CliError(
            f"the embedded model is not in this install ({EMBEDDED_MODEL_DIR}): pass --model FOLDER_OR_HUB_ID"
        )
    return str(EMBEDDED_MODEL_DIR)


def _example_dirs() -> list[Path]:
    dirs = [_assets_dir() / "examples"]
    repo_demo = Path(__file__).resolve().parents[2] / "demo"  # a source checkout
    if repo_demo.is_dir():
        dirs.append(repo_demo)
    return dirs


def default_image() -> str | None:
    """The first bundled example image, or None when the install has none."""
    for d in _example_dirs():
        images = sorted(p for p in d.glob("*.png") if p.is_file())
        if images:
            return str(images[0])
    return None


def example_questions(image_path: str | None) -> list[str]:
    """Questions recorded for a bundled example image (``examples.jsonl`` beside it)."""
    if not image_path:
        return []
    path = Path(image_path)
    index = path.parent / "examples.jsonl"
    if not index.is_file():
        return []
    out = []
    try:
        for line in index.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("image") == path.name and rec.get("question"):
                    out.append(rec["question"])
    except (OSError, ValueError):
        return []
    return out


# ------------------------------------------------------------------------------ loading


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def load_model(name: str, device: str = "auto", dtype: str = "auto", quant: str | None = None):
    """``(model, processor)`` for a supported checkpoint (folder or hub id); CliError if it is not one."""
    from ..loading import load_model as load

    try:
        model, processor, _ = load(name, device=device, dtype=dtype, quant=quant)
    except ValueError as e:
        raise CliError(str(e)) from None
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = processor.tokenizer.pad_token_id or processor.tokenizer.eos_token_id
    return model, processor


def open_image(path: str):
    """An RGB PIL image, fully decoded; CliError saying why when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path.strip().strip("'\"")).expanduser()
    if not p.exists():
        raise CliError(f"no such image file: {p}")
    if p.is_dir():
        raise CliError(f"{p} is a folder, not an image file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB"), str(p)
    except UnidentifiedImageError:
        raise CliError(f"{p} is not an image PIL can read") from None
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read the image {p}: {_first_line(e)}") from None


# ---------------------------------------------------------------------------- measuring


def _make_streamer(tokenizer, out: TextIO | None):
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        """Prints text as it is produced and records when each new token arrived."""

        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.times: list[float] = []

        def put(self, value):
            if not self.next_tokens_are_prompt:  # the first put() is the prompt
                self.times.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if out is not None and text:
                out.write(text)
                out.flush()

    return TimedStreamer()


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device) -> tuple[int | None, str]:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA max allocated, this turn"
    try:
        import resource
    except ImportError:  # not on Unix
        return None, "peak RSS unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak RSS of the process"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _layer_runs(per_layer: list[int]) -> str:
    """[64, 64, 40, 40, 16] -> 'L0-1: 64, L2-3: 40, L4: 16'."""
    runs, start = [], 0
    for i in range(1, len(per_layer) + 1):
        if i == len(per_layer) or per_layer[i] != per_layer[start]:
            name = f"L{start}" if i - 1 == start else f"L{start}-{i - 1}"
            runs.append(f"{name}: {per_layer[start]}")
            start = i
    return ", ".join(runs)


@dataclass
class TurnStats:
    """What one answer cost, and what the conversation's image reduction kept."""

    turn: int  # 1 = the turn that encoded and reduced the image
    reduction: str  # e.g. "pumer, ratio 0.25" or "off"
    prompt_tokens: int  # tokens prefilled by this turn (the new text only, on later turns)
    new_tokens: int
    prefill_s: float
    decode_tps: float | None
    visual_total: int
    visual_kept: int
    per_layer: list[int] = field(default_factory=list)  # visual tokens each decoder layer saw
    reducing_layers: list[int] = field(default_factory=list)
    flops_ratio: float | None = None
    select_s: float | None = None
    peak_bytes: int | None = None
    peak_kind: str = ""
    kv_bytes: int | None = None  # key/value bytes the cache holds after the turn

    def line(self) -> str:
        share = f" ({self.visual_kept / self.visual_total:.0%})" if self.visual_total else ""
        vis = f"visual tokens {self.visual_kept}/{self.visual_total} kept{share}"
        if self.turn > 1:
            vis += " on turn 1, cache reused"
        tps = f"{self.decode_tps:.1f} tok/s" if self.decode_tps is not None else "- tok/s"
        n = self.new_tokens
        return f"[{vis} | prefill {self.prefill_s * 1e3:.0f} ms | {tps} | {n} new token{'s' * (n != 1)}]"

    def report(self) -> str:
        rows = [
            ("reduction", self.reduction),
            ("visual tokens", f"{self.visual_kept} of {self.visual_total} kept "
                              + ("(reduction off)" if self.reduction == "off" else "(image reduced on turn 1)")),
        ]
        if self.per_layer:
            rows.append(("per layer", _layer_runs(self.per_layer)))
        if self.reducing_layers:
            rows.append(("reducing layers", ", ".join(map(str, self.reducing_layers))))
        if self.flops_ratio is not None:
            rows.append(("decoder FLOPs", f"{self.flops_ratio:.2f} of unreduced (turn 1 prefill)"))
        if self.select_s is not None:
            rows.append(("selection", f"{self.select_s * 1e3:.1f} ms (turn 1)"))
        what = "image + prompt" if self.turn == 1 else "new text on the cache"
        rows.append(("prefill", f"{self.prefill_s * 1e3:.1f} ms ({self.prompt_tokens} tokens: {what})"))
        tps = f"{self.decode_tps:.1f} tokens/s" if self.decode_tps is not None else "n/a (one token)"
        rows.append(("decode", f"{tps} ({self.new_tokens} new tokens)"))
        rows.append(("peak memory", f"{_fmt_bytes(self.peak_bytes)} ({self.peak_kind})"))
        width = max(len(k) for k, _ in rows)
        return f"last turn (turn {self.turn} of this conversation)\n" + "\n".join(
            f"  {k.ljust(width)}  {v}" for k, v in rows
        )


# ----------------------------------------------------------------------------- session


def _user_message(text: str, image: bool) -> dict:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def _assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


class ChatSession:
    """One model, one image, one conversation whose KV cache carries over between turns."""

    def __init__(self, model, processor, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_new_tokens = max_new_tokens
        self.image = None
        self.image_path: str | None = None
        self.reduction: dict | None = None  # the apply_pumer arguments in force; None = off
        self.last: TurnStats | None = None
        self.has_template = bool(getattr(processor, "chat_template", None))
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.reset()

    # -- state changes (each starts a new conversation)

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.sequences = None  # (1, n) ids of the conversation so far, last answer included
        self.cache = None  # its KV cache (all but the last token)
        self.ended_with_eos = True
        self.turn = 0
        self.first: TurnStats | None = None  # turn 1: what the image reduction did
        self.kept_stats = None  # turn 1's last_stats when it was reduced (what /show draws)

    def set_image(self, path: str) -> None:
        self.image, self.image_path = open_image(path)
        self.reset()

    def set_reduction(self, *, ratio=None, keep_tokens=None, method=None, layers=None, options=None) -> None:
        """Re-apply the reduction through apply_pumer; ValueError (nothing changed) if it refuses.

        The arguments are text or values, parsed as every tool parses them
        (:func:`pumer_llava.config.parse_reduction`). options: the method's own options as
        strings (``--option KEY=VALUE``); options and layers are kept while the method stays,
        dropped when it changes."""
        from .. import apply_pumer
        from ..config import parse_layers, parse_reduction

        old = self.reduction or {}
        same = method is None or method == old.get("method")
        kept_opts = dict(old.get("options", {})) if same else {}
        kept_layers = old.get("layers") if same else None
        method = method or old.get("method", "pumer")
        if options:
            kept_opts.update(options)
        if layers is not None:
            kept_layers = parse_layers(layers)
        if ratio is None and keep_tokens is None and self.reduction:
            ratio, keep_tokens = self.reduction["ratio"], self.reduction["keep_tokens"]
        cfg = parse_reduction(ratio=ratio, method=method, keep_tokens=keep_tokens, layers=kept_layers, **kept_opts)
        if cfg is None:  # ratio 1: the method applied, removing nothing
            apply_pumer(self.model, ratio=1.0, method=method)
        else:
            apply_pumer(self.model, **cfg.to_dict())
        cfg = self.model.pumer.config
        self.reduction = {"method": cfg.method, "ratio": cfg.ratio, "keep_tokens": cfg.keep_tokens,
                          "layers": kept_layers, "options": kept_opts}
        self.reset()

    def describe_reduction(self) -> str:
        r = self.reduction
        if r is None:
            return "off"
        budget = f"keep {r['keep_tokens']} tokens" if r["keep_tokens"] is not None else f"ratio {r['ratio']:g}"
        return f"{r['method']}, {budget}"

    # -- prompts

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def _first_prompt(self, question: str) -> str:
        if self.has_template:
            return self._render([_user_message(question, image=True)], True)
        return f"USER: {self.image_token}\n{question} ASSISTANT:"

    def _first_inputs(self, question: str):
        """The processor's inputs of a first turn: the image and ``question`` in the chat prompt."""
        inputs = self.processor(images=[self.image], text=[self._first_prompt(question)], return_tensors="pt")
        return inputs.to(self.model.device, dtype=self.model.dtype)

    def _continuation_text(self, question: str) -> str:
        """The text that follows the cached ids: end of the last answer, the new user turn,
        the generation prompt (the chat template's own, rendered as a difference)."""
        eos_text = self.tokenizer.eos_token or ""
        if self.has_template:
            prev = self._render(self.messages, False)
            new = self._render(self.messages + [_user_message(question, image=False)], True)
            probe = self._render([_user_message("x", image=False), _assistant_message("\x00")], False)
            end_marker = probe.split("\x00", 1)[1] if "\x00" in probe else ""
            if new.startswith(prev):
                tail = new[len(prev):]
            else:  # a template that rewrites earlier turns: fall back to the plain format
                tail, end_marker = f" USER: {question} ASSISTANT:", eos_text
        else:
            tail, end_marker = f" USER: {question} ASSISTANT:", eos_text
        # the cache holds the answer as generated: its eos (if any) is already there
        if self.ended_with_eos and eos_text and end_marker.startswith(eos_text):
            end_marker = end_marker[len(eos_text):]
        return end_marker + tail

    def _context_limit(self) -> int | None:
        cfg = self.model.config
        text = getattr(cfg, "text_config", cfg)
        return getattr(text, "max_position_embeddings", None)

    # -- one turn

    def ask(self, question: str, out: TextIO | None = None, *, reduce: bool = True) -> tuple[str, TurnStats]:
        """Answer ``question`` (streamed to ``out``), continuing the conversation's cache."""
        import torch

        from .. import disabled

        if self.image is None:
            raise CliError("no image loaded: /image PATH first")
        model = self.model
        device = model.device
        limit = self._context_limit()
        if self.sequences is not None:
            text = self._continuation_text(question)
            new_ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = torch.cat([self.sequences, new_ids.to(self.sequences.device)], dim=1)
            if limit is not None and ids.shape[1] + self.max_new_tokens > limit:
                if out is not None:
                    out.write(f"(the conversation outgrew the model's {limit}-token context: starting a new one)\n")
                self.reset()
        if self.sequences is None:
            inputs = self._first_inputs(question)
            prompt_tokens = int(inputs["input_ids"].shape[1])
        else:
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "past_key_values": self.cache}
            prompt_tokens = int(new_ids.shape[1])
        streamer = _make_streamer(self.tokenizer, out)
        patched = getattr(model, "pumer", None) is not None
        _reset_peak(device)
        try:
            with torch.no_grad(), (disabled(model) if patched and not reduce else contextlib.nullcontext()):
                t0 = time.perf_counter()
                result = model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    return_dict_in_generate=True,
                    streamer=streamer,
                )
        except KeyboardInterrupt:
            self.reset()  # the cache may hold a half-written step
            raise
        except NotImplementedError as e:  # a reduction that refuses these inputs says why, in one line
            self.reset()
            raise CliError(f"{_first_line(e)} (try another --method, or /method NAME)") from None
        peak, peak_kind = _peak_memory(device)
        n_in = inputs["input_ids"].shape[1]
        new = result.sequences[0, n_in:]
        answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        first_turn = self.sequences is None
        self.turn += 1
        self.messages += [_user_message(question, image=first_turn), _assistant_message(answer)]
        self.sequences, self.cache = result.sequences, result.past_key_values
        self.ended_with_eos = bool(len(new)) and int(new[-1]) in self.eos_ids
        times = streamer.times
        prefill = (times[0] - t0) if times else time.perf_counter() - t0
        tps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
        if first_turn:
            self.first = self._image_stats(inputs["input_ids"], reduce and patched)
        f = self.first
        from ..counting import kv_cache_bytes

        stats = TurnStats(
            kv_bytes=kv_cache_bytes(result.past_key_values)[0],
            turn=self.turn,
            reduction=self.describe_reduction() if (reduce and patched) else "off",
            prompt_tokens=prompt_tokens,
            new_tokens=int(len(new)),
            prefill_s=prefill,
            decode_tps=tps,
            visual_total=f.visual_total,
            visual_kept=f.visual_kept,
            per_layer=f.per_layer,
            reducing_layers=f.reducing_layers,
            flops_ratio=f.flops_ratio,
            select_s=f.select_s,
            peak_bytes=peak,
            peak_kind=peak_kind,
        )
        self.last = stats
        return answer, stats

    def prefill_pairs(self, question: str, pairs: int = 9) -> tuple[float, float]:
        """Median prefill seconds (unreduced, reduced) of ``pairs`` interleaved first-turn
        prefills of ``question`` on the current image, after one warm-up of each."""
        import torch

        from .. import disabled

        model = self.model
        inputs = self._first_inputs(question)
        patched = getattr(model, "pumer", None) is not None

        def once(reduce: bool) -> float:
            with torch.inference_mode(), (disabled(model) if patched and not reduce else contextlib.nullcontext()):
                _sync(model.device)
                t0 = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                _sync(model.device)
                return time.perf_counter() - t0

        once(False), once(True)
        full, red = [], []
        for _ in range(pairs):
            full.append(once(False))
            red.append(once(True))
        return statistics.median(full), statistics.median(red)

    def _image_stats(self, input_ids, reduced: bool) -> TurnStats:
        """What the first turn's forward did to the image (from model.pumer.last_stats)."""
        from ..hooks import get_adapter
        from ..loading import count_visual_tokens

        total = count_visual_tokens(get_adapter(self.model), self.model.config, input_ids[:1])[0]
        s = TurnStats(turn=1, reduction="off", prompt_tokens=0, new_tokens=0, prefill_s=0.0, decode_tps=None,
                      visual_total=total, visual_kept=total)
        last = self.model.pumer.last_stats if reduced else None
        self.kept_stats = last  # what /show draws
        if last is not None:
            s.visual_total = last.visual_tokens_total[0]
            s.visual_kept = last.visual_tokens_final[0]
            s.per_layer = [row[0] for row in last.visual_tokens_per_layer]
            s.reducing_layers = list(last.reducing_layers)
            s.flops_ratio = last.flops_ratio
            s.select_s = last.select_seconds
        return s


# -------------------------------------------------------------------------- front ends


def _parse_ratio(arg: str) -> float:
    try:
        return float(arg)
    except ValueError:
        raise ValueError(f"ratio must be a number in (0, 1] (1.0 = nothing removed), got {arg!r}") from None


def _parse_keep(arg: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise ValueError(f"keep_tokens must be a positive int, got {arg!r}") from None


class Chat:
    """The interactive loop: reads lines, runs commands, answers questions."""

    def __init__(self, session: ChatSession, out: TextIO, echo: bool):
        self.s = session
        self.out = out
        self.echo = echo  # stdin is not a terminal: echo each line, so the transcript reads well

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def banner(self, model_name: str) -> None:
        s = self.s
        layers = getattr(getattr(s.model.config, "text_config", s.model.config), "num_hidden_layers", "?")
        self.say(f"pumer-chat | {model_name} ({type(s.model).__name__}, {layers} decoder layers) on {s.model.device}")
        self.say(f"reduction: {s.describe_reduction()}")
        self.say(f"image: {s.image_path or 'none (use /image PATH)'}")
        self._hint()
        self.say("ask a question about the image, or /help")

    def _hint(self) -> None:
        qs = example_questions(self.s.image_path)
        if qs:
            self.say(f"try: {qs[0]}")

    def run(self, read=input) -> int:
        while True:
            try:
                line = read("you> ")
            except EOFError:
                self.say()
                return 0
            except KeyboardInterrupt:  # at the prompt: leave, saying so (during an answer: stop the answer)
                self.say("\n(Ctrl-C: bye)")
                return 0
            if self.echo:
                self.say(line)
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "quit":
                    return 0
                continue
            self.answer(line)

    def answer(self, question: str) -> None:
        if self.s.image is None:
            self.say("no image loaded: /image PATH first")
            return
        self.out.write("bot> ")
        self.out.flush()
        try:
            _, stats = self.s.ask(question, self.out)
        except CliError as e:
            self.say(f"\n{e}")
            return
        except KeyboardInterrupt:
            self.say("\n(interrupted: new conversation)")
            return
        self.say()
        self.say(stats.line())

    def command(self, line: str) -> str | None:
        from .. import list_methods

        name, _, arg = line[1:].partition(" ")
        name, arg = name.lower(), arg.strip()
        s = self.s
        try:
            if name in ("quit", "exit", "q"):
                return "quit"
            if name == "help":
                self.say(HELP)
            elif name == "reset":
                s.reset()
                self.say("new conversation (same image)")
            elif name == "show":
                if not arg:
                    self.say("usage: /show PATH (a .png to write)")
                    return None
                stats = getattr(s, "kept_stats", None)
                if stats is None or s.image is None:
                    self.say("nothing to show: ask a question with the reduction on first")
                    return None
                from ..draw import draw_kept

                draw_kept(s.image, stats).save(arg)
                self.say(f"kept patches written to {arg} (layers {', '.join(map(str, sorted(stats.kept_patches)))})")
            elif name == "stats":
                self.say(s.last.report() if s.last else "no answer yet: ask a question first")
            elif name == "image":
                if not arg:
                    self.say(f"image: {s.image_path or 'none'}; usage: /image PATH")
                    return None
                s.set_image(arg)
                self.say(f"image: {s.image_path} (new conversation)")
                self._hint()
            elif name == "ratio":
                if not arg:
                    self.say(f"reduction: {s.describe_reduction()}; usage: /ratio X with X in (0, 1]")
                    return None
                s.set_reduction(ratio=_parse_ratio(arg), keep_tokens=None)
                self.say(f"reduction: {s.describe_reduction()} (new conversation)")
            elif name == "keep":
                if not arg:
                    self.say(f"reduction: {s.describe_reduction()}; usage: /keep N (visual tokens kept)")
                    return None
                s.set_reduction(keep_tokens=_parse_keep(arg), ratio=None)
                self.say(f"reduction: {s.describe_reduction()} (new conversation)")
            elif name == "method":
                if not arg:
                    self.say(f"reduction: {s.describe_reduction()}; methods: {', '.join(list_methods())}")
                    return None
                s.set_reduction(method=arg)
                self.say(f"reduction: {s.describe_reduction()} (new conversation)")
            else:
                self.say(f"unknown command /{name}: type /help for the commands")
        except (CliError, ValueError) as e:
            self.say(f"error: {e}")
        return None


def run_once(session: ChatSession, prompt: str, compare: bool, out: TextIO, err: TextIO) -> int:
    """One-shot mode: the answer on ``out`` (streamed), its cost on ``err``; with ``compare``,
    reduced and unreduced answers one after the other, each with its timings, on ``out``."""
    if not compare:
        session.ask(prompt, out)
        out.write("\n")
        out.flush()
        err.write(session.last.line() + "\n")
        return 0
    # warm-up (kernels, allocator, lazy init), so that neither timed run pays for it
    saved = session.max_new_tokens
    session.max_new_tokens = 2
    session.ask(prompt, None, reduce=False)
    session.max_new_tokens = saved
    rows = []
    for label, reduce in ((f"reduced ({session.describe_reduction()})", True), ("full (no reduction)", False)):
        session.reset()
        out.write(f"{label}: ")
        out.flush()
        _, stats = session.ask(prompt, out, reduce=reduce)
        out.write("\n" + "  " + stats.line() + "\n")
        out.flush()
        rows.append(stats)
    red, full = rows
    full_s, red_s = session.prefill_pairs(prompt, PREFILL_PAIRS)
    speedup = full_s / red_s
    parts = [f"prefill speed-up {speedup:.2f}x (median of {PREFILL_PAIRS} interleaved prefills each)"]
    if red.decode_tps and full.decode_tps:
        parts.append(f"decode speed-up {red.decode_tps / full.decode_tps:.2f}x (the run above)")
    saved = []
    if red.flops_ratio is not None:
        saved.append(f"decoder FLOPs {red.flops_ratio:.2f} of full")
    if red.kv_bytes and full.kv_bytes:
        saved.append(f"KV cache {red.kv_bytes / full.kv_bytes:.2f} of full")
    out.write("reduced vs. full: " + ", ".join(parts + saved) + "\n")
    if red.flops_ratio is not None and speedup < 1.0 / red.flops_ratio - 0.25:
        out.write("  (the time saved is less than the FLOPs saved: on this model the prefill is mostly fixed costs, the\n"
                  "   vision tower and per-operation overhead, which removing tokens does not touch)\n")
    out.flush()
    return 0


# ------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from .. import list_methods

    p = argparse.ArgumentParser(
        prog="pumer-chat",
        description="Chat with a LLaVA model in the terminal, its visual tokens pruned and merged by pumer_llava.",
        epilog="In the chat, /help lists the commands.",
    )
    p.add_argument("--model", help="model folder or hub id (default: the proxy LLaVA shipped in the package)")
    p.add_argument("--image", help="image file (default: a bundled example image)")
    p.add_argument("--prompt", help="one-shot: answer this question about the image, print it and exit")
    p.add_argument("--compare", action="store_true", help="one-shot: answer with and without the reduction")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="fraction of the visual tokens kept, in (0, 1] (default 0.25)")
    budget.add_argument("--keep-tokens", type=int, help="number of visual tokens kept, instead of --ratio")
    p.add_argument("--method", default="pumer", help=f"reduction method: {', '.join(list_methods())} (default pumer)")
    p.add_argument("--layers", help="decoder layers that reduce, e.g. 2,8,16 (default: the method's for the model)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="one of the method's own options (e.g. merge_share=0.25 for pumer, dominant=54 for visionzip); "
                   "repeatable")
    p.add_argument("--no-pumer", action="store_true", help="run the model unreduced (/ratio turns it on)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes nf4 weights for the language model")
    quant.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes int8 weights for the language model")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    from ..loading import DTYPE_NAMES

    p.add_argument("--dtype", default="auto", choices=list(DTYPE_NAMES),
                   help="auto: float16 on CUDA, float32 on CPU")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="per answer")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; 1 is often best on a busy machine)")
    return p


def _quiet_transformers() -> None:
    import transformers

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _run(args, out: TextIO, err: TextIO) -> int:
    interactive = args.prompt is None
    if args.compare and interactive:
        raise CliError("--compare needs --prompt (one-shot mode)")
    if args.compare and args.no_pumer:
        raise CliError("--compare answers with and without the reduction: drop --no-pumer")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model_name = args.model or default_model()
    image = args.image or default_image()
    if image is None:
        raise CliError("no example image in this install: pass --image PATH")
    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if not interactive:
        open_image(image)  # fail before the (slow) model load
    from ..config import parse_options, parse_reduction

    if not args.no_pumer:  # the reduction's arguments too: checked without a model
        try:
            parse_reduction(ratio=args.ratio, method=args.method or "pumer", keep_tokens=args.keep_tokens,
                            layers=args.layers, **parse_options(args.option))
        except ValueError as e:
            raise CliError(str(e)) from None
    _quiet_transformers()
    quant = "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None
    err.write(f"loading {model_name} ...\n")
    err.flush()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, processor = load_model(model_name, args.device, args.dtype, quant)
    for w in caught:  # the loader's notes (a processor loaded image-only, ...) as one line each
        if issubclass(w.category, UserWarning):
            err.write(f"note: {w.message}\n")
    session = ChatSession(model, processor, max_new_tokens=args.max_new_tokens)
    if not args.no_pumer:
        try:
            session.set_reduction(ratio=args.ratio, keep_tokens=args.keep_tokens, method=args.method,
                                  layers=args.layers, options=parse_options(args.option))
        except ValueError as e:
            raise CliError(str(e)) from None
    err.write(f"loaded in {time.perf_counter() - t0:.1f} s\n")
    err.flush()
    if not interactive:
        session.set_image(image)  # a bad image ends a one-shot run
        return run_once(session, args.prompt, args.compare, out, err)
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    chat = Chat(session, out, echo=not tty)
    try:
        session.set_image(image)
    except CliError as e:  # the chat goes on: /image PATH
        chat.say(f"error: {e}")
    chat.banner(Path(model_name).name or model_name)
    return chat.run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args, sys.stdout, sys.stderr)
    except CliError as e:
        sys.stderr.write(f"pumer-chat: error: {e}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
