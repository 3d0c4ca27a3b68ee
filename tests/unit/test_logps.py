"""Chunked log-probs from hidden states (trcli.logps) equal the full-logits path.

Same per-token log-probs and the same gradients (fp32 noise) as computing all logits at once, on
tiny Llama (tied and untied embeddings), GPT-NeoX and Gemma 3 (soft-capped logits, sliding window),
padded and packed, with LoRA off / on all linear layers / on lm_head too, full fine-tuning, QLoRA;
and no tensor of positions × vocabulary exists in forward or backward.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trcli import logps as hidden
from trcli.batching import collate, pack, token_logps
from trcli.losses import dpo_loss

VOCAB = 307
CHUNK = 5  # several chunks per batch, the last one partial


def _llama(tied: bool, vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256, attn_implementation="sdpa")
    return GPTNeoXForCausalLM(cfg)


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                           final_logit_softcapping=1.0, initializer_range=0.3, attn_implementation="sdpa")
    return Gemma3ForCausalLM(cfg)


BUILDERS = {"llama-untied": lambda: _llama(False), "llama-tied": lambda: _llama(True), "gpt-neox": _neox,
            "gemma3-softcap": _gemma3}


def _seqs(vocab: int = VOCAB):
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    p1, p2 = ids(11), ids(4)
    chosen = [(p1, ids(9)), (p2, ids(13)), (ids(6), ids(1))]
    rejected = [(p1, ids(7)), (p2, ids(2)), (chosen[2][0], ids(10))]
    return chosen + rejected


def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))


def _loss_and_grads(model, batch, chunk):
    model.zero_grad()
    logps, mask = token_logps(model, batch, chunk=chunk)
    n = logps.shape[0] // 2
    ref = torch.linspace(-60, -20, 2 * n)
    sums = logps.sum(-1)
    dpo_loss(sums[:n], sums[n:], ref[:n], ref[n:], 0.1)[0].mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), mask, grads


def _compare(model, layout, atol=1e-5):
    seqs = _seqs()
    batch = layout(seqs, 0, "cpu")
    want, want_mask, want_grads = _loss_and_grads(model, batch, chunk=0)
    got, got_mask, got_grads = _loss_and_grads(model, batch, chunk=CHUNK)
    assert torch.equal(got_mask, want_mask) and want_mask.sum() == sum(len(c) for _, c in seqs)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert set(got_grads) == set(want_grads) and want_grads
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    return got_grads


@pytest.mark.parametrize("layout", [collate, pack], ids=["padded", "packed"])
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_chunked_equals_full_logits_full_fine_tuning(arch, layout):
    model = BUILDERS[arch]()
    grads = _compare(model, layout)
    tied = arch in ("llama-tied", "gemma3-softcap")
    assert any("lm_head" in k for k in grads) or tied  # a trainable projection: gradients through the checkpoint
    assert any("embed" in k for k in grads)


@pytest.mark.parametrize("layout", [collate, pack], ids=["padded", "packed"])
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_chunked_equals_full_logits_with_lora(arch, layout):
    model = _lora(BUILDERS[arch](), "all-linear")  # peft's all-linear leaves the output projection out
    grads = _compare(model, layout)
    assert all("lora_" in k for k in grads)


@pytest.mark.parametrize("arch", ["llama-untied", "llama-tied", "gemma3-softcap"])
def test_chunked_equals_full_logits_with_lora_on_lm_head(arch):
    model = _lora(BUILDERS[arch](), ["q_proj", "v_proj", "lm_head"])
    grads = _compare(model, pack)
    assert any("lm_head" in k for k in grads)  # the projection's LoRA factors are trained too


def test_softcapping_is_applied_and_verified():
    model = _gemma3()
    batch = pack(_seqs(), 0, "cpu")
    with torch.no_grad():
        token_logps(model, batch, chunk=CHUNK)
    name, transform = getattr(model, hidden._STATE)
    assert name.startswith("softcap")
    z = torch.tensor([100.0, -3.0])
    assert torch.allclose(transform(z), torch.tanh(z / 1.0) * 1.0)  # not the identity
    model.config.final_logit_softcapping = None  # without the cap the log-probs differ: the test has teeth
    with torch.no_grad():
        uncapped = token_logps(model, batch, chunk=0)[0]
        model.config.final_logit_softcapping = 1.0
        capped = token_logps(model, batch, chunk=0)[0]
    assert (uncapped - capped).abs().max() > 1e-2


def test_an_unknown_logit_transform_falls_back_to_full_logits(capsys):
    from transformers import LlamaForCausalLM

    class Odd(LlamaForCausalLM):  # a head trcli has never seen: logits shifted after the projection
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + torch.arange(out.logits.shape[-1], dtype=out.logits.dtype) * 0.01
            return out

    model = Odd(_llama(False).config)
    batch = pack(_seqs(), 0, "cpu")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["allowed"][:, None], logits_to_keep=batch["keep"]).logits
        want = (torch.log_softmax(logits, -1)[batch["logit_row"], batch["targets"]])
        got = token_logps(model, batch, chunk=CHUNK)[0][batch["seq"], batch["offset"]]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert "full logits" in capsys.readouterr().err
    assert getattr(model, hidden._STATE) is False  # decided once


class _Largest(TorchDispatchMode):
    """The largest tensor any op allocates (elements; views of existing tensors are not allocations)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("lm_head_lora", [False, True])
def test_no_positions_by_vocabulary_tensor_in_forward_or_backward(lm_head_lora):
    vocab = 5000  # larger than anything else in the model, so the logits are the largest tensors
    model = _lora(_llama(True, vocab), ["q_proj", "v_proj", "lm_head"] if lm_head_lora else "all-linear")
    batch = pack(_seqs(vocab), 0, "cpu")
    positions = int(batch["keep"].sum())  # rows of logits the full path computes
    sizes = {}
    for chunk in (0, CHUNK):
        with _Largest() as seen:
            token_logps(model, batch, chunk=chunk)[0].sum().backward()
        sizes[chunk] = seen.largest
    assert sizes[0] >= positions * vocab
    assert sizes[CHUNK] <= CHUNK * vocab


def test_the_reference_pass_without_grad_is_chunked_too():
    vocab = 5000
    model = _lora(_llama(False, vocab), "all-linear")
    batch = pack(_seqs(vocab), 0, "cpu")
    with torch.no_grad():
        want = token_logps(model, batch, chunk=0)[0]
        with _Largest() as seen:
            got = token_logps(model, batch, chunk=CHUNK)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert seen.largest <= CHUNK * vocab


def test_qlora_4bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training

    from trcli.config import ModelConfig
    from trcli.modeling import load_base

    _llama(False).save_pretrained(tmp_path)
    base = load_base(ModelConfig(quantize="4bit"), torch.device("cpu"), path=str(tmp_path))
    model = _lora(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False), "all-linear")
    grads = _compare(model, pack, atol=1e-4)
    assert all("lora_" in k for k in grads)
