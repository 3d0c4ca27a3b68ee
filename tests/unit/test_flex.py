"""Packed rows on FlexAttention: the BlockMask built from the rows' group / segment / position ids
is exactly the dense mask sdpa gets, and a flex forward of packed rows equals a plain forward of
each sequence alone (tiny Llama, GPT-NeoX, Gemma 3 with sliding and full layers, Mistral).

torch 2.13's flex_attention has no backward on CPU, so these are forward passes (no_grad), and
most run the kernel uncompiled (the unfused reference implementation, with the same BlockMask
and mask_mod); one slow test runs transformers' compiled kernel.
"""

from __future__ import annotations

import copy

import pytest
import torch

from trcli import batching
from trcli.batching import FLEX, attention_path, block_masks, flex_unavailable, pack, token_logps

pytest.importorskip("torch.nn.attention.flex_attention")
WINDOW = 16


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        attn_implementation="sdpa"))


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=512,
                                            attn_implementation="sdpa"))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=512, final_logit_softcapping=30.0, attn_implementation="sdpa"))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, sliding_window=WINDOW,
                                            max_position_embeddings=512, attn_implementation="sdpa"))


BUILDERS = {"llama": _llama, "gpt-neox": _neox, "gemma3": _gemma3, "mistral": _mistral}


def _seqs(long: bool = False):
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()
    p1, p2 = ids(150 if long else 30), ids(5)
    # Shared prompts, completions past the window, a one-token completion, rows with several groups.
    return [(p1, ids(25)), (p1, ids(9)), (p2, ids(40)), (p2, ids(1)), (ids(12), ids(7)), (ids(3), ids(4))]


@pytest.fixture
def uncompiled(monkeypatch):
    """transformers' flex path without torch.compile: the same BlockMask and mask_mod, unfused."""
    import transformers.integrations.flex_attention as integration
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(integration, "compile_friendly_flex_attention",
                        lambda q, k, v, training=False, **kwargs: flex_attention(q, k, v, **kwargs))


def _alone(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_block_mask_is_the_dense_mask(arch):
    from torch.nn.attention.flex_attention import create_mask

    model = BUILDERS[arch]()
    batch = pack(_seqs(long=True), 0, "cpu")
    assert batch["input_ids"].shape[1] > 128  # several blocks per row
    flex = block_masks(model, batch)
    dense = batching._attention_masks(model, batch["allowed"], batch["position_ids"])
    flex = flex if isinstance(flex, dict) else {"": flex}
    dense = dense if isinstance(dense, dict) else {"": dense}
    assert flex.keys() == dense.keys()
    rows, width = batch["input_ids"].shape
    for kind in flex:
        got = create_mask(flex[kind].mask_mod, rows, None, width, width, device="cpu")[:, 0]
        assert torch.equal(got, dense[kind]), kind
    some = next(iter(flex.values()))
    blocks = some.to_dense()  # (rows, 1, q blocks, kv blocks): the blocks the kernel visits
    assert blocks.sum() < blocks.numel()  # some blocks skipped (the upper triangle, other groups)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_packed_rows_on_flex_equal_a_plain_forward(arch, uncompiled):
    torch.manual_seed(0)
    plain = BUILDERS[arch]().eval()
    model = copy.deepcopy(plain)
    model.set_attn_implementation(FLEX)
    seqs = _seqs()
    batch = pack(seqs, 0, "cpu")
    assert batch["input_ids"].shape[1] > WINDOW
    with torch.no_grad():
        logps, mask = token_logps(model, batch)
        for i, (p, c) in enumerate(seqs):
            assert int(mask[i].sum()) == len(c)
            torch.testing.assert_close(logps[i, :len(c)], _alone(plain, p, c), atol=3e-5, rtol=0)


def test_the_check_has_teeth(uncompiled):
    """A BlockMask without the window (every layer full) differs on Gemma 3's sliding layers."""
    torch.manual_seed(0)
    plain = _gemma3().eval()
    model = copy.deepcopy(plain)
    model.set_attn_implementation(FLEX)
    seqs = _seqs()
    batch = pack(seqs, 0, "cpu")
    model.config.sliding_window = 10_000
    with torch.no_grad():
        wrong = token_logps(model, batch)[0]
    assert (wrong[2, :40] - _alone(plain, *seqs[2])).abs().max() > 1e-3


def test_cpu_training_takes_sdpa_and_says_why():
    from transformers import LlamaForCausalLM

    model = _llama()
    assert flex_unavailable(LlamaForCausalLM, "cpu") and "no backward on cpu" in flex_unavailable(LlamaForCausalLM, "cpu")
    assert flex_unavailable(LlamaForCausalLM, "cuda") is None
    assert flex_unavailable(torch.nn.Linear, "cuda").startswith("transformers has no flex_attention")
    batch = pack(_seqs(), 0, "cpu")
    token_logps(model, batch)[0].sum().backward()  # trains: sdpa, not switched
    assert model.config._attn_implementation == "sdpa"
    note = attention_path(model.config, "cpu")
    assert note.startswith("attention: packed rows on sdpa with a dense block mask") and "no backward on cpu" in note
    assert "FlexAttention" in attention_path(model.config, "cuda")
    assert attention_path(model.config, "cpu", packed=False).startswith("attention: padded rows")


@pytest.mark.slow
def test_compiled_flex_kernel_on_cpu_equals_a_plain_forward():
    """transformers' own path: torch.compile(flex_attention) (needs a C++ compiler; slow to compile)."""
    torch.manual_seed(0)
    plain = _gemma3().eval()
    model = copy.deepcopy(plain)
    model.set_attn_implementation(FLEX)
    seqs = _seqs()
    with torch.no_grad():
        logps, _ = token_logps(model, pack(seqs, 0, "cpu"))
        for i, (p, c) in enumerate(seqs):
            torch.testing.assert_close(logps[i, :len(c)], _alone(plain, p, c), atol=3e-5, rtol=0)
