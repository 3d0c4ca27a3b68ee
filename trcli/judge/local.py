"""Local judges: a reward model (``rm:PATH``) and a causal LM asked the pairwise prompt (``hf:PATH``)."""

from __future__ import annotations

import os

import torch

from trcli.config import ModelConfig
from trcli.errors import UsageError
from trcli.judge.prompts import PAIRWISE
from trcli.modeling import load_base, load_tokenizer
from trcli.tokens import Encoder

BATCH = 8


class RewardJudge:
    """Scores prompt + completion with a sequence-classification head; the higher score wins."""

    def __init__(self, path: str, device: torch.device):
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "right"  # the head reads the last non-pad token
        self.model = load_base(ModelConfig(), device, path=path, task="reward").eval()
        if self.model.config.num_labels != 1:
            raise UsageError(f"rm:{path}: expected a reward model with one output, found {self.model.config.num_labels}")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device

    @torch.no_grad()
    def scores(self, prompts: list[str], completions: list[str], advance=None) -> list[float]:
        """One score per (prompt, completion); ``advance(n)`` is called after each batch of n."""
        out = []
        for start in range(0, len(prompts), BATCH):
            texts = [p + c for p, c in zip(prompts[start:start + BATCH], completions[start:start + BATCH])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.model.config.max_position_embeddings).to(self.device)
            out.extend(self.model(**enc).logits[:, 0].float().tolist())
            if advance is not None:
                advance(len(texts))
        return out


class LMJudge:
    """Gives a causal LM the pairwise prompt and reads the verdict from its distribution right after
    the answer label (e.g. "More helpful:"): log P(" A") vs log P(" B"), each the sum over the
    option's tokens (a small BPE may split " A" in two). No sampling, so no unparseable answers;
    an exact tie in log-probability is a tie."""

    def __init__(self, path: str, device: torch.device, task: str):
        self.tokenizer = load_tokenizer(path)
        self.model = load_base(ModelConfig(), device, path=path).eval()
        self.device = device
        self.answer = PAIRWISE[task].answer
        # Token ids as training makes them: a template-rendered prompt as the template wrote it,
        # plain text with the tokenizer's BOS (once). Nothing is truncated (prompt() never cuts).
        self.encoder = Encoder(self.tokenizer, max_length=self.tokenizer.model_max_length,
                               templated=bool(self.tokenizer.chat_template))

    def _text(self, prompt: str) -> str:
        if self.tokenizer.chat_template:
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            return f"{prompt}{self.answer}:"
        return f"{prompt}\n\n{self.answer}:"

    @torch.no_grad()
    def _logp(self, ids: list[int], option: list[int]) -> float:
        x = torch.tensor([ids + option], device=self.device)
        # The last len(option) + 1 positions; all but the final one predict the option's tokens.
        logits = self.model(input_ids=x, logits_to_keep=len(option) + 1).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        return float(logp[torch.arange(len(option)), torch.tensor(option)].sum())

    def _option_logp(self, text: str, head: list[int], option: str) -> float:
        """log P(option | text), the option's tokens being where text + option's encoding leaves the
        text's (tokens can merge across the boundary, as in training's joint tokenization)."""
        full = self.encoder.prompt(text + option)
        cut = len(os.path.commonprefix([head, full]))
        return self._logp(full[:cut], full[cut:])

    def logit_gap(self, prompt: str) -> float:
        """log P(" A") - log P(" B") as the continuation of the prompt."""
        text = self._text(prompt)
        head = self.encoder.prompt(text)
        return self._option_logp(text, head, " A") - self._option_logp(text, head, " B")
