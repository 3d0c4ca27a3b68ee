"""Batch encoded sequences and compute completion log-probabilities (tokenizing: trcli.tokens).

log π(y|x) is the sum of the completion tokens' log-probabilities; prompt tokens are excluded.
Only completion positions reach the output projection (``logits_to_keep``), and their log-probs
come from the final hidden states ``train.logps_chunk`` positions at a time (:mod:`trcli.logps`):
a step never holds positions × vocabulary logits, in forward or backward (``logps_chunk: 0``, or a
model whose logits trcli cannot reproduce from its hidden states, computes them all at once).
Two batch layouts give the same numbers: :func:`collate` (padded rows, one per sequence) and
:func:`pack` (shared prompts computed once, little padding), which :func:`make_batch` picks.
"""

from __future__ import annotations

import math
import sys

import torch

from trcli import logps as hidden
from trcli import zero

# Positions per chunk of the log-prob head (train.logps_chunk; 0 = all logits at once). The stages
# set it from their config (set_logps_chunk); this default is the config's.
LOGPS_CHUNK = 256


def set_logps_chunk(chunk: int) -> None:
    global LOGPS_CHUNK
    LOGPS_CHUNK = int(chunk)


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


# CPU steps allocate and free the same large buffers (activations, a chunk's logits) over and
# over. glibc's defaults hand blocks above a (dynamic) threshold back to the kernel (munmap, heap
# trimming) and take fresh, page-faulting ones the next time: on the project's 2-core VM a TR-DPO
# step on SmolLM2 took 20-85 s that way and 9-10 s with freed memory kept for reuse, at the same
# peak RSS (4.8 GB). So the first CPU pass asks glibc to serve every block from its heap and never
# to trim it (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD max), unless MALLOC_* / GLIBC_TUNABLES are set.
_ALLOCATOR = {"tuned": False}


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for repeated large CPU allocations, once (True if it did)."""
    import os

    if _ALLOCATOR["tuned"]:
        return False
    _ALLOCATOR["tuned"] = True
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def token_logps(model, batch: dict, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token completion log-probs (B × T', zero outside completions) and the mask, for a
    batch from :func:`collate` or :func:`pack`; ``chunk`` positions of logits at a time (default
    :data:`LOGPS_CHUNK`, 0 = all at once)."""
    chunk = LOGPS_CHUNK if chunk is None else chunk
    if batch["input_ids"].device.type == "cpu" and not _ALLOCATOR["tuned"]:
        keep_freed_memory()
    if "targets" in batch:
        return _packed_token_logps(model, batch, chunk)
    ids = batch["input_ids"]
    first = batch["first"]
    keep = ids.shape[1] - first  # logits for positions first .. T-1; the last one is unused
    targets = ids[:, first + 1:]
    mask = batch["loss_mask"][:, first:]
    run = lambda: model(input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=keep)
    picked = hidden.hidden_logps(model, run, lambda h: h[:, :-1][mask], targets[mask], chunk)
    if picked is not None:  # completion positions only, a chunk at a time
        return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked), mask
    logits = run().logits
    logits = logits[:, :-1].float()
    picked = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logps, mask


# --- The fast path: shared prompts packed once, no padding between sequences (GUIDE sec. 5) ---
#
# Sequences with the same prompt (a pair's chosen and rejected, KTO's matched and mismatched rows)
# become one group [prompt, completion_1[:-1], completion_2[:-1], ...]: each completion restarts
# its positions after the prompt and attends to the prompt and to itself only. Causal attention
# makes this exact: the prompt's states do not depend on what follows it, and no completion sees
# another. A completion's last token predicts nothing, so it is not fed; its first token is
# predicted from the prompt's last position. Groups are then packed into rows (first-fit
# decreasing, rows as long as the longest group), so padding is only what the packing leaves.


def supports_packing(model) -> bool:
    """Packing needs position_ids, a custom 4D attention mask (sdpa, eager or flex attention),
    boolean ``logits_to_keep`` (transformers' ``slice_logits_to_keep``) and, for a model that mixes
    full and sliding-window layers, a forward that takes one mask per layer type; otherwise use collate."""
    import inspect

    base = _transformers_model(model)
    params = inspect.signature(base.forward).parameters
    impl = getattr(base.config, "_attn_implementation", None)
    ok = impl in ("sdpa", "eager", FLEX) and "position_ids" in params and "logits_to_keep" in params
    return ok and (_window(base) is None or _layer_types(base) is None or _takes_mask_per_layer_type(base))


# Sliding windows. transformers hands a custom 4D mask unchanged to every layer, so packed rows must
# carry the window themselves: a token attends to keys less than `sliding_window` positions back
# (transformers' sliding_window_overlay: kv > q - window). Positions restart per sequence in a
# packed row, so the distance of position ids is each sequence's own. Models whose every layer is
# windowed (Mistral) get the windowed mask; models that mix full and windowed layers (Gemma 2/3,
# Qwen2 with max_window_layers, ...) get {"full_attention": ..., "sliding_attention": ...}, the
# mapping their forward accepts in place of the masks it would build.


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _window(model) -> int | None:
    """The sliding window the model's attention applies, or None."""
    config = _text_config(model)
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    types = _layer_types(model)
    return window if types is None or "sliding_attention" in types else None


def _layer_types(model) -> list[str] | None:
    return getattr(_text_config(model), "layer_types", None)


def _takes_mask_per_layer_type(model) -> bool:
    """Does the decoder's forward accept a {layer type: mask} mapping (transformers' models with
    layer_types test ``isinstance(attention_mask, dict)``)?"""
    import inspect

    decoder = getattr(model, model.base_model_prefix, model)
    try:
        source = inspect.getsource(type(decoder).forward)
    except (OSError, TypeError):
        return False
    return "causal_mask_mapping := attention_mask, dict" in source


def _attention_masks(model, allowed: torch.Tensor, positions: torch.Tensor):
    """The boolean mask(s) for a packed batch: one tensor, or one per layer type."""
    window = _window(model)
    if window is None:
        return allowed
    windowed = allowed & (positions[:, :, None] - positions[:, None, :] < window)
    types = _layer_types(model)
    if types is None:
        return windowed
    return {"full_attention": allowed, "sliding_attention": windowed}


def _fill(sizes: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: group indices per row of ``width`` slots."""
    rows: list[list[int]] = []
    room: list[int] = []
    for g in sorted(range(len(sizes)), key=lambda g: -sizes[g]):
        r = next((r for r in range(len(rows)) if room[r] >= sizes[g]), None)
        if r is None:
            rows.append([]), room.append(width)
            r = len(rows) - 1
        rows[r].append(g)
        room[r] -= sizes[g]
    return rows


def _layout(sizes: list[int], pair_cost: float | None) -> tuple[int, list[list[int]]]:
    """Row width and rows. Without ``pair_cost``, rows are as long as the longest group. With it
    (the cost of one attention score relative to one token's linear layers: the dense attention
    of sdpa / eager computes rows × width² scores), the width from 1x to 4x the longest group
    (or all groups in one row) that minimises slots + pair_cost · rows · width² — wider rows
    leave less padding, whose linear-layer FLOPs and activations are pure waste."""
    longest = max(sizes)
    if pair_cost is None:
        return longest, _fill(sizes, longest)
    best = None
    for width in sorted({longest + longest * k // 8 for k in range(25)} | {sum(sizes)}):
        rows = _fill(sizes, width)
        width = max(sum(sizes[g] for g in row) for row in rows)
        cost = len(rows) * width * (1 + pair_cost * width)
        if best is None or cost < best[0]:
            best = (cost, width, rows)
    return best[1], best[2]


def pair_cost(model) -> float:
    """The FLOPs of one attention score (q·k and p·v over all heads) relative to one token through
    a layer's linear maps, for :func:`pack`'s choice of row width."""
    config = _text_config(_transformers_model(model))
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        return 0.0
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    base = _transformers_model(model)
    embeddings = {id(p) for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    # The model's own weights: not adapters, whose number must not change the layout (a TR run's
    # extra starting-reference adapter would, and with it the bits of the static method's results).
    # Shapes as the model declares them: ZeRO-3 leaves a rank an empty slice of each weight
    # (ds_shape holds the real one) and 4-bit weights are packed (quant_state.shape), and the
    # layout, hence the bits of a step, must not depend on either.
    def shape(p):
        quant = getattr(p, "quant_state", None)
        return tuple(getattr(p, "ds_shape", None) or getattr(quant, "shape", None) or p.shape)

    linear = sum(math.prod(shape(p)) for name, p in base.named_parameters()
                 if id(p) not in embeddings and len(shape(p)) == 2 and "lora_" not in name) / layers
    return 4 * heads * head_dim / (2 * linear) if linear else 0.0


def pack(seqs: list[tuple[list[int], list[int]]], pad_id: int, device, pair_cost: float | None = None) -> dict:
    """Packed rows for ``seqs`` (prompt, completion) with each distinct prompt computed once.

    ``token_logps`` on the result gives row i of its output for ``seqs[i]``: completion token
    log-probs left-aligned (N × longest completion), zero past the completion's end.
    ``pair_cost``: choose the row width by cost (:func:`_layout`); None: as long as the longest group.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (p, _) in enumerate(seqs):
        groups.setdefault(tuple(p), []).append(i)
    # Per group: its tokens, their positions and segments (0 = prompt, k = k-th completion), and
    # each target as (position in the group, token id, sequence, offset in the completion).
    built = []
    for prompt, members in groups.items():
        ids, pos, seg, targets = list(prompt), list(range(len(prompt))), [0] * len(prompt), []
        for k, i in enumerate(members, start=1):
            c = seqs[i][1]
            predictor = len(prompt) - 1  # the prompt's last position predicts c[0]
            for j, token in enumerate(c):
                targets.append((predictor, token, i, j))
                if j + 1 < len(c):
                    predictor = len(ids)
                    ids.append(token)
                    pos.append(len(prompt) + j)
                    seg.append(k)
        built.append((ids, pos, seg, targets))
    width, rows = _layout([len(g[0]) for g in built], pair_cost)  # group indices per row
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    # Padding gets a group of its own per position, so a pad token attends to itself only (no
    # fully masked row, hence no NaN) and nothing attends to it.
    grp = -1 - torch.arange(width).repeat(len(rows), 1)
    seg = torch.zeros((len(rows), width), dtype=torch.long)
    where, token, seq, offset = [], [], [], []
    for r, members in enumerate(rows):
        start = 0
        for g in members:
            g_ids, g_pos, g_seg, g_targets = built[g]
            end = start + len(g_ids)
            ids[r, start:end], pos[r, start:end] = torch.tensor(g_ids), torch.tensor(g_pos)
            grp[r, start:end], seg[r, start:end] = g, torch.tensor(g_seg)
            for at, tok, i, j in g_targets:
                where.append(r * width + start + at), token.append(tok), seq.append(i), offset.append(j)
            start = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (grp[:, :, None] == grp[:, None, :]) & causal & ((seg[:, None, :] == 0) | (seg[:, :, None] == seg[:, None, :]))
    keep = torch.zeros(len(rows) * width, dtype=torch.bool)
    where = torch.tensor(where)
    keep[where] = True
    # Logits come back for the kept positions only, flattened in row-major order.
    logit_row = (keep.cumsum(0) - 1)[where]
    longest = max(len(c) for _, c in seqs)
    return {"input_ids": ids.to(device), "position_ids": pos.to(device), "allowed": allowed.to(device),
            "group": grp.to(device), "segment": seg.to(device),
            "keep": keep.view(len(rows), width).to(device), "logit_row": logit_row.to(device),
            "targets": torch.tensor(token).to(device), "seq": torch.tensor(seq).to(device),
            "offset": torch.tensor(offset).to(device), "shape": (len(seqs), longest),
            "tokens": sum(len(p) + len(c) for p, c in seqs), "fed": int((grp >= 0).sum())}


def make_batch(model, seqs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """The cheapest exact batch this model can take: packed with shared prompts (rows as wide as
    the model's costs make best), else padded rows."""
    if not supports_packing(model):
        return collate(seqs, pad_id, device)
    base = _transformers_model(model)
    if not hasattr(base, "_trcli_pair_cost"):
        object.__setattr__(base, "_trcli_pair_cost", pair_cost(model))
    return pack(seqs, pad_id, device, base._trcli_pair_cost)


def _packed_token_logps(model, batch: dict, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    base = _transformers_model(model)
    impl = _packed_attention(base, batch["input_ids"].device)
    if impl != FLEX or getattr(base, _FLEX_STATE, None) is not False:
        return _packed_logps_on(model, batch, chunk, impl)
    try:  # the first forward on FlexAttention that trcli chose: sdpa if it fails
        out = _packed_logps_on(model, batch, chunk, impl)
        object.__setattr__(base, _FLEX_STATE, True)
        return out
    except Exception as exc:  # e.g. no compiler for the kernel
        base.set_attn_implementation("sdpa")
        object.__setattr__(base, _FLEX_STATE, "failed")
        print(f"warning: FlexAttention failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
              "packed rows use sdpa with a dense mask", file=sys.stderr)
        return _packed_logps_on(model, batch, chunk, "sdpa")


def _packed_logps_on(model, batch: dict, chunk: int, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    inner = zero.unwrap(model)  # a DeepSpeed engine runs the forward; the model says how
    base = _transformers_model(model)
    dtype = inner.get_input_embeddings().weight.dtype

    def as_mask(allowed):  # additive, also for sdpa: a boolean mask would be converted (and kept for backward) per layer
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    if impl == FLEX:
        mask = block_masks(base, batch)
    else:
        masks = _attention_masks(base, batch["allowed"], batch["position_ids"])
        mask = {k: as_mask(v) for k, v in masks.items()} if isinstance(masks, dict) else as_mask(masks)
    run = lambda: model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                        logits_to_keep=batch["keep"])
    values = hidden.hidden_logps(model, run, lambda h: h[batch["logit_row"]], batch["targets"], chunk)
    if values is None:
        logits = run().logits
        if logits.dim() != 2:
            raise RuntimeError(f"{type(inner).__name__} ignores boolean logits_to_keep; use collate()")
        logits = logits.float()
        normaliser = torch.logsumexp(logits, dim=-1)[batch["logit_row"]]
        values = logits[batch["logit_row"], batch["targets"]] - normaliser
    logps = torch.zeros(batch["shape"], dtype=values.dtype, device=values.device)
    logps = logps.index_put((batch["seq"], batch["offset"]), values)
    mask = torch.zeros(batch["shape"], dtype=torch.bool, device=values.device)
    mask[batch["seq"], batch["offset"]] = True
    return logps, mask


# --- Attention for packed rows: FlexAttention where it runs, sdpa with a dense mask elsewhere ------
#
# The structure of a packed row is the same on every path: a token sees keys of its own group
# (same prompt), causally, of the prompt or of its own completion, and within the window on
# sliding-window layers. sdpa and eager attention take it as a dense boolean mask (rows × T × T,
# `pack`'s "allowed"): every score is computed and masked. FlexAttention takes it as a BlockMask
# built from the rows' group / segment / position ids (`mask_mod` below): 128 × 128 blocks that no
# token of the block may see (another group in the row, the other completion, beyond the window)
# are skipped, and transformers compiles the kernel. It is used on CUDA when torch has
# flex_attention and transformers implements it for the model; packed rows switch the model to it
# on first use (and back to sdpa, with a warning, if that first forward fails). On CPU torch 2.13's
# flex_attention has no backward (NotImplementedError for inputs that require grad), so training
# steps run sdpa there; a model loaded with attn_implementation="flex_attention" still gets
# BlockMasks (its forward, e.g. a reference pass, is exact on CPU: tests/unit/test_flex.py).

FLEX = "flex_attention"
USE_FLEX = True  # packed rows may switch a model to FlexAttention where it runs (CUDA)
# On the transformers model: False while the flex forward trcli switched it to has not run yet,
# True once it has, "failed" if it failed (then sdpa for good).
_FLEX_STATE = "_trcli_flex"


def _transformers_model(model):
    inner = zero.unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_unavailable(model_class, device, dropout: float = 0.0) -> str | None:
    """Why packed rows of ``model_class`` cannot run on FlexAttention on ``device`` (None: they can)."""
    device = torch.device(device)
    if not _has_flex():
        return f"torch {torch.__version__} has no flex_attention"
    if device.type != "cuda":
        return f"torch {torch.__version__.split('+')[0]}'s flex_attention has no backward on {device.type}"
    if model_class is None:
        return "the model's class is unknown"
    if not getattr(model_class, "_supports_flex_attn", False):
        return f"transformers has no flex_attention for {getattr(model_class, '__name__', model_class)}"
    if dropout:
        return "flex_attention has no attention dropout"
    return None


def _packed_attention(base, device) -> str:
    """The attention implementation packed rows of this model run on (switching it to flex if due)."""
    impl = base.config._attn_implementation
    if impl == "sdpa" and USE_FLEX and getattr(base, _FLEX_STATE, None) is None:
        dropout = getattr(_text_config(base), "attention_dropout", 0.0) if base.training else 0.0
        if flex_unavailable(type(base), device, dropout) is None:
            base.set_attn_implementation(FLEX)
            impl = base.config._attn_implementation
            object.__setattr__(base, _FLEX_STATE, False)
    return impl


def block_masks(model, batch: dict):
    """BlockMask(s) for a packed batch: one, or one per layer type (as :func:`_attention_masks`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    grp, seg, pos = batch["group"], batch["segment"], batch["position_ids"]
    rows, width = grp.shape

    def allowed(b, h, q, kv):
        return (grp[b, q] == grp[b, kv]) & (q >= kv) & ((seg[b, kv] == 0) | (seg[b, q] == seg[b, kv]))

    window = _window(model)

    def windowed(b, h, q, kv):
        return allowed(b, h, q, kv) & (pos[b, q] - pos[b, kv] < window)

    make = lambda fn: create_block_mask(fn, rows, None, width, width, device=grp.device)
    if window is None:
        return make(allowed)
    if _layer_types(model) is None:
        return make(windowed)
    return {"full_attention": make(allowed), "sliding_attention": make(windowed)}


def attention_path(model_config, device, packed: bool = True) -> str:
    """One line: the attention path a run takes (for dry runs and logs), from the model's config."""
    if not packed:
        return "attention: padded rows, the model's own attention (pass --packing to share prompts)"
    cls = None
    if model_config is not None:  # none: nothing to look up (importing transformers' model classes takes seconds)
        try:
            import transformers
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            arch = (getattr(model_config, "architectures", None) or [None])[0] or \
                MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(model_config, "model_type", None))
            cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        except ImportError:
            pass
    why = flex_unavailable(cls, device, 0.0)
    if why is None and USE_FLEX:
        return ("attention: packed rows on FlexAttention, a BlockMask of shared prompt / own completion"
                f"{' / sliding window' if getattr(model_config, 'sliding_window', None) else ''} blocks")
    return f"attention: packed rows on sdpa with a dense block mask ({why})"


def attention_note(cfg, packed: bool) -> str:
    """A dry run's line on the attention path (stderr; stdout carries the plan): from the model's
    config, without loading weights; returned for the plan's JSON."""
    name = cfg.train.device
    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    config = None
    try:  # only CUDA's path depends on the model; importing transformers for nothing takes seconds
        if packed and torch.device(device).type == "cuda":
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(cfg.model.name_or_path, local_files_only=True,  # never online
                                                trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # a hub id not in the local cache: the class stays unknown
        pass
    note = attention_path(config, device, packed)
    print(note, file=sys.stderr)
    return note
