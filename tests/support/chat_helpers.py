"""The real chat templates of tests/fixtures/chat_templates/ and a tiny tokenizer for each family: the bundled
BPE plus the special tokens the family's template writes, with its bos/eos (no download)."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from fft_dist.data.encode import IGNORE_INDEX
from fft_dist.model import BUNDLED_TOKENIZER

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
FAMILY = {  # template -> (bos, eos, the special tokens it writes), as the model's own tokenizer has them
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                                                     "<|python_tag|>"]),
    "qwen": (None, "<|im_end|>", ["<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "mistral": ("<s>", "</s>", ["[INST]", "[/INST]"]),
    "gemma": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}
FAMILY_OF = {"llama3.1": "llama3.1", "llama3.2": "llama3.1", "qwen2.5": "qwen", "qwen3": "qwen", "mistral": "mistral",
             "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3"}
END_OF_TURN = {"llama3.1": "<|eot_id|>", "llama3.2": "<|eot_id|>", "qwen2.5": "<|im_end|>\n", "qwen3": "<|im_end|>\n",
               "mistral": "</s> ", "gemma2": "<end_of_turn>\n", "gemma3": "<end_of_turn>\n", "phi3": "<|end|>\n"}

_TOKENIZERS: dict = {}


def tokenizer(name: str):
    family = FAMILY_OF[name]
    if family not in _TOKENIZERS:
        bos, eos, specials = FAMILY[family]
        tok = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)
        tok.add_tokens([t for t in (bos, eos, *specials) if t and t not in tok.get_vocab()], special_tokens=True)
        tok.bos_token, tok.eos_token = bos, eos
        _TOKENIZERS[family] = tok
    return _TOKENIZERS[family]


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def loss_runs(tok, ids, labels) -> list[str]:
    runs, current = [], []
    for t, label in zip(ids[1:], labels[1:]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(t)
    return [tok.decode(r) for r in runs + ([current] if current else [])]


