"""The packed fast path (shared prompts, little padding) against the plain padded path.

Causal attention makes packing exact, so both layouts must give the same completion log-probs
and the same gradients, on GPT-NeoX and Llama, with sdpa and eager attention, with LoRA.
"""

import pytest
import torch

from trcli.batching import collate, make_batch, pack, supports_packing, token_logps
from trcli.losses import dpo_loss
from trcli.tiny import sample_pairs
from trcli.tokens import Encoder


def test_pack_feeds_a_shared_prompt_once_and_masks_the_other_completion():
    seqs = [([1, 2, 3], [4, 5, 6]), ([9], [10]), ([1, 2, 3], [7, 8])]
    batch = pack(seqs, pad_id=0, device="cpu")
    # Group [1 2 3 | 4 5 | 7] (last completion tokens are never inputs); group [9] alone.
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7], [9, 0, 0, 0, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3]  # 7 restarts after the prompt
    assert batch["fed"] == 7 and batch["tokens"] == 6 + 2 + 5
    allowed = batch["allowed"][0]
    assert allowed[5].tolist() == [True, True, True, False, False, True]  # 7 sees the prompt, not 4 5
    assert allowed[4].tolist() == [True, True, True, True, True, False]
    assert batch["allowed"][1].tolist()[2] == [False, False, True, False, False, False]  # pad: itself only
    # The prompt's last position (row 0, pos 2) predicts both 4 and 7; 9 predicts 10.
    kept = batch["keep"].nonzero().tolist()
    by_seq = {}
    for row, tok, seq, off in zip(batch["logit_row"].tolist(), batch["targets"].tolist(),
                                  batch["seq"].tolist(), batch["offset"].tolist()):
        by_seq.setdefault(seq, []).append((tuple(kept[row]), tok, off))
    assert by_seq[0] == [((0, 2), 4, 0), ((0, 3), 5, 1), ((0, 4), 6, 2)]
    assert by_seq[2] == [((0, 2), 7, 0), ((0, 5), 8, 1)]
    assert by_seq[1] == [((1, 0), 10, 0)]


def _seqs(tokenizer):
    rows = sample_pairs(6, seed=3)
    rows[1]["prompt"] += " Please answer in one long sentence with many words."
    enc = lambda p, c, n=64: Encoder(tokenizer, n, 48)(p, [c])[0]
    chosen = [enc(r["prompt"], r["chosen"]) for r in rows]
    rejected = [enc(r["prompt"], r["rejected"]) for r in rows]
    rejected[2] = enc(rows[2]["prompt"], rows[2]["rejected"], len(rejected[2].prompt) + 1)  # 1-token completion
    return [(e.prompt, e.completion) for e in chosen + rejected]


def _both(model, seqs, pad):
    plain, plain_mask = token_logps(model, collate(seqs, pad, "cpu"))
    packed_batch = pack(seqs, pad, "cpu")
    packed, packed_mask = token_logps(model, packed_batch)
    return plain, plain_mask, packed, packed_mask, packed_batch


def _neox(path, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()


def _llama(tokenizer, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_log_probs_equal_padded(tiny_model, arch, attn):
    from trcli.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    model = _neox(tiny_model, attn) if arch == "gpt_neox" else _llama(tokenizer, attn)
    assert supports_packing(model)
    seqs = _seqs(tokenizer)
    with torch.no_grad():
        plain, plain_mask, packed, packed_mask, batch = _both(model, seqs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] > 1  # several rows: padding and row packing are exercised
    assert batch["fed"] < sum(len(p) + len(c) for p, c in seqs) * 0.75  # prompts fed once
    assert plain_mask.sum(-1).tolist() == packed_mask.sum(-1).tolist()
    assert packed_mask.sum(-1)[8].item() == 1  # the truncated rejected reply: EOS only
    for i in range(len(seqs)):  # token by token, in order
        torch.testing.assert_close(packed[i][packed_mask[i]], plain[i][plain_mask[i]], atol=1e-5, rtol=1e-5)
    assert (packed[~packed_mask] == 0).all()


def test_packed_gradients_equal_padded_with_lora(tiny_model):
    from peft import LoraConfig, get_peft_model

    from trcli.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    # init_lora_weights=False: B != 0, so both factors get a nonzero gradient.
    model = get_peft_model(_neox(tiny_model, "sdpa"), LoraConfig(r=4, target_modules="all-linear",
                                                                  init_lora_weights=False))
    seqs = _seqs(tokenizer)
    n = len(seqs) // 2
    ref = torch.linspace(-80, -40, len(seqs))  # any fixed reference log-probs

    def grads(batch):
        model.zero_grad()
        logps = token_logps(model, batch)[0].sum(-1)
        dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], 0.1)[0].mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    plain = grads(collate(seqs, tokenizer.pad_token_id, "cpu"))
    packed = grads(make_batch(model, seqs, tokenizer.pad_token_id, "cpu"))
    assert supports_packing(model) and len(plain) == 2 * 4 * 2  # A and B of 4 linears in 2 layers
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(packed[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)
