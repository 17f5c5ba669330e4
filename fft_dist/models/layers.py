"""Where each parameter sits in the stack: embeddings, decoder layer l of L, or the head.

Found from the parameter names under the model's repeated blocks (the largest ``nn.ModuleList``, e.g.
``model.layers.<l>.`` in Llama, ``transformer.h.<l>.`` in GPT-2), so a new family needs no entry here;
a model without such a list has no layer index and is refused where one is needed.
"""
from __future__ import annotations

from torch import nn

from fft_dist.errors import ConfigError


def _blocks_prefix(model: nn.Module) -> tuple[str, int]:
    """The dotted name of the largest ModuleList (the decoder layers) and its length."""
    best, size = "", 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > size:
            best, size = name, len(module)
    return best, size


def layer_depths(model: nn.Module) -> tuple[int, dict[str, int]]:
    """(L, {trainable parameter name: depth}): depth 0 for the input embeddings (and anything before the
    first layer), l + 1 for decoder layer l, L + 1 for the head and anything after the last layer
    (the final norm). A head tied to the input embeddings is one parameter, so it takes depth 0."""
    prefix, n_layers = _blocks_prefix(model)
    if not n_layers:
        raise ConfigError(f"optimizer.layer_lr_decay: {type(model).__name__} has no decoder-layer list "
                          "(nn.ModuleList) to index its parameters by; use optimizer.layer_lr_decay=1.0")
    embedding_ids: set[int] = set()
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is not None:
        embedding_ids = {id(p) for p in embeddings.parameters()}
    start = prefix + "." if prefix else ""
    depths: dict[str, int] = {}
    seen_layers = False
    for name, p in model.named_parameters():
        if id(p) in embedding_ids:
            depths[name] = 0
        elif name.startswith(start) and name[len(start):].split(".", 1)[0].isdigit():
            depths[name] = int(name[len(start):].split(".", 1)[0]) + 1
            seen_layers = True
        else:
            depths[name] = n_layers + 1 if seen_layers else 0
    return n_layers, depths
