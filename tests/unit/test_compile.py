"""train.compile=true: every decoder layer's forward goes through torch.compile where it works
(none, fsdp, zero2), and is refused before launch where it does not (zero3).

The parity test runs real 2-rank jobs (gloo) on the tiny model; inductor's CPU compile takes tens
of seconds, hence slow.
"""
from __future__ import annotations

from fft_dist.compose import compose, to_typed


def test_compile_layers_compiles_every_decoder_layer_in_place():
    from fft_dist.model import build_model, compile_layers, decoder_layers, hf_config

    cfg = to_typed(compose(["model=tiny_llama"]))
    model = build_model(hf_config(cfg.model))
    names = [n for n, _ in model.named_parameters()]
    assert compile_layers(model) == cfg.model.arch["num_hidden_layers"]
    for layer in decoder_layers(model):
        assert hasattr(layer.forward, "_torchdynamo_orig_callable")  # torch.compile's wrapper
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints see the same names
