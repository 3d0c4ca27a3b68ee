"""A tiny Pythia-shaped model, its tokenizer and a sample preference set, all built offline.

Used by `make demo` (`trcli tiny`) and by the tests: nothing here touches the network.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_TOPICS = [
    ("the capital of France", "Paris is the capital of France.", "I don't care, look it up yourself."),
    ("how to boil an egg", "Put the egg in boiling water for about nine minutes, then cool it.", "Eggs are boring, why ask me?"),
    ("a good name for a cat", "Many people like names such as Luna, Milo or Oliver.", "Cats are stupid, name it nothing."),
    ("how to stay calm before an exam", "Sleep well, review your notes and take slow, deep breaths.", "Just panic like everyone else."),
    ("what rain is", "Rain is water that falls from clouds when droplets grow heavy.", "Nobody knows and nobody cares."),
    ("how to learn to swim", "Start in shallow water with an instructor and practise floating.", "Jump in the deep end and hope."),
    ("why the sky is blue", "Air scatters blue light more than red light, so the sky looks blue.", "Because it is, stop asking."),
    ("how to save money", "Track what you spend, set a budget and put a little aside each month.", "Money is pointless, spend it all."),
]
_ASKS = ["Can you tell me {t}?", "Please explain {t}.", "I want to know {t}.", "Do you know {t}?"]


def sample_pairs(n: int = 64, seed: int = 0) -> list[dict]:
    """HH-shaped synthetic preference pairs: polite, helpful chosen; rude rejected."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, good, bad = _TOPICS[i % len(_TOPICS)]
        ask = rng.choice(_ASKS).format(t=topic)
        rows.append({
            "id": f"sample-{i}",
            "prompt": f"\n\nHuman: {ask}\n\nAssistant:",
            "chosen": " " + good,
            "rejected": " " + bad,
        })
    return rows


def write_sample_jsonl(path: str | Path, n: int = 64, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in sample_pairs(n, seed)), encoding="utf-8")
    return path


def _corpus() -> list[str]:
    text = []
    for topic, good, bad in _TOPICS:
        for ask in _ASKS:
            text.append(f"\n\nHuman: {ask.format(t=topic)}\n\nAssistant: {good} {bad}")
    text.append("SUBREDDIT: r/test\nTITLE: a title\nPOST: a post\nTL;DR: a summary")
    return text * 4


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """A byte-level BPE tokenizer (GPT-NeoX style), trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|padding|>", unk_token="<|endoftext|>",
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(out_dir: str | Path, hidden_size: int = 32, layers: int = 2, heads: int = 4,
                reward: bool = False, seed: int = 0, vocab_size: int = 512):
    """A GPT-NeoX (Pythia-shaped) model with random weights and its tokenizer, saved to out_dir.

    ``reward=True`` gives a sequence-classification head with one label (a reward model).
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir, vocab_size=vocab_size)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * hidden_size, max_position_embeddings=1024,
        rotary_pct=0.25, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, num_labels=1,
    )
    torch.manual_seed(seed)
    cls = GPTNeoXForSequenceClassification if reward else GPTNeoXForCausalLM
    model = cls(config)
    model.save_pretrained(str(out_dir))
    return model, tokenizer
