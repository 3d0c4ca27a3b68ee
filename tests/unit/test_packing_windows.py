"""Packed rows on sliding-window models: every log-prob equals a plain forward of the sequence alone.

transformers hands a custom 4D mask to every layer unchanged, so the packed layout must carry the
window itself (per layer type where full and windowed layers mix). Sequences longer than the window
(16 tokens here) are where a packed mask without it goes wrong.
"""

import pytest
import torch

from trcli.batching import make_batch, pack, supports_packing, token_logps

WINDOW = 16


def _gemma3(attn):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=WINDOW,
                           layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=256,
                           final_logit_softcapping=30.0, attn_implementation=attn)
    return Gemma3ForCausalLM(cfg)


def _mistral(attn):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=WINDOW,
                        max_position_embeddings=256, attn_implementation=attn)
    return MistralForCausalLM(cfg)


def _qwen2(attn):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=WINDOW,
                      max_window_layers=2, max_position_embeddings=256, attn_implementation=attn)
    return Qwen2ForCausalLM(cfg)


def _seqs():
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()
    long_prompt, short_prompt = ids(30), ids(5)
    # Shared prompts (packed once), completions past the window, a one-token completion.
    return [(long_prompt, ids(25)), (long_prompt, ids(9)), (short_prompt, ids(40)), (short_prompt, ids(1)),
            (ids(12), ids(7))]


def _alone(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("build", [_gemma3, _mistral, _qwen2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logps_equal_a_plain_forward_of_each_sequence(build, attn):
    torch.manual_seed(0)
    model = build(attn).eval()
    assert supports_packing(model)
    seqs = _seqs()
    batch = pack(seqs, pad_id=0, device="cpu")
    assert batch["input_ids"].shape[1] > WINDOW
    with torch.no_grad():
        logps, mask = token_logps(model, batch)
        for i, (p, c) in enumerate(seqs):
            want = _alone(model, p, c)
            assert mask[i].sum() == len(c)
            torch.testing.assert_close(logps[i, :len(c)], want, atol=2e-5, rtol=0)


def test_a_packed_mask_without_the_window_would_be_wrong():
    """The check above has teeth: the same batch with every layer on the full mask differs."""
    torch.manual_seed(0)
    model = _gemma3("sdpa").eval()
    seqs = _seqs()
    model.config.sliding_window = 10_000  # a window the rows never reach: full attention in the packed mask
    with torch.no_grad():
        wrong = token_logps(model, pack(seqs, 0, "cpu"))[0]
        model.config.sliding_window = WINDOW
        want = _alone(model, *seqs[2])
    assert (wrong[2, :40] - want).abs().max() > 1e-2


def test_gradients_through_packed_windowed_rows_match_the_padded_layout():
    from trcli.batching import collate

    torch.manual_seed(0)
    model = _gemma3("sdpa")
    seqs = _seqs()
    grads = []
    for batch in (pack(seqs, 0, "cpu"), collate(seqs, 0, "cpu")):
        model.zero_grad()
        logps, _ = token_logps(model, batch)
        logps.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_make_batch_packs_windowed_models_it_can_mask_exactly():
    torch.manual_seed(0)
    model = _gemma3("sdpa").eval()
    assert "allowed" in make_batch(model, _seqs(), 0, "cpu")
