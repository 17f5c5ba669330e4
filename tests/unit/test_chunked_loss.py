"""The chunked loss (loss.chunk_size, issue 20), in process: the output projection and cross-entropy chunk by chunk.

- Parity in fp32: for a plain Llama, a tied head (Qwen2), Gemma-2 (final logit soft-capping), Granite
  (logits scaling) and Cohere (logit scale, tied head), built from tests/support/families.py's rows with transformers' own config classes, the
  chunked loss equals the full-logits one within 1e-6 relative and the gradients within 1e-6 in norm
  (||dg|| / ||g||); the head rule is set so that it changes the loss (a guard checks that it does).
- A family whose forward changes the logits in a way the head rules do not know is refused (ConfigError); a
  loss term that reads the full logits is refused under chunking, naming the term.
- Memory: at a 128k vocabulary (parallelism=none), going from 1,024 to 4,096 tokens per micro batch raises a
  step's peak by less than 10% of what it costs with chunk_size=0 (VmHWM reset through /proc/self/clear_refs).
- The estimate counts one chunk's logits. Real processes: tests/e2e/test_chunked_loss.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chunked_shared import RULES, batch, tiny_model
from families import BY_NAME

def loss_and_grads(model, b: dict, chunk: int | None, rules=None):
    from fft_dist.loss import ChunkedHead, token_loss_sum
    from fft_dist.models.head import deferred_head

    model.zero_grad()
    if chunk is None:
        loss = token_loss_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    else:
        head = ChunkedHead(b["labels"], chunk)
        if rules is not None:  # the guard: the same head without the family's rule
            head = (lambda h, e, _r, inner=head: inner(h, e, rules))
        with deferred_head(model, head):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        assert out.logits is None
        loss = out.loss
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("family", list(RULES))
def test_chunked_equals_full_logits_in_fp32(family):
    from fft_dist.models.head import HeadRules, head_rules

    model = tiny_model(family)
    assert model.config.tie_word_embeddings == (family in ("qwen2", "gemma2", "cohere"))  # their classes' default
    b = batch(model.config.vocab_size)
    ref_loss, ref_grad = loss_and_grads(model, b, None)
    for chunk in (7, 4096):  # chunks that do not divide the 101 loss tokens, and one chunk for all
        loss, grad = loss_and_grads(model, b, chunk)
        rel, grad_rel = abs(loss - ref_loss) / ref_loss, float((grad - ref_grad).norm() / ref_grad.norm())
        print(f"{family} chunk {chunk}: loss {loss:.6f} vs {ref_loss:.6f} (rel {rel:.1e}), grad rel {grad_rel:.1e}")
        assert rel <= 1e-6 and grad_rel <= 1e-6
    if head_rules(model.config) != HeadRules():  # the rule matters here: without it the loss is another one
        other, _ = loss_and_grads(model, b, 7, rules=HeadRules())
        assert abs(other - ref_loss) / ref_loss > 1e-4, (family, other, ref_loss)  # 100x the tolerance


def test_16bit_compute_tracks_full_logits():
    """Under CPU autocast (bf16): the vocabulary-block weight gradient and the chunked loss agree with the full
    logits to bf16 round-off (the soft-capping runs in fp32 here, in bf16 in transformers)."""
    model = tiny_model("gemma2")
    b = batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grad = loss_and_grads(model, b, None)
        loss, grad = loss_and_grads(model, b, 16)
    assert abs(loss - ref_loss) / ref_loss < 1e-2 and float((grad - ref_grad).norm() / ref_grad.norm()) < 3e-2


def test_moe_router_aux_loss_still_counts():
    """A Mixture-of-Experts model's forward still computes its router loss (the term reads ``.aux_loss``)."""
    from transformers import AutoModelForCausalLM

    from fft_dist.config import LossConfig
    from fft_dist.loss import build_loss
    from fft_dist.models.head import deferred_head

    config = BY_NAME["qwen2_moe"].config()
    config.output_router_logits, config.router_aux_loss_coef, config._attn_implementation = True, 0.01, "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    b = batch(config.vocab_size)
    seen = {}
    for chunk in (0, 8):
        loss = build_loss(LossConfig(chunk_size=chunk), fmt="text", model_config=config)
        assert [t.name for t in loss.terms] == ["router_aux"]
        sums = loss.new_sums("cpu")
        with deferred_head(model, loss.head(b)):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        model.zero_grad()
        loss.micro_batch(b, out, torch.tensor(loss.local_counts([b]), dtype=torch.float64), sums).backward()
        seen[chunk] = sums, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    (full, full_grad), (chunked, chunked_grad) = seen[0], seen[8]
    assert full[1] > 0 and abs(float(chunked[1] - full[1])) <= 1e-6 * float(full[1])  # the router term
    assert abs(float(chunked[0] - full[0])) <= 1e-6 * float(full[0])
    assert float((chunked_grad - full_grad).norm() / full_grad.norm()) <= 1e-6


def test_an_unknown_head_rule_is_refused(monkeypatch):
    from fft_dist.errors import ConfigError
    from fft_dist.models import head as head_module

    model = tiny_model("gemma2")
    monkeypatch.setattr(head_module, "head_rules", lambda config: head_module.HeadRules())  # "forgets" soft-capping
    with pytest.raises(ConfigError, match=r"loss.chunk_size=0"):
        loss_and_grads(model, batch(model.config.vocab_size), 7)


def test_auto_chunking_asks_instead_of_refusing():
    """loss.chunk_size=auto's check before training (fft_dist.models.head.chunking_holds): true where the rules
    reproduce the family's logits (Gemma-2's soft-capping), false, without an error, where they do not (a Llama
    whose config names a soft-cap its forward never applies); the trainer then uses the full logits."""
    from fft_dist.models.head import chunking_holds, deferred_head

    def forward_of(model):
        def forward(ids, mask, head=None):
            with deferred_head(model, head):
                return model(input_ids=ids, attention_mask=mask)
        return forward

    assert chunking_holds(forward_of(tiny_model("gemma2")), "cpu")
    assert chunking_holds(forward_of(tiny_model("llama")), "cpu")
    unknown = tiny_model("llama")
    unknown.config.final_logit_softcapping = 30.0  # read by the head rules, ignored by LlamaForCausalLM
    assert not chunking_holds(forward_of(unknown), "cpu")
    from fft_dist.errors import ConfigError
    with pytest.raises(ConfigError, match=r"do not reproduce"):  # an explicit size is still refused
        loss_and_grads(unknown, batch(unknown.config.vocab_size), 7)


def test_a_term_reading_the_full_logits_is_refused_under_chunking():
    from fft_dist.errors import ConfigError
    from fft_dist.loss import Contribution, StepLoss, TOKENS
    from fft_dist.models.head import deferred_head

    class ZLoss:
        name, unit, weight, needs, metric = "z", "tokens", 1.0, frozenset({"output"}), "z"

        def __call__(self, inputs):
            return Contribution(inputs.output.logits.float().logsumexp(-1).square().sum())

    model = tiny_model("llama")
    b = batch(model.config.vocab_size)
    loss = StepLoss(TOKENS, [ZLoss()], model.config, chunk_size=8)
    with deferred_head(model, loss.head(b)):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    with pytest.raises(ConfigError, match=r"loss.terms.z reads the model's full logits"):
        loss.micro_batch(b, out, torch.tensor([100.0, 100.0]), loss.new_sums("cpu"))


# -- memory -------------------------------------------------------------------------------------------------
VOCAB = 128_256


def step_peak(strategy, loss, tokens: int) -> int:
    """Bytes a whole optimizer step (forward, backward, update) adds at its peak over what was resident."""
    from deepspeed_worker import measure_peak

    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(2, VOCAB, (max(1, tokens // 1024), min(tokens, 1024)), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    counts = torch.tensor(loss.local_counts([b]), dtype=torch.float64)

    def step():
        out = strategy.forward(b["input_ids"], b["attention_mask"], head=loss.head(b))
        strategy.backward(loss.micro_batch(b, out, counts, loss.new_sums("cpu")))
        strategy.step(0)

    peak, _ = measure_peak(step)
    return peak


def growth(chunk: int) -> tuple[int, int]:
    """(peak at 1,024 tokens, peak at 4,096 tokens) of a step of a one-layer, hidden-32 Llama at vocab 128k."""
    from transformers import LlamaConfig

    from fft_dist.config import FFTConfig, LossConfig, Parallelism, batch_plan
    from fft_dist.dist import DistContext
    from fft_dist.loss import build_loss
    from fft_dist.model import build_model
    from fft_dist.optim import lr_schedule, optimizer_factory
    from fft_dist.strategy import make_strategy

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    cfg = FFTConfig()
    cfg.parallelism.name = Parallelism.none
    cfg.train.precision = "fp32"
    cfg.train.micro_batch_size = cfg.train.global_batch_size = 1
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    strategy = make_strategy(cfg, batch_plan(cfg.train, 1), ctx)
    torch.manual_seed(0)
    strategy.setup(build_model=lambda: build_model(config), make_optimizer=optimizer_factory(cfg.optimizer, 1e-4),
                   lr_at=lr_schedule(cfg.train, 10))
    loss = build_loss(LossConfig(chunk_size=chunk), fmt="text", model_config=config)
    strategy.train(True)
    step_peak(strategy, loss, 64)  # optimizer states exist from here on
    return step_peak(strategy, loss, 1024), step_peak(strategy, loss, 4096)


@pytest.mark.slow  # about a minute here: the full-logits step at 4,096 x 128k moves GBs
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_step_memory_does_not_grow_with_tokens_x_vocabulary():
    full_1k, full_4k = growth(0)
    chunk_1k, chunk_4k = growth(256)
    print(f"vocab {VOCAB}: step peak over resident, 1,024 -> 4,096 tokens: full logits {full_1k / 2**20:.0f} -> "
          f"{full_4k / 2**20:.0f} MiB, chunk 256: {chunk_1k / 2**20:.0f} -> {chunk_4k / 2**20:.0f} MiB")
    full_rise = full_4k - full_1k
    assert full_rise > 3 * 1024 * VOCAB * 4, "the full-logits step should grow by GBs: the measurement is off"
    assert chunk_4k - chunk_1k < 0.10 * full_rise


def test_estimate_counts_one_chunk_of_logits():
    from fft_dist.config import Precision
    from fft_dist.memory import ModelShape, activation_bytes, eval_activation_bytes, logits_bytes

    shape = ModelShape(params=0, trainable=0, hidden=4096, layers=32, intermediate=14336, kv_hidden=1024, heads=32,
                       vocab=VOCAB, gated_mlp=True, largest_layer=0, largest_module=0, root_params=0, param_sizes=())
    tokens = 2 * 4096
    assert logits_bytes(shape, tokens, 2) == tokens * VOCAB * 10  # bf16 logits, their fp32 copy, the log-softmax
    chunked = logits_bytes(shape, tokens, 2, chunk=1024)
    assert chunked == 1024 * VOCAB * 10 + tokens * (4096 * 2 + 4)
    assert logits_bytes(shape, 512, 4, chunk=1024) == 512 * VOCAB * 8 + 512 * (4096 * 4 + 4)  # never above the tokens
    kw = {"micro_batch": 2, "seq_len": 4096, "precision": Precision.bf16}
    saved = activation_bytes(shape, checkpointing=True, **kw) - activation_bytes(shape, checkpointing=True, chunk=1024, **kw)
    assert saved == logits_bytes(shape, tokens, 2) - chunked
    assert eval_activation_bytes(shape, chunk=1024, **kw) < eval_activation_bytes(shape, **kw)


def test_chunk_size_is_an_option_with_a_range(tmp_path):
    from fft_dist.compose import compose, resolve, to_typed
    from fft_dist.errors import ConfigError

    default = to_typed(resolve(compose([]))).loss
    assert default.chunk_size == -1  # auto: on for token objectives, off with a term of one's own, or classification
    assert default.chunk_for(token_objective=True) == 1024 and default.chunk_for(token_objective=False) == 0
    own = to_typed(resolve(compose(["+loss.terms.z_loss={weight:0.1}"]))).loss
    assert own.chunk_for(token_objective=True) == 0  # a term of one's own may read the full logits
    assert to_typed(resolve(compose(["~loss.terms.router_aux"]))).loss.chunk_for(token_objective=True) == 1024
    assert to_typed(resolve(compose(["loss.chunk_size=512"]))).loss.chunk_for(token_objective=True) == 512
    assert to_typed(resolve(compose(["loss.chunk_size=0"]))).loss.chunk_for(token_objective=True) == 0
    with pytest.raises(ConfigError, match=r"loss.chunk_size=-2"):
        to_typed(resolve(compose(["loss.chunk_size=-2"])))
