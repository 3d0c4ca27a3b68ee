"""Row width of packed batches: chosen by cost (padding against dense attention), still exact."""

from __future__ import annotations

import torch

from trcli.batching import _layout, collate, make_batch, pack, pair_cost, token_logps


def test_layout_trades_padding_against_attention():
    sizes = [376, 300, 280, 220]
    assert _layout(sizes, None) == (376, [[0], [1], [2], [3]])  # rows as long as the longest group
    width, rows = _layout(sizes, 3.3e-4)  # SmolLM2's cost of a score relative to a token
    assert len(rows) == 2 and width * len(rows) < 4 * 376 and width < sum(sizes)
    assert sorted(g for row in rows for g in row) == [0, 1, 2, 3]
    assert all(sum(sizes[g] for g in row) <= width for row in rows)
    assert _layout(sizes, 0.0) == (sum(sizes), [[0, 1, 2, 3]])  # attention free: one row, no padding
    assert _layout(sizes, 1.0)[0] == 376  # attention dear: the shortest rows


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        attn_implementation="sdpa")).eval()


def test_make_batch_packs_by_the_models_cost_and_stays_exact():
    model = _llama()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()
    prompts = [ids(n) for n in (60, 45, 40, 30)]
    seqs = [(p, ids(n)) for p, n in zip(prompts, (20, 15, 12, 9))] + [(p, ids(n)) for p, n in zip(prompts, (8, 18, 5, 3))]
    cost = pair_cost(model)
    assert 0 < cost < 1
    batch = make_batch(model, seqs, 0, "cpu")
    narrow = pack(seqs, 0, "cpu")
    assert batch["input_ids"].numel() <= narrow["input_ids"].numel()
    with torch.no_grad():
        got, mask = token_logps(model, batch)
        want, want_mask = token_logps(model, collate(seqs, 0, "cpu"))
    for i in range(len(seqs)):
        torch.testing.assert_close(got[i][mask[i]], want[i][want_mask[i]], atol=1e-5, rtol=0)


def test_pair_cost_reads_declared_shapes_not_storage(tmp_path):
    """4-bit weights are stored packed (and ZeRO-3 leaves each rank an empty slice): the row width,
    hence the bits of a step, is the same as for the plain model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = _llama()
    model.save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    assert any(getattr(p, "quant_state", None) is not None for p in quantized.parameters())
    assert pair_cost(quantized) == pair_cost(model)
