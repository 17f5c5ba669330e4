"""Helpers and fixtures moved unchanged from tests/test_model_checks.py when the tests were split into unit/ and
e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_model_checks.py,
unit/test_model_checks.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig


SMALL = dict(vocab_size=2048, num_hidden_layers=1)


# -- item 15: trust_remote_code -------------------------------------------------------------------------
CUSTOM_CODE = """from pathlib import Path
Path({marker!r}).write_text("the model folder's code ran")
from transformers import LlamaConfig


class XConfig(LlamaConfig):
    model_type = "fft_x_custom"
"""


def custom_code_folder(folder: Path, marker: Path, *, model_type: str = "fft_x_custom") -> Path:
    """A real transformers config (save_pretrained) plus an auto_map to a module that leaves `marker`."""
    LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                **SMALL).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_x.XConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_x.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    return folder


# -- item 17: backend, attention kernel, W&B ------------------------------------------------------------
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA does")
