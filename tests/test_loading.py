"""One loader for every tool: every adapter row from a folder, clear errors before any weight."""

from __future__ import annotations

import pytest
import torch

from pumer_llava.hooks.adapters import ADAPTERS
from pumer_llava.loading import count_visual_tokens, load_model, quantization_config, resolve_dtype
from test_architectures import BUILDERS


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_every_adapter_row_loads_from_a_folder(arch, tmp_path):
    model, inp, counts = BUILDERS[arch]()
    model.save_pretrained(tmp_path)
    loaded, proc, adapter = load_model(str(tmp_path), device="cpu", dtype="fp32", processor=False)
    assert proc is None and type(loaded).__name__ == adapter.class_name == type(model).__name__
    assert adapter is ADAPTERS[model.config.model_type] and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inp).logits, model(**inp).logits)
    # image and video placeholders both count, as the runtime counts them
    assert count_visual_tokens(adapter, loaded.config, inp["input_ids"]) == [
        int(n) for n in torch.isin(inp["input_ids"], torch.tensor(adapter.visual_token_ids(loaded.config))).sum(-1)]
    assert sum(count_visual_tokens(adapter, loaded.config, inp["input_ids"])) == sum(counts)


def test_problems_are_named_before_any_weight_is_read(tmp_path):
    with pytest.raises(ValueError, match="it has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="no such model folder"):
        load_model(str(tmp_path / "nope"))
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama' is not a supported vision-language model; supported: "
                                         "LlavaForConditionalGeneration"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="dtype 'half' is not one of auto, float32"):
        resolve_dtype("half", torch.device("cpu"))
    assert resolve_dtype("bf16", torch.device("cpu")) == resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="quantization '3bit'"):
        quantization_config(ADAPTERS["llava"], "3bit", torch.float16)


def test_quantization_keeps_each_rows_vision_side_in_full_precision():
    pytest.importorskip("bitsandbytes")
    llava = quantization_config(ADAPTERS["llava"], "4bit", torch.float16)
    qwen = quantization_config(ADAPTERS["qwen2_vl"], "8bit", torch.float16)
    assert llava.llm_int8_skip_modules == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    assert llava.load_in_4bit and llava.bnb_4bit_quant_type == "nf4"
    assert qwen.llm_int8_skip_modules == ["model.visual", "lm_head"] and qwen.load_in_8bit


@pytest.mark.parametrize("row", ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_processors_load_for_every_row_and_image_only_without_torchvision(row, tmp_path, monkeypatch):
    """A row whose processor has a video half loads it image-only (a warning says so) where
    torchvision is missing; the processor then encodes images exactly as the class built in
    memory does. The other rows load through AutoProcessor untouched."""
    from PIL import Image
    from transformers.utils import is_torchvision_available

    import pumer_llava.loading as loading
    from checkpoints import processor, write_checkpoint

    path = write_checkpoint(row, tmp_path)
    adapter = loading.adapter_for(loading.read_config(path)[0])
    video = row != "llava"
    if video and not is_torchvision_available():
        with pytest.warns(UserWarning, match=f"torchvision is not installed: {adapter.processor_class} is loaded "
                                             "without its video processor"):
            proc = loading.load_processor(path, adapter)
        assert not hasattr(proc, "video_processor")
    else:
        proc = loading.load_processor(path, adapter)
    assert type(proc).__name__ == adapter.processor_class
    image, text = Image.new("RGB", (48, 32), (9, 80, 200)), "w1 " + proc.image_token + " w2"
    got, want = proc(images=[image], text=[text], return_tensors="pt"), processor(row)(images=[image], text=[text],
                                                                                     return_tensors="pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    if video and not is_torchvision_available():  # without the fallback, transformers cannot load it at all
        monkeypatch.setattr("transformers.utils.is_torchvision_available", lambda: True)
        with pytest.raises(ValueError, match=f"cannot load the processor of {path}"):
            loading.load_processor(path, adapter)
