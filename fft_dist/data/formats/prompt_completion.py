"""data.format=prompt_completion: BOS (data.add_bos) and the prompt are context; the loss falls on the completion
and its EOS (data.add_eos)."""
from __future__ import annotations

from fft_dist.data.formats.registry import Format, register_format


def encode(enc, batch: dict, indices: list[int], out: dict) -> None:
    prompts = enc.tokenize(batch[enc.cfg.prompt_key])
    completions = enc.tokenize(batch[enc.cfg.completion_key])
    enc.emit_plain(out, list(zip(prompts, completions)), windows=False)


PROMPT_COMPLETION = register_format(Format("prompt_completion", encode,
                                           columns={"prompt_key": str, "completion_key": str},
                                           options=("add_bos", "add_eos")))
