"""Completion log-probs from the final hidden states, a chunk of positions at a time.

A batch's logits (positions × vocabulary, fp32 for the log-softmax) are the largest tensors of a
step at real vocabulary sizes, and autograd keeps them for backward. Here the model's forward runs
as usual, but its output projection (``get_output_embeddings()``: ``lm_head``, peft's LoRA wrapper of
it, a tied embedding) is handed no positions: a pre-hook captures its input, the final hidden states
of the kept positions. Each completion token's log-prob is then ``z[y] - logsumexp(z)`` with ``z``
the logits of one chunk of positions, computed by *calling* the projection (so LoRA on ``lm_head``,
tied weights, 4-bit models and ZeRO-3's parameter gathering all apply) and the model's own logit
post-processing (Gemma 2/3 soft-capping ``c·tanh(x/c)``, Cohere's ``logit_scale``, Granite's
``logits_scaling``). Only one chunk's logits exist at any time, in forward and in backward:

- a frozen projection (LoRA without ``lm_head``, QLoRA, tied embeddings, reference passes): each
  log-prob depends on its own position's hidden state only, so its whole gradient is one vector
  J_t = ∂ log p_t / ∂h_t. The forward computes J chunk by chunk (one extra matmul, the one the
  backward would do anyway) and the backward is g_t · J_t: no recomputation, N × hidden saved.
- a trainable projection (LoRA on ``lm_head``, full fine-tuning): each chunk runs under
  ``torch.utils.checkpoint`` and is recomputed in backward, so gradients reach the projection's
  parameters through their ordinary autograd hooks (DDP, ZeRO).

The post-processing is checked, not assumed: on a model's first call the projection is handed one
position, and a candidate transform must reproduce the model's own logits for it; a model whose
logits none reproduces (or an FSDP-sharded one, whose projection is resharded after the forward)
keeps the full-logits path, with one warning.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from trcli import zero

_STATE = "_trcli_logit_transform"  # on the transformers model: a verified transform, or False


def _base(model):
    inner = zero.unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


IDENTITY = "none"


def _candidates(base) -> list[tuple[str, Callable]]:
    """Logit transforms transformers' CausalLM heads apply after the projection, most specific first."""
    config = _text_config(base)
    found = []
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        found.append((f"softcap {cap}", lambda z, c=float(cap): torch.tanh(z / c) * c))
    scale = getattr(base, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:  # Cohere: logits * logit_scale
        found.append((f"x {scale}", lambda z, s=float(scale): z * s))
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:  # Granite divides, HyperCLOVA X multiplies
        found.append((f"/ {scaling}", lambda z, s=float(scaling): z / s))
        found.append((f"x {scaling}", lambda z, s=float(scaling): z * s))
    found.append((IDENTITY, lambda z: z))
    return found


def _sharded_by_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def usable(model) -> bool:
    """Can this model's log-probs come from hidden states (as far as known before a first call)?"""
    base = _base(model)
    state = getattr(base, _STATE, None)
    if state is False:
        return False
    if state is None:
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if not isinstance(head, torch.nn.Module) or _sharded_by_fsdp(zero.unwrap(model)):
            object.__setattr__(base, _STATE, False)
            return False
    return True


def _tolerance(dtype) -> dict:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}


def _verify(base, projected: torch.Tensor, logits: torch.Tensor):
    """The (name, transform) mapping the projection's output to the model's logits (one position), or False."""
    if projected is None or logits is None or projected.shape != logits.shape:
        return False
    for name, fn in _candidates(base):
        with torch.no_grad():
            mine = fn(projected.detach()).float()
        if torch.allclose(mine, logits.detach().float(), **_tolerance(projected.dtype)):
            return name, fn
    return False


def hidden_logps(model, run: Callable, select: Callable, targets: torch.Tensor, chunk: int):
    """Log-probs of ``targets`` (N) from the hidden states the output projection receives in ``run()``
    (the model's forward), ``select(h)`` picking the N rows (N × hidden) that predict them; None when
    this model needs the full-logits path (then ``run`` may have been called once for nothing)."""
    if chunk <= 0 or not usable(model):
        return None
    base = _base(model)
    head = base.get_output_embeddings()
    state = getattr(base, _STATE, None)
    seen: dict = {}

    def starve(module, args, kwargs):  # the projection gets no position (one, on a first call)
        h = args[0]
        seen["h"] = h
        rows = h[(0,) * (h.dim() - 2)][: 1 if state is None else 0]
        return (rows, *args[1:]), kwargs

    def keep_output(module, args, output):
        seen["projected"] = output

    hooks = [head.register_forward_pre_hook(starve, with_kwargs=True)]
    if state is None:
        hooks.append(head.register_forward_hook(keep_output))
    try:
        out = run()
    finally:
        for hook in hooks:
            hook.remove()
    if "h" not in seen:  # the forward never called get_output_embeddings()
        object.__setattr__(base, _STATE, False)
        return None
    if state is None:
        state = _verify(base, seen.get("projected"), getattr(out, "logits", None))
        object.__setattr__(base, _STATE, state)
        if state is False:
            print(f"warning: {type(base).__name__}'s logits are not a transform trcli knows of its output "
                  "projection; its log-probs use full logits (train.logps_chunk has no effect)", file=sys.stderr)
            return None
    return chunked_logps(head, state, select(seen["h"]), targets, chunk)


def _logps(head, transform, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain autograd: what runs under a checkpoint (trainable projection)."""
    logits = transform[1](head(h)).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _frozen_chunk(head, transform, h: torch.Tensor, targets: torch.Tensor, jacobian: bool):
    """log-probs of one chunk, and with ``jacobian`` the rows ∂ log p_t / ∂h_t, with as few
    chunk × vocabulary tensors alive as possible: the logits are turned into the softmax and then
    into d log p / d logits in place (onehot - softmax), which autograd carries back through the
    transform (if any) and the projection to h."""
    name, fn = transform
    with torch.enable_grad() if jacobian else torch.no_grad():
        x = h.detach().requires_grad_(jacobian)
        z = head(x)
        if name == IDENTITY:
            logits, z_in = z, None
        else:
            z_in = z.detach().requires_grad_(jacobian)
            logits = fn(z_in)
    with torch.no_grad():
        # In place on the logits (a float32 copy when the projection runs in another dtype): no
        # backward of the projection or the transform reads its own output.
        y = logits.detach() if logits.dtype == torch.float32 else logits.detach().float()
        picked = y.gather(-1, targets[:, None]).squeeze(-1)
        top = y.amax(-1, keepdim=True)
        y.sub_(top).exp_()
        total = y.sum(-1, keepdim=True)
        logps = picked - (top + total.log()).squeeze(-1)
        if not jacobian:
            return logps, None
        y.div_(total).neg_().scatter_add_(-1, targets[:, None], torch.ones_like(picked)[:, None])
    grad = y if logits.dtype == torch.float32 else y.to(logits.dtype)
    if z_in is not None:
        (grad,) = torch.autograd.grad(logits, z_in, grad)
    (rows,) = torch.autograd.grad(z, x, grad)
    return logps, rows


def chunked_logps(head, transform, h: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log softmax(transform(head(h)))[targets] for rows h (N × hidden), ``chunk`` rows at a time;
    ``transform`` is a (name, function) pair from :func:`_candidates`."""
    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32)
    trainable = torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters())
    if trainable:  # gradients must reach the projection's parameters: recompute each chunk in backward
        from torch.utils.checkpoint import checkpoint

        return torch.cat([checkpoint(_logps, head, transform, h[i:i + chunk], targets[i:i + chunk],
                                     use_reentrant=False) for i in range(0, h.shape[0], chunk)])
    if torch.is_grad_enabled() and h.requires_grad:
        return _FrozenHead.apply(h, targets, head, transform, chunk)
    return torch.cat([_frozen_chunk(head, transform, h[i:i + chunk], targets[i:i + chunk], False)[0]
                      for i in range(0, h.shape[0], chunk)])


class _FrozenHead(torch.autograd.Function):
    """Log-probs through a projection without trainable parameters. Log-prob t depends on row t of h
    only, so its gradient is the row J_t = ∂ log p_t / ∂h_t, taken in the forward chunk by chunk
    (:func:`_frozen_chunk`); backward is g_t · J_t."""

    @staticmethod
    def forward(ctx, h, targets, head, transform, chunk):
        values, rows = [], []
        for i in range(0, h.shape[0], chunk):
            logps, jacobian = _frozen_chunk(head, transform, h[i:i + chunk], targets[i:i + chunk], True)
            values.append(logps)
            rows.append(jacobian)
        ctx.save_for_backward(torch.cat(rows))
        return torch.cat(values)

    @staticmethod
    def backward(ctx, grad_out):
        (jacobian,) = ctx.saved_tensors
        return grad_out[:, None].to(jacobian.dtype) * jacobian, None, None, None, None
