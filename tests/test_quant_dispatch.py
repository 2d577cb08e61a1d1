"""Loading paths users take: bitsandbytes 4-bit weights and accelerate's device_map."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from pumer_llava import apply_pumer, remove_pumer
from tiny import TEXT_BLIND, make_inputs, tiny_llava

GEN = dict(do_sample=False, max_new_tokens=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    tiny_llava("llama").save_pretrained(path)
    return path


def _check_reduces_and_generates(model):
    inp = make_inputs((3, 6), (5, 2))
    with torch.no_grad():
        ref = model.generate(**inp, **GEN)
        apply_pumer(model, ratio=1.0)
        assert torch.equal(model.generate(**inp, **GEN), ref)
        apply_pumer(model, ratio=0.25, **TEXT_BLIND)
        out = model.generate(**inp, **GEN, return_dict_in_generate=True)
        assert model.pumer.last_stats.visual_tokens_final == [4, 4]
        again = model.generate(**inp, **GEN, use_cache=False)
        assert torch.equal(out.sequences, again)
        remove_pumer(model)
        assert torch.equal(model.generate(**inp, **GEN), ref)


def test_bitsandbytes_4bit(saved):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        # bitsandbytes' CPU nf4 needs >= 64 input features: keep the tiny tower in full precision
        llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    )
    model = LlavaForConditionalGeneration.from_pretrained(saved, quantization_config=q, device_map="cpu")
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    _check_reduces_and_generates(model.eval())


def _device_map(n_layers, layer_device="cpu"):
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "lm_head": "cpu",
                  "model.language_model.embed_tokens": "cpu", "model.language_model.norm": "cpu",
                  "model.language_model.rotary_emb": "cpu"}
    device_map.update({f"model.language_model.layers.{i}": layer_device for i in range(n_layers)})
    return device_map


def test_accelerate_device_map(saved):
    accelerate = pytest.importorskip("accelerate")
    model = LlavaForConditionalGeneration.from_pretrained(saved).eval()
    # one device only here, so force accelerate's hooks: they wrap forward, our pre-hooks run before them
    accelerate.dispatch_model(model, device_map=_device_map(6), main_device="cpu", force_hooks=True)
    assert hasattr(model.model.language_model.layers[0], "_hf_hook")
    _check_reduces_and_generates(model)


def test_offloaded_reducing_layer_fails_clearly(saved, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = LlavaForConditionalGeneration.from_pretrained(saved).eval()
    accelerate.dispatch_model(model, device_map=_device_map(6, "disk"), main_device="cpu", offload_dir=str(tmp_path))
    apply_pumer(model, ratio=0.25)
    with pytest.raises(RuntimeError, match="offloaded"):
        with torch.no_grad():
            model(**make_inputs())
