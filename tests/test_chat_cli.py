"""pumer-chat driven as a user drives it: one-shot and interactive runs as subprocesses.

A tiny LLaVA (tests/tiny.py) with a word-level tokenizer, a chat template and a
PIL image processor is saved to a folder once per module; the program loads it
with --model. Answers of the subprocess are checked against the same model run
in-process through the public API.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pumer_llava import apply_pumer
from pumer_llava.cli.chat import ChatSession, load_model, main
from checkpoints import WORDS, chat_template
from tiny import IMAGE_SIZE, IMAGE_TOKEN, PAD, PATCH, VOCAB, tiny_llava

ROOT = Path(__file__).resolve().parents[1]
CMD = [sys.executable, "-m", "pumer_llava.cli.chat", "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
N_VIS = (IMAGE_SIZE // PATCH) ** 2  # 16

# USER: <image>\n{question} ASSISTANT: {answer}</s>, turns joined by a space (the proxy model's format)
TEMPLATE = chat_template("<image>\n")


def _processor():
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]  # ids 0..3 as tests/tiny.py uses them
    words = WORDS + [f"w{i}" for i in range(VOCAB - len(specials) - len(WORDS))]  # every id is a word
    vocab = {w: i for i, w in enumerate(specials + words)}
    assert vocab["<image>"] == IMAGE_TOKEN and vocab["<pad>"] == PAD and len(vocab) == VOCAB
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("?", " ?"), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    images = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=images, tokenizer=fast, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=TEMPLATE,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat")
    model = tiny_llava("llama", layers=4)  # no eos: every answer runs to --max-new-tokens
    model.save_pretrained(path)
    _processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(2):
        arr = (torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(d / f"img{i}.png")
        Image.fromarray(arr).save(paths[-1])
    (d / "broken.png").write_text("not a png")
    return paths + [d / "broken.png"]


def _run(args, stdin=None, timeout=180):
    return subprocess.run(CMD + [str(a) for a in args], input=stdin, capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)


def _reference_answer(tiny_dir, image, question, max_new_tokens, ratio=None):
    """Greedy answer of the same model in-process, through the public API."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    if ratio is not None:
        apply_pumer(model, ratio=ratio)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inp = processor(images=[Image.open(image).convert("RGB")], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_one_shot_prints_the_answer_and_its_cost(tiny_dir, images):
    q = "what color is the object at row 2 column 3 ?"
    r = _run(["--model", tiny_dir, "--image", images[0], "--prompt", q, "--ratio", "0.25", "--max-new-tokens", 4])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == _reference_answer(tiny_dir, images[0], q, 4, ratio=0.25)
    assert len(r.stdout.split()) == 4
    assert f"visual tokens 4/{N_VIS} kept (25%)" in r.stderr
    assert "prefill" in r.stderr and "tok/s" in r.stderr


def test_compare_answers_with_and_without_the_reduction(tiny_dir, images):
    q = "is there a red circle ?"
    r = _run(["--model", tiny_dir, "--image", images[1], "--prompt", q, "--compare", "--max-new-tokens", 3,
              "--method", "fastv", "--keep-tokens", 6])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    red = next(i for i, x in enumerate(lines) if x.startswith("reduced (fastv, keep 6 tokens): "))
    full = next(i for i, x in enumerate(lines) if x.startswith("full (no reduction): "))
    assert f"visual tokens 6/{N_VIS} kept" in lines[red + 1] and "prefill" in lines[red + 1]
    assert f"visual tokens {N_VIS}/{N_VIS} kept" in lines[full + 1]
    assert lines[full].split(": ", 1)[1].strip() == _reference_answer(tiny_dir, images[1], q, 3)
    assert "reduced vs. full: prefill speed-up" in r.stdout and "decoder FLOPs" in r.stdout
    kv = float(r.stdout.split("KV cache ")[1].split(" of full")[0])
    assert 0 < kv < 1  # the reduced layers hold 6 of the visual tokens


def test_interactive_session_goes_on_after_bad_input(tiny_dir, images):
    good, other, broken = images
    script = "\n".join([
        "what color is it ?",
        "is it red ?",
        "/stats",
        "/image /no/such/picture.png",
        f"/image {broken}",
        f"/image {other}",
        "/frobnicate",
        "/ratio 7",
        "/ratio many",
        "/method nope",
        "how many are there ?",
        "/method random",
        "/ratio 0.5",
        "what shape is it ?",
        "/stats",
        "/reset",
        "/help",
        "/quit",
        "never read",
    ]) + "\n"
    r = _run(["--model", tiny_dir, "--image", good, "--max-new-tokens", 3], stdin=script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Traceback" not in r.stderr
    assert "reduction: pumer, ratio 0.25" in out
    answers = [x for x in out.splitlines() if x.startswith("bot> ")]
    assert len(answers) == 4 and all(len(a.split()) == 4 for a in answers)  # "bot>" + 3 words
    lines = [x for x in out.splitlines() if x.startswith("[visual tokens")]
    assert len(lines) == 4
    assert lines[0].startswith(f"[visual tokens 4/{N_VIS} kept (25%) | prefill")
    assert "on turn 1, cache reused" in lines[1]  # second turn continues the cache
    assert lines[2].startswith(f"[visual tokens 4/{N_VIS} kept")  # new image: reduced again
    assert lines[3].startswith(f"[visual tokens 8/{N_VIS} kept (50%)")
    stats = out.split("last turn (turn 2 of this conversation)", 1)[1]
    for key in ("per layer", f"L0: {N_VIS}", ": 4", "prefill", "decode", "tokens/s", "peak memory", "MiB"):
        assert key in stats.split("you>")[0], key
    assert "new text on the cache" in stats.split("you>")[0]
    assert "error: no such image file: /no/such/picture.png" in out
    assert f"error: {broken} is not an image PIL can read" in out
    assert f"image: {other} (new conversation)" in out
    assert "unknown command /frobnicate" in out
    assert "error: ratio must be in (0, 1]" in out and "got 7.0" in out
    assert "error: ratio must be a number" in out
    assert "error: unknown method 'nope'; known methods:" in out and "pumer" in out
    assert "reduction: random, ratio 0.5 (new conversation)" in out
    assert "last turn (turn 1 of this conversation)" in out and "image + prompt" in out
    assert "/image PATH" in out  # /help
    assert "never read" not in out.split("you> /quit", 1)[1]


def test_a_folder_that_is_not_llava_exits_with_the_reason(tiny_dir, images, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "llama")
    r = _run(["--model", tmp_path / "llama", "--image", images[0], "--prompt", "hi"], timeout=120)
    assert r.returncode != 0
    assert "model_type 'llama' is not a supported vision-language model; supported: LlavaForConditionalGeneration" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def in_process(monkeypatch):
    """main() called in this process: restore the transformers logging it quiets."""
    import transformers

    level = transformers.logging.get_verbosity()
    yield monkeypatch
    transformers.logging.set_verbosity(level)
    transformers.utils.logging.enable_progress_bar()


def test_a_bad_start_image_leaves_the_chat_running(tiny_dir, images, in_process, capsys):
    import io

    in_process.setattr(sys, "stdin", io.StringIO(f"hello\n/image {images[1]}\nwhat color is it ?\n"))
    assert main(["--model", str(tiny_dir), "--image", "/no/such/start.png", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "error: no such image file: /no/such/start.png" in out
    assert "image: none (use /image PATH)" in out
    assert "no image loaded: /image PATH first" in out
    assert f"[visual tokens 4/{N_VIS} kept (25%)" in out  # after /image, questions are answered


def test_other_fatal_errors_are_one_line(tiny_dir, images, tmp_path, in_process, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path / "empty"), "--image", str(images[0]), "--prompt", "hi"]) == 1
    assert "has no config.json" in capsys.readouterr().err
    # one-shot: a bad image ends the run before the model loads
    assert main(["--model", str(tiny_dir), "--image", str(images[2]), "--prompt", "hi"]) == 1
    assert "not an image PIL can read" in capsys.readouterr().err
    assert main(["--model", str(tiny_dir), "--image", str(images[0]), "--compare"]) == 1
    assert "--compare needs --prompt" in capsys.readouterr().err
    assert main(["--model", str(tiny_dir), "--image", str(images[0]), "--prompt", "hi", "--ratio", "2"]) == 1
    assert "ratio must be in (0, 1]" in capsys.readouterr().err
    # the reduction's arguments are checked before the (slow) model load: no model is read here
    assert main(["--model", str(tmp_path / "empty"), "--image", str(images[0]), "--prompt", "hi", "--method", "nope"]) == 1
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "loading" not in err
    for extra, message in ((["--layers", "2,x"], "layers must be 0-based decoder layer indices"),
                           (["--layers", "3,1"], "layers must be strictly increasing"),
                           (["--option", "merge_text=0.9"], r"merge_text must be in [0, 0.5]")):
        assert main(["--model", str(tmp_path / "empty"), "--image", str(images[0]), "--prompt", "hi", *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and "loading" not in err, err


def test_layers_and_options_reach_the_model_as_the_api_takes_them(tiny_dir, images, in_process, capsys):
    """--layers and --option are parsed as the plugin parses --model_args: the session's model
    is set up exactly as apply_pumer with the same arguments sets it up."""
    from pumer_llava.cli import chat

    seen = []
    real = chat.ChatSession.set_reduction

    def spy(self, **kw):
        real(self, **kw)
        seen.append(self.model.pumer.to_dict())

    chat.ChatSession.set_reduction = spy
    try:
        code = main(["--model", str(tiny_dir), "--image", str(images[0]), "--prompt", "hi", "--max-new-tokens", "2",
                     "--layers", "1,3", "--option", "merge_threshold=none", "--option", "merge_text=0.25"])
    finally:
        chat.ChatSession.set_reduction = real
    assert code == 0, capsys.readouterr().err
    (got,) = seen
    assert got["layers"] == [1, 3] and got["merge_threshold"] is None and got["merge_text"] == 0.25


# PuMer merging by key similarity alone: its choice reads no text, so the longer prompt of a
# fresh run over the conversation keeps the same tokens as turn 1 did
BLIND = {"merge_share": "1.0", "merge_rule": "bipartite", "merge_threshold": "none"}


def _assert_continued_turn_is_fresh(model, processor, images, blind):
    s = ChatSession(model, processor, max_new_tokens=3)
    if blind:
        s.set_reduction(method="pumer", ratio=0.25, options=BLIND)
    s.set_image(str(images[0]))
    s.ask("what color is it ?")
    kept = model.pumer.last_stats.kept_patches if blind else None
    s.ask("is it red ?")
    # the ids the cache was built from are the chat template's rendering of the conversation
    text = processor.apply_chat_template(s.messages)
    inp = processor(images=[s.image], text=[text], return_tensors="pt")
    assert torch.equal(s.sequences, inp["input_ids"][:, :-1])  # the last answer has no </s> yet (no eos here)
    # turn 2 on turn 1's cache answers as a fresh run over the whole conversation would
    n2 = s.sequences.shape[1] - 3
    cut = {k: v[:, :n2] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in inp.items()}
    with torch.no_grad():
        fresh = model.generate(**cut, max_new_tokens=3, do_sample=False)
    if blind:
        assert kept and model.pumer.last_stats.kept_patches == kept  # the premise: the same tokens kept
    assert torch.equal(fresh, s.sequences)


@pytest.mark.parametrize("blind", [False, True])
def test_continued_turns_equal_recomputing_the_conversation(tiny_dir, images, blind):
    model, processor = load_model(str(tiny_dir), "cpu", "float32")
    _assert_continued_turn_is_fresh(model, processor, images, blind)


def test_continuation_closes_an_answer_cut_short(tiny_dir):
    model, processor = load_model(str(tiny_dir), "cpu", "float32")
    s = ChatSession(model, processor)
    s.messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    s.ended_with_eos = True  # the cache already holds </s>
    assert s._continuation_text("is it red ?") == " USER: is it red ? ASSISTANT:"
    s.ended_with_eos = False  # cut by max_new_tokens: close the answer as the template does
    assert s._continuation_text("is it red ?") == "</s> USER: is it red ? ASSISTANT:"


# ------------------------------------------------------------------- the shipped model


def _embedded_ready():
    try:
        from pumer_llava.embedded import EMBEDDED_MODEL_DIR
    except ImportError:
        return False
    return (EMBEDDED_MODEL_DIR / "model.safetensors").exists() and (ROOT / "demo" / "examples.jsonl").exists()


@pytest.mark.skipif(not _embedded_ready(), reason="embedded checkpoint not shipped yet")
def test_embedded_model_answers_an_example_with_and_without_reduction():
    examples = [json.loads(x) for x in (ROOT / "demo" / "examples.jsonl").read_text().splitlines() if x.strip()]
    ex = examples[0]
    r = _run(["--image", ROOT / "demo" / ex["image"], "--prompt", ex["question"], "--compare", "--ratio", "0.25",
              "--max-new-tokens", 4])
    assert r.returncode == 0, r.stderr
    answers = {x.split(": ", 1)[0]: x.split(": ", 1)[1].split() for x in r.stdout.splitlines()
               if x.startswith(("reduced (", "full ("))}
    assert answers["reduced (pumer, ratio 0.25)"][:1] == [ex["answer"]], r.stdout
    assert answers["full (no reduction)"][:1] == [ex["answer"]], r.stdout
    assert "visual tokens 16/64 kept" in r.stdout


def test_vispruner_chat_holds_a_conversation(tiny_dir, images):
    """VisPruner reduces before the language model; later turns continue its reduced cache."""
    good, _, _ = images
    script = "what color is it ?\nis it red ?\nhow many are there ?\n/quit\n"
    r = _run(["--model", tiny_dir, "--image", good, "--method", "vispruner", "--max-new-tokens", 3], stdin=script)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    answers = [x for x in r.stdout.splitlines() if x.startswith("bot> ")]
    assert len(answers) == 3 and all(len(a.split()) == 4 for a in answers)
    lines = [x for x in r.stdout.splitlines() if x.startswith("[visual tokens")]
    assert lines[0].startswith(f"[visual tokens 4/{N_VIS} kept (25%)")
    assert all("on turn 1, cache reused" in x for x in lines[1:]) and len(lines) == 3


def test_ctrl_c_at_the_prompt_says_bye_and_stats_tell_the_reduction_state(tiny_dir, images):
    import io

    from pumer_llava.cli.chat import Chat, ChatSession, load_model

    model, processor = load_model(str(tiny_dir))
    s = ChatSession(model, processor, max_new_tokens=2)
    s.set_image(str(images[0]))
    _, stats = s.ask("what color is it ?", None)  # no reduction applied: the model runs as loaded
    assert "(reduction off)" in stats.report() and "image reduced" not in stats.report()
    s.set_reduction(ratio=0.25)
    _, stats = s.ask("what color is it ?", None)
    assert "(image reduced on turn 1)" in stats.report()
    out = io.StringIO()

    def read(prompt):
        raise KeyboardInterrupt

    assert Chat(s, out, echo=False).run(read) == 0
    assert "(Ctrl-C: bye)" in out.getvalue()


def test_show_draws_the_kept_patches(tiny_dir, images, tmp_path):
    import io

    from PIL import Image

    from pumer_llava import draw_kept
    from pumer_llava.cli.chat import Chat, ChatSession, load_model

    model, processor = load_model(str(tiny_dir))
    s = ChatSession(model, processor, max_new_tokens=2)
    s.set_image(str(images[0]))
    out = io.StringIO()
    chat = Chat(s, out, echo=False)
    chat.command("/show " + str(tmp_path / "none.png"))
    assert "nothing to show" in out.getvalue()
    s.set_reduction(ratio=0.25)
    s.ask("what color is it ?", None)
    chat.command("/show " + str(tmp_path / "kept.png"))
    stats = s.kept_stats
    layers = sorted(stats.kept_patches)
    assert f"kept patches written to {tmp_path / 'kept.png'}" in out.getvalue()
    drawn = Image.open(tmp_path / "kept.png")
    side = int(stats.visual_tokens_total[0] ** 0.5)
    assert side * side == stats.visual_tokens_total[0]
    from pumer_llava.draw import GAP, LABEL

    size = drawn.size[1] - LABEL
    assert size % side == 0 and drawn.size[0] == len(layers) * size + GAP * (len(layers) - 1)
    # on a white image: exactly the kept patches stay white, the others are dimmed to a quarter
    white = Image.new("RGB", (64, 48), (255, 255, 255))
    one = draw_kept(white, stats, layer=layers[-1])
    cell = one.size[0] // side
    lit = {r * side + c for r in range(side) for c in range(side)
           if one.crop((c * cell, LABEL + r * cell, (c + 1) * cell, LABEL + (r + 1) * cell)).convert("L").getextrema()
           == (255, 255)}
    assert lit == set(stats.kept_patches[layers[-1]][0]) and len(lit) < side * side
    with pytest.raises(ValueError, match="layer 99 did not reduce"):
        draw_kept(Image.open(images[0]), stats, layer=99)


# ----------------------------------------------------------------------------- another adapter row


def _next_processor():
    """The same tokenizer and template with LLaVA-NeXT's anyres image processor (PIL backend)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    base = _processor()
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                 [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
    images = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints, size={"shortest_edge": IMAGE_SIZE},
                                        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaNextProcessor(image_processor=images, tokenizer=base.tokenizer, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from tiny import tiny_llava_next

    path = tmp_path_factory.mktemp("tiny-next-chat")
    tiny_llava_next("llama").save_pretrained(path)
    _next_processor().save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["pumer", "vispruner", "dart"])
def test_one_shot_on_llava_next_answers_as_the_api_does(next_dir, images, method):
    """pumer-chat on an anyres checkpoint (base view + crops + newline tokens): the answer is the
    one the public API gives the same model, reduced the same way, and the budget is exact."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    q = "what color is the object at row 2 column 3 ?"
    r = _run(["--model", next_dir, "--image", images[0], "--prompt", q, "--ratio", "0.25", "--method", method,
              "--max-new-tokens", 4])
    assert r.returncode == 0, r.stderr
    model = AutoModelForImageTextToText.from_pretrained(next_dir).eval()
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(next_dir)
    apply_pumer(model, ratio=0.25, method=method)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    inp = processor(images=[Image.open(images[0]).convert("RGB")],
                    text=[processor.apply_chat_template(msgs, add_generation_prompt=True)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=4, do_sample=False)
    total = model.pumer.last_stats.visual_tokens_total[0]
    want = processor.tokenizer.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert r.stdout.strip() == want
    assert total > N_VIS and f"visual tokens {round(total * 0.25)}/{total} kept" in r.stderr


def test_a_reduction_that_refuses_the_inputs_is_one_line_and_the_chat_goes_on(tiny_dir, images):
    """A method raising NotImplementedError at the forward (VisPruner on interpolated video tokens,
    say) surfaces as the chat's one-line error; the next answer works."""
    from pumer_llava import Method, register_method
    from pumer_llava.cli.chat import CliError
    from pumer_llava.methods import METHODS

    def refuse(ctx):
        raise NotImplementedError("refuses: these visual tokens are not what it reads\nmore detail")

    register_method(Method(name="refuses", score=refuse, default_layers=lambda depth: (1,)))
    try:
        model, processor = load_model(str(tiny_dir), "cpu", "auto", None)
        session = ChatSession(model, processor, max_new_tokens=2)
        session.set_image(str(images[0]))
        session.set_reduction(method="refuses", ratio=0.25)
        with pytest.raises(CliError, match=r"^refuses: these visual tokens are not what it reads \(try another"):
            session.ask("what color is it ?")
        session.set_reduction(method="pumer")
        answer, stats = session.ask("what color is it ?")
        assert stats.visual_kept == 4 and answer
    finally:
        METHODS.pop("refuses", None)


# ------------------------------------------------------------------- the rows with a video processor


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def row_dir(request, tmp_path_factory):
    from checkpoints import write_checkpoint

    return request.param, write_checkpoint(request.param, tmp_path_factory.mktemp(f"chat-{request.param}"))


def _api_inputs(processor, image, messages):
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[Image.open(image).convert("RGB")], text=[text], return_tensors="pt")


def test_one_shot_on_every_other_row_answers_as_the_api_does(row_dir, images):
    """pumer-chat on OneVision, Qwen2-VL and Qwen2.5-VL checkpoints (their processors loaded
    image-only where torchvision is missing): the answer is the public API's, the budget exact."""
    from transformers import AutoModelForImageTextToText

    from pumer_llava.loading import adapter_for, load_processor, read_config

    row, path = row_dir
    q = "what color is the object at row 2 column 3 ?"
    r = _run(["--model", path, "--image", images[0], "--prompt", q, "--ratio", "0.25", "--max-new-tokens", 4])
    assert r.returncode == 0, r.stderr
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path, adapter_for(read_config(path)[0]))
    apply_pumer(model, ratio=0.25)
    inp = _api_inputs(processor, images[0], [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}])
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=4, do_sample=False)
    total = model.pumer.last_stats.visual_tokens_total[0]
    assert r.stdout.strip() == processor.tokenizer.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert f"visual tokens {round(total * 0.25)}/{total} kept" in r.stderr
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():  # the loader's warning, as one line
        assert "note: torchvision is not installed: " in r.stderr and "UserWarning" not in r.stderr


@pytest.mark.parametrize("blind", [False, True])
def test_continued_turns_on_every_other_row_equal_recomputing(row_dir, images, blind):
    """Turn 2 on turn 1's (reduced) cache answers as one fresh generate over the whole
    conversation: Qwen's M-RoPE positions after the image carry over to the next turn."""
    row, path = row_dir
    model, processor = load_model(path, "cpu", "float32")
    _assert_continued_turn_is_fresh(model, processor, images, blind)
