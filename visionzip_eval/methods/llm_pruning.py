"""Removing visual tokens inside the LLM (FastV, PyramidDrop, SparseVLM): the mechanics.

An in-LLM method decides, before some decoder layers run, which visual tokens survive; this
module makes the decision real on one model instance, with removable hooks and no patched
class (the decoder keeps SDPA / FlashAttention):

- **prefill**: before each pruning layer the method sees a ``LayerView`` (the hidden states,
  which rows are visual, attention probabilities recomputed from captured queries and keys for
  just the rows it asks for) and returns a ``Prune``; the hidden states lose the dropped rows.
  Every later layer gets the attention mask and rotary embeddings gathered to the surviving
  rows, which keep their original positions (as FastV's code does; PyramidDrop's and
  SparseVLM's renumber them, see their modules), so its KV cache holds only them;
- **decoding**: ``generate`` runs on that cache; each later layer's attention mask is gathered
  to the columns its cache holds (the new tokens' positions continue after the full prompt).

``mode="mask"`` keeps every row and masks the dropped tokens out of every attention of the
later layers instead: the same computation written the simple way, which the tests compare
the removal against. Batches whose rows keep different counts are padded with copies of a
kept row that no query may attend to.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

_STATE_ATTR = "_visionzip_llm_pruning"
MODES = ("remove", "mask")


@dataclass
class Prune:
    """A method's decision at one pruning layer, per batch row.

    ``keep``: (B, P) bool over the current rows. ``extra_hidden`` (B, E, D) and
    ``extra_index`` (B, E): rows to add (SparseVLM's recycled tokens), as visual tokens at the
    given original positions, which must be positions of tokens dropped here; ``extra_valid``
    (B, E) marks the real ones where rows add different numbers."""

    keep: torch.Tensor
    extra_hidden: torch.Tensor | None = None
    extra_index: torch.Tensor | None = None
    extra_valid: torch.Tensor | None = None  # (B, E) False: padding (rows adding fewer)


class LayerView:
    """What a method sees before pruning layer ``layer`` runs (prefill): the current rows only.

    ``hidden`` (B, P, D) the layer's input, ``index`` (B, P) their original positions,
    ``valid`` (B, P) False for padding slots, ``visual`` (B, P) the valid visual rows."""

    def __init__(self, pruning: "DecoderPruning", layer: int, hidden: torch.Tensor):
        session = pruning.session
        self._pruning, self.layer, self.hidden = pruning, layer, hidden
        self.index, self.valid = session.index, session.valid
        self.visual = session.visual & session.valid
        self.entering = session.entering  # (B,) visual tokens that entered the LLM
        # the decoder's input embeddings and visual rows, over the original positions
        self.prompt_embeddings, self.prompt_visual = session.embeddings, session.prompt_visual
        self.num_layers = len(pruning.layers)

    def attention(self, rows: torch.Tensor, source: str = "previous") -> torch.Tensor:
        """(B, H, R, P) float32 attention probabilities of query rows ``rows`` (B, R) (indices
        into the current rows) over the current rows, padding and invalid slots at 0:
        ``source="previous"``: the map layer ``layer - 1`` computed (FastV's), from its
        captured queries and keys; ``"this"``: the map this layer is about to compute,
        from its own projections of its input."""
        return self._pruning.attention(self.layer, self.hidden, rows, source)


@dataclass
class _Session:
    """One prefill and the decoding that follows it."""

    prompt_length: int
    index: torch.Tensor  # (B, P) original positions of the current rows
    valid: torch.Tensor  # (B, P) False: a padding slot (copy of a kept row, masked as a key)
    visual: torch.Tensor  # (B, P) the row is a visual token
    entering: torch.Tensor  # (B,) visual tokens entering the LLM
    positions: torch.Tensor  # (B, P) the rotary positions of the current rows
    embeddings: torch.Tensor  # (B, L, D) the decoder's input embeddings
    prompt_visual: torch.Tensor  # (B, L) the visual rows of the prompt
    prefill_done: bool = False
    # per layer from the first pruned on: (index, valid) its cache was built from
    layer_rows: dict = field(default_factory=dict)
    visual_per_layer: list = field(default_factory=list)  # (B,) visual tokens each layer processed
    captured: dict = field(default_factory=dict)  # layer -> (q, k) projections (prefill)
    gathered: dict = field(default_factory=dict)  # cache of the kwargs gathered to the rows


def _gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor`` (B or 1, L, ...) at rows ``index`` (B, P) along dim 1."""
    if tensor.shape[0] != index.shape[0]:
        tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    expand = index.reshape(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, expand)


def _masked_value(mask: torch.Tensor):
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def gather_mask(
    mask: torch.Tensor | None, rows: torch.Tensor | None, columns: torch.Tensor, valid_columns: torch.Tensor
) -> torch.Tensor | None:
    """The attention mask restricted to query ``rows`` (B, R) (None: keep the mask's rows) and
    key ``columns`` (B, C), with ``valid_columns`` (B, C) False masked. A 4-D mask (B or 1, 1,
    Q, K), bool (True attends) or additive float, or a 2-D padding mask (B, K) (flash
    attention); ``None`` (pure causal) stays None when every column is valid."""
    if mask is None:
        if bool(valid_columns.all()):
            return None
        raise _NeedsExplicitMask
    if mask.dim() == 2:
        out = mask.gather(1, columns)
        return out.masked_fill(~valid_columns, 0) if not bool(valid_columns.all()) else out
    if mask.dim() != 4:
        raise ValueError(f"in-LLM pruning cannot gather a {mask.dim()}-D attention mask")
    batch = columns.shape[0]
    mask = mask.expand(batch, *mask.shape[1:]) if mask.shape[0] != batch else mask
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(batch, mask.shape[1], rows.shape[1], mask.shape[3]))
    out = mask.gather(3, columns[:, None, None, :].expand(batch, mask.shape[1], mask.shape[2], columns.shape[1]))
    if not bool(valid_columns.all()):
        out = out.masked_fill(~valid_columns[:, None, None, :], _masked_value(out))
    return out


class _NeedsExplicitMask(Exception):
    """The decoder passed no mask (pure causal) but some columns must be masked."""


def causal_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, valid_keys: torch.Tensor) -> torch.Tensor:
    """(B, 1, Q, K) bool: each query attends the valid keys at or before its original position."""
    allowed = key_positions[:, None, :] <= query_positions[:, :, None]
    return (allowed & valid_keys[:, None, :])[:, None]


def check_prune_layers(method: str, layers, num_layers: int) -> None:
    """Refuse pruning layers outside 1 .. num_layers - 1. Layer 0 is never pruned: decoding
    reads the prompt length from its cache."""
    layers = tuple(sorted(layers))
    if not layers or layers[0] < 1 or layers[-1] >= num_layers:
        raise ValueError(
            f"{method}: pruning layers {layers} do not fit a {num_layers}-layer LLM (each must be 1 .. layers - 1)"
        )


def check_decoder(method: str, decoder: nn.Module, layers: list, renumber: bool) -> None:
    """Refuse, in one line, decoders whose attention the scores cannot recompute exactly (a
    query/key norm, per-layer attention windows, no standard rotary function), and renumbered
    positions without the decoder's rotary module."""
    attention = layers[0].self_attn
    modeling = sys.modules[type(attention).__module__]
    config = getattr(decoder, "config", None)
    problem = None
    if any(hasattr(layer.self_attn, name) for layer in layers for name in ("q_norm", "k_norm")):
        problem = "normalises queries and keys"
    elif any(getattr(layer.self_attn, "sliding_window", None) for layer in layers) or any(
        kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])
    ):
        problem = "gives layers their own attention windows"
    elif not hasattr(modeling, "apply_rotary_pos_emb") or not all(
        hasattr(layer.self_attn, name) for layer in layers for name in ("q_proj", "k_proj")
    ):
        problem = "has no plain q/k projections with standard rotary embeddings"
    elif renumber and not hasattr(decoder, "rotary_emb"):
        problem = "has no rotary module to renumber positions with"
    if problem:
        raise ValueError(
            f"{method}: this LLM ({type(decoder).__name__}) {problem}, which in-LLM scoring does not "
            "recompute: choose a pre-LLM method (visionzip-eval methods --kind pre-llm)"
        )


def check_cache(cache, length: int, visual: torch.Tensor | None, session_open: bool) -> None:
    """Refuse, in one line, what in-LLM pruning cannot serve: a cache of fixed layout (static,
    compiled; each layer's cache holds only the rows it kept), and a forward that brings visual
    tokens, or several tokens after a pruned prefill, onto a non-empty cache (a chunked prefill,
    a turn reusing the cache): pruning needs the whole prompt in one prefill."""
    if cache is None:
        return
    layers = getattr(cache, "layers", None) or []
    if getattr(cache, "is_compileable", False) or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        raise ValueError(
            f"in-LLM pruning needs a DynamicCache (its layers keep different rows), got {type(cache).__name__}: "
            "drop cache_implementation=static / torch.compile for in-LLM methods"
        )
    cached = cache.get_seq_length()
    # one token on a cache is a decoding step (a generated token may be a placeholder id)
    if cached and length > 1 and ((visual is not None and bool(visual.any())) or session_open):
        raise ValueError(
            f"in-LLM pruning prunes a prompt in one prefill from an empty cache; this forward brings {length} "
            f"tokens onto a cache of {cached} (a chunked prefill or a turn reusing the cache): "
            "prefill the whole prompt at once, with a fresh cache per turn"
        )


class DecoderPruning:
    """In-LLM pruning installed on one model: hooks on its decoder stack and on the model's
    input side (which rows are visual). ``method`` has ``prune_layers(num_layers)`` and
    ``select(view) -> Prune``."""

    def __init__(self, backend, method, mode: str = "remove"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.backend, self.method, self.mode = backend, method, mode
        self.decoder = backend.decoder()
        self.layers = list(self.decoder.layers)
        self.prune_layers = tuple(sorted(set(method.prune_layers(len(self.layers)))))
        # positions="renumber" (PDrop's and SparseVLM's official code): the rows left after a
        # pruning get positions 0..P'-1, and decoding continues from each layer's own count
        self.renumber = getattr(method, "positions", "original") == "renumber"
        check_decoder(method.name, self.decoder, self.layers, self.renumber)
        check_prune_layers(method.name, self.prune_layers, len(self.layers))
        self.session: _Session | None = None
        self._pending_visual: torch.Tensor | None = None
        self.last_visual_per_layer: torch.Tensor | None = None  # (B, layers) of the last prefill
        self._current = None  # the running layer's full mask and rotary embeddings (prefill)
        self._handles: list = []
        self._install()

    # -- installing -------------------------------------------------------------------------
    def _install(self) -> None:
        handles = self._handles
        untrack = self.backend.track_visual_rows(self._on_visual_rows)
        handles.append(_Undo(untrack))
        handles.append(self.decoder.register_forward_pre_hook(self._on_decoder_start, with_kwargs=True))
        handles.append(self.decoder.register_forward_hook(self._on_decoder_end))
        first = self.prune_layers[0]
        for number, layer in enumerate(self.layers):
            if number >= first:
                handles.append(layer.register_forward_pre_hook(self._layer_hook(number), with_kwargs=True))
            if number + 1 in self.prune_layers:  # the previous layer of a pruning layer: keep q, k
                attention = layer.self_attn
                handles.append(attention.q_proj.register_forward_hook(self._capture(number, "q")))
                handles.append(attention.k_proj.register_forward_hook(self._capture(number, "k")))
        setattr(self.backend.model, _STATE_ATTR, self)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if getattr(self.backend.model, _STATE_ATTR, None) is self:
            delattr(self.backend.model, _STATE_ATTR)

    # -- session ----------------------------------------------------------------------------
    def _on_visual_rows(self, visual: torch.Tensor | None) -> None:
        self._pending_visual = visual

    def _on_decoder_start(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch, length = (embeds if embeds is not None else ids).shape[:2]
        device = (embeds if embeds is not None else ids).device
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        visual, self._pending_visual = self._pending_visual, None
        if visual is not None and visual.shape != (batch, length):  # not this forward's rows
            visual = None
        check_cache(cache, length, visual, self.session is not None and self.session.prefill_done)
        if cache is not None and cache.get_seq_length() > 0:  # decoding
            return None
        self.session, self.last_visual_per_layer = None, None
        if visual is None or not bool(visual.any()):
            return None
        index = torch.arange(length, device=device).expand(batch, length)
        visual = visual.to(device).bool()
        self.session = _Session(
            prompt_length=length,
            index=index,
            valid=torch.ones(batch, length, dtype=torch.bool, device=device),
            visual=visual,
            entering=visual.sum(1),
            positions=index,
            embeddings=embeds if embeds is not None else module.embed_tokens(ids),
            prompt_visual=visual,
        )
        return None

    def _on_decoder_end(self, module, args, output):
        session = self.session
        if session is not None and not session.prefill_done:
            session.prefill_done = True
            session.captured.clear()
            before = [session.entering] * self.prune_layers[0]  # the layers before the first pruning
            self.last_visual_per_layer = torch.stack(before + session.visual_per_layer, dim=1).cpu()
        return None

    def _capture(self, number: int, which: str):
        def hook(module, args, output):
            session = self.session
            if session is not None and not session.prefill_done:
                session.captured.setdefault(number, {})[which] = output

        return hook

    # -- layers -----------------------------------------------------------------------------
    def _layer_hook(self, number: int):
        def hook(module, args, kwargs):
            session = self.session
            if session is None:
                return None
            if session.prefill_done:
                return self._decode_kwargs(number, args, kwargs)
            return self._prefill_kwargs(number, args, kwargs)

        return hook

    def _prefill_kwargs(self, number: int, args, kwargs):
        session = self.session
        kwargs = dict(kwargs)
        hidden, args = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        full_mask = kwargs.get("attention_mask")
        cos, sin = kwargs["position_embeddings"]
        self._current = (full_mask, cos, sin)
        if number in self.prune_layers:
            rows = _gather_rows(hidden, session.index) if self.mode == "mask" else hidden
            hidden = self._apply(self.method.select(LayerView(self, number, rows)), hidden, rows)
            session.gathered.clear()
        session.visual_per_layer.append((session.visual & session.valid).sum(1))
        session.layer_rows[number] = (session.index, session.valid)
        if self.mode == "remove":
            kwargs.update(self._gathered(full_mask, cos, sin, hidden))
            kwargs["position_ids"] = None  # gaps in the positions must not read as packed sequences
        else:
            length = hidden.shape[1]
            kwargs["attention_mask"] = self._masked_full(full_mask, length, length, session.layer_rows[number])
            if self.renumber:
                positions = self._renumbered(session.layer_rows[number], length, length)
                kwargs["position_embeddings"] = self.decoder.rotary_emb(hidden, positions)
        return (hidden, *args), kwargs

    def _gathered(self, full_mask, cos, sin, hidden) -> dict:
        """The mask and rotary embeddings of the current rows (computed once per pruning)."""
        session = self.session
        if not session.gathered:
            index, valid = session.index, session.valid
            try:
                mask = gather_mask(full_mask, index, index, valid)
            except _NeedsExplicitMask:
                mask = causal_mask(index, index, valid)
            session.gathered = {"attention_mask": mask, "position_embeddings": self._rotary(cos, sin, hidden)}
        return session.gathered

    def _rotary(self, cos, sin, hidden) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embeddings of the current rows at their positions (original or renumbered)."""
        session = self.session
        if self.renumber:
            return self.decoder.rotary_emb(hidden, session.positions)
        return _gather_rows(cos, session.index), _gather_rows(sin, session.index)

    def _renumbered(self, rows, new: int, total: int) -> torch.Tensor:
        """(B, new) renumbered positions of the last ``new`` of ``total`` original positions, for
        a layer keeping ``rows`` (index, valid) of the prompt: a kept prompt token's position is
        its rank among the kept ones; a token after the prompt continues from their count."""
        session = self.session
        index, valid = rows
        batch, device = index.shape[0], index.device
        kept = torch.zeros(batch, session.prompt_length, dtype=torch.long, device=device)
        kept = (kept.scatter_add(1, index, valid.long()) > 0).long()
        prompt = (kept.cumsum(1) - 1).clamp(min=0)
        after = kept.sum(1, keepdim=True) + torch.arange(total - session.prompt_length, device=device)[None]
        return torch.cat([prompt, after], 1)[:, total - new :]

    def _masked_full(self, full_mask, new: int, total: int, rows) -> torch.Tensor:
        """Mask mode: the decoder's mask for ``new`` queries over ``total`` keys, with the
        prompt tokens this layer dropped (``rows``: the (index, valid) it keeps) masked out as
        keys of every query."""
        session = self.session
        index, valid = rows
        batch, device = index.shape[0], index.device
        kept = torch.zeros(batch, session.prompt_length, dtype=torch.int, device=device)
        kept = kept.scatter_add(1, index, valid.int()) > 0
        keep = torch.cat([kept, torch.ones(batch, total - kept.shape[1], dtype=torch.bool, device=device)], 1)
        if full_mask is None:
            keys = torch.arange(total, device=device).expand(batch, total)
            return causal_mask(keys[:, total - new :], keys, keep)
        if full_mask.dim() == 2:
            return full_mask.masked_fill(~keep, 0)
        mask = full_mask.expand(batch, *full_mask.shape[1:]) if full_mask.shape[0] != batch else full_mask
        return mask.masked_fill(~keep[:, None, None, :], _masked_value(mask))

    def _decode_kwargs(self, number: int, args, kwargs):
        session = self.session
        rows = session.layer_rows.get(number)
        if rows is None:
            return None
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, new = hidden.shape[:2]
        full_mask = kwargs.get("attention_mask")
        if full_mask is not None:
            total = full_mask.shape[-1]
        else:  # layer 0 (never pruned) has cached this step's tokens already
            total = kwargs.get("cache", kwargs.get("past_key_values")).get_seq_length(0)
        if self.renumber:
            kwargs["position_embeddings"] = self.decoder.rotary_emb(hidden, self._renumbered(rows, new, total))
        if self.mode == "mask":
            kwargs["attention_mask"] = self._masked_full(full_mask, new, total, rows)
            return args, kwargs
        index, valid = rows
        tail = torch.arange(session.prompt_length, total, device=index.device).expand(batch, -1)
        columns = torch.cat([index, tail], 1)
        valid_columns = torch.cat([valid, torch.ones_like(tail, dtype=torch.bool)], 1)
        try:
            kwargs["attention_mask"] = gather_mask(full_mask, None, columns, valid_columns)
        except _NeedsExplicitMask:
            queries = torch.arange(total - new, total, device=index.device).expand(batch, -1)
            kwargs["attention_mask"] = causal_mask(queries, columns, valid_columns)
        kwargs["position_ids"] = None
        return args, kwargs

    # -- applying a decision ----------------------------------------------------------------
    def _apply(self, decision: Prune, hidden: torch.Tensor, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Update the session's rows by ``decision``; return the hidden states the layer receives."""
        session = self.session
        index, visual = session.index, session.visual
        keep, rows_hidden = decision.keep & session.valid, hidden_rows
        if decision.extra_hidden is not None:
            extra = decision.extra_index.to(index.device)
            ones = torch.ones_like(extra, dtype=torch.bool)
            real = ones if decision.extra_valid is None else decision.extra_valid.to(index.device).bool()
            dropped = torch.where(visual & session.valid & ~keep, index, -1)
            if not bool(((extra[..., None] == dropped[:, None, :]).any(-1) | ~real).all()):
                raise ValueError(f"{self.method.name}: recycled tokens must take positions of tokens dropped there")
            index, visual = torch.cat([index, extra], 1), torch.cat([visual, ones], 1)
            keep = torch.cat([keep, real], 1)
            rows_hidden = torch.cat([hidden_rows, decision.extra_hidden.to(hidden_rows.dtype)], 1)
            if self.renumber:  # SparseVLM's order: the kept visual rows, then the merged ones (MSL:268-275)
                index = index.clone()
                for row in range(index.shape[0]):
                    block = torch.nonzero(keep[row] & visual[row]).flatten()
                    index[row, block] = index[row, block].sort().values
        # the kept rows in original order; a row keeping fewer than the widest is padded at the
        # front with copies of its first kept row (never at the end: generate reads the last row)
        width = int(keep.sum(1).max())
        order = torch.where(keep, index, -1).argsort(dim=1, stable=True)[:, -width:]
        valid = keep.gather(1, order)
        first_kept = order.gather(1, valid.int().argmax(dim=1, keepdim=True))
        order = torch.where(valid, order, first_kept)
        session.index, session.valid = index.gather(1, order), valid
        session.visual = visual.gather(1, order)
        session.positions = (valid.long().cumsum(1) - 1).clamp(min=0) if self.renumber else session.index
        if self.mode == "remove":
            return _gather_rows(rows_hidden, order)
        if decision.extra_hidden is None:
            return hidden
        # mask mode keeps the full rows: every kept row (recycled ones included) is written at its position
        hidden, kept = hidden.clone(), _gather_rows(rows_hidden, order)
        for row in range(hidden.shape[0]):
            hidden[row, session.index[row][valid[row]]] = kept[row][valid[row]]
        return hidden

    # -- attention --------------------------------------------------------------------------
    def attention(self, number: int, hidden: torch.Tensor, rows: torch.Tensor, source: str) -> torch.Tensor:
        session = self.session
        index, valid = session.index, session.valid
        if source == "previous":
            captured = session.captured.get(number - 1, {})
            if "q" not in captured or "k" not in captured:
                raise RuntimeError(f"the queries and keys of layer {number - 1} were not captured")
            module = self.layers[number - 1].self_attn
            queries, keys = captured["q"], captured["k"]
            if self.mode == "mask":  # captured over the full rows
                queries, keys = _gather_rows(queries, index), _gather_rows(keys, index)
            queries = _gather_rows(queries, rows)
        elif source == "this":
            layer = self.layers[number]
            module = layer.self_attn
            normed = layer.input_layernorm(hidden)
            queries, keys = module.q_proj(_gather_rows(normed, rows)), module.k_proj(normed)
        else:
            raise ValueError(f"attention source must be 'previous' or 'this', got {source!r}")
        full_mask, cos, sin = self._current
        positions = self._rotary(cos, sin, hidden)
        return attention_probs(module, queries, keys, positions, rows, index, valid, full_mask)


def attention_probs(
    attention: nn.Module,
    queries: torch.Tensor,
    keys: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    full_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention (B, H, R, P) float32 (float64 for float64 inputs) of projected
    ``queries`` (B, R, H * d) of rows ``rows`` over projected ``keys`` (B, P, KV * d), rotary
    applied at the rows' original positions, grouped keys repeated, the decoder's mask applied
    (gathered from ``full_mask`` over original positions ``index``; causal if None)."""
    head_dim = attention.head_dim
    batch, count = queries.shape[:2]
    length = keys.shape[1]
    modeling = sys.modules[type(attention).__module__]
    cos, sin = position_embeddings
    q = queries.view(batch, count, -1, head_dim).transpose(1, 2)
    k = keys.view(batch, length, -1, head_dim).transpose(1, 2)
    q, _ = modeling.apply_rotary_pos_emb(q, q, _gather_rows(cos, rows), _gather_rows(sin, rows))
    k, _ = modeling.apply_rotary_pos_emb(k, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(work), k.to(work).transpose(2, 3)) * attention.scaling
    query_positions = index.gather(1, rows)
    try:
        mask = gather_mask(full_mask, query_positions, index, valid)
    except _NeedsExplicitMask:
        mask = None
    if mask is None or mask.dim() == 2:
        allowed = causal_mask(query_positions, index, valid)
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, None, :]
        mask = allowed
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.to(work)
    return torch.softmax(scores, dim=-1)


class _Undo:
    def __init__(self, function: Callable[[], None]):
        self.function = function

    def remove(self) -> None:
        self.function()


def installed(model: nn.Module) -> DecoderPruning | None:
    """The in-LLM pruning installed on ``model``, or None."""
    return getattr(model, _STATE_ATTR, None)


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch the installed pruning between real removal and masking (tests compare them)."""
    pruning = installed(model)
    if pruning is None:
        raise ValueError("no in-LLM method is applied to this model")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pruning.mode = mode


def visual_tokens_per_layer(model: nn.Module) -> torch.Tensor | None:
    """(B, layers) visual tokens each decoder layer processed in the model's last prefill, or
    None where no in-LLM method pruned it."""
    pruning = installed(model)
    return None if pruning is None else pruning.last_visual_per_layer
