import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def small_proxy():
    """An untrained proxy LLaVA of the shipped architecture, scaled down (no checkpoint), and
    its processor: ``(model, processor)``."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "eval"))
    import train_proxy

    args = train_proxy.parse_args(
        ["--vision-hidden", "64", "--vision-layers", "2", "--vision-heads", "2", "--text-hidden", "64",
         "--text-mlp", "128", "--text-layers", "4", "--text-heads", "4", "--text-kv-heads", "2"]
    )
    tok = train_proxy.build_tokenizer()
    return train_proxy.build_model(tok, args).eval(), train_proxy.build_processor(tok)
