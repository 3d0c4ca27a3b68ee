"""Tokenize canonical records and compute completion log-probabilities.

log π(y|x) is the sum of the completion tokens' log-probabilities; prompt tokens are excluded.
Only the logits of completion positions are computed and kept (``logits_to_keep``), and each
token's log-prob is its gathered logit minus a logsumexp: no full log-softmax is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    prompt: list[int]
    completion: list[int]


def encode(tokenizer, prompt: str, completion: str, max_length: int, max_prompt_length: int) -> Encoded:
    """Prompt tokens (left-truncated to keep the end of the dialogue) and completion tokens plus
    EOS (right-truncated so prompt + completion <= max_length)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    p = p[-max_prompt_length:] or [tokenizer.eos_token_id]  # an empty prompt still needs a first token
    room = max(1, max_length - len(p))
    return Encoded(p, c[:room])


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """Right-padded [prompt + completion] rows with a mask over completion targets.

    ``loss_mask[i, t]`` is 1 when token t+1 of row i is a completion token, i.e. when logits[t]
    predicts it.
    """
    length = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), length), dtype=torch.long)
    mask = torch.zeros((len(pairs), length - 1), dtype=torch.bool)
    for i, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        attn[i, :n] = 1
        mask[i, len(p) - 1:n - 1] = True
    first = min(len(p) for p, _ in pairs) - 1  # first position whose logits are needed
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "loss_mask": mask.to(device),
            "first": first, "tokens": int(attn.sum())}


def token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token completion log-probs (B × T', zero outside completions) and the mask."""
    ids = batch["input_ids"]
    first = batch["first"]
    keep = ids.shape[1] - first  # logits for positions first .. T-1; the last one is unused
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    logits = logits[:, :-1].float()
    targets = ids[:, first + 1:]
    mask = batch["loss_mask"][:, first:]
    picked = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logps, mask


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion log-probs, completion length) per row."""
    logps, mask = token_logps(model, batch)
    return logps.sum(-1), mask.sum(-1)
