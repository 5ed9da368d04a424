"""The batched selection against a plain, loop-by-loop implementation of the specification."""

import pytest
import torch

from visionzip_eval.selection import cls_attention_row, head_mean_keys, visionzip_select


def reference_visionzip(hidden, cls_attention, metric, dominant, contextual):
    """One image at a time, one token at a time, exactly as ../shared/VISIONZIP.md reads."""
    outputs = []
    for b in range(hidden.shape[0]):
        x, keys = hidden[b].double(), metric[b].double()
        n = x.shape[0]
        score = [float(cls_attention[b, :, j].double().sum()) for j in range(n)]
        patches = sorted(range(1, n), key=lambda j: score[j], reverse=True)[: dominant - 1]
        kept = [0] + sorted(patches)
        rest = [j for j in range(n) if j not in set(kept)]
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        unit = [keys[j] / keys[j].norm() for j in rest]
        members = {t: [] for t in range(len(targets))}
        for i in range(len(rest)):
            if i in targets:
                continue
            sims = [float(unit[i] @ unit[targets[t]]) for t in range(len(targets))]
            members[max(range(len(targets)), key=lambda t: sims[t])].append(rest[i])
        rows = [x[j] for j in kept]
        for t, target in enumerate(targets):
            merged = x[rest[target]].clone()
            if members[t]:
                merged += torch.stack([x[j] for j in members[t]]).mean(0)
            rows.append(merged)
        outputs.append(torch.stack(rows))
    return torch.stack(outputs)


def random_signals(batch, tokens, dim=32, heads=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tokens, dim, generator=g)
    attn = torch.randn(batch, heads, tokens, generator=g).softmax(-1)
    metric = torch.randn(batch, tokens, dim // heads, generator=g)
    return hidden.to(dtype), attn.to(dtype), metric.to(dtype)


@pytest.mark.parametrize(
    "batch, tokens, dominant, contextual",
    [(1, 577, 54, 10), (2, 577, 108, 20), (3, 577, 162, 30), (4, 577, 1, 1), (2, 577, 2, 3),
     (1, 577, 576, 1), (1, 577, 567, 10), (3, 50, 7, 5), (2, 577, 27, 5)],
)
def test_matches_plain_loop_reference(batch, tokens, dominant, contextual):
    hidden, attn, metric = random_signals(batch, tokens, seed=dominant + contextual)
    got = visionzip_select(hidden, attn, metric, dominant, contextual)
    want = reference_visionzip(hidden, attn, metric, dominant, contextual)
    assert got.tokens.shape == (batch, dominant + contextual, hidden.shape[-1])
    torch.testing.assert_close(got.tokens.double(), want, atol=1e-5, rtol=1e-5)


def test_indices_and_slots_describe_the_selection():
    hidden, attn, metric = random_signals(2, 577, seed=3)
    sel = visionzip_select(hidden, attn, metric, 54, 10)
    assert sel.dominant_index.shape == (2, 54) and sel.contextual_index.shape == (2, 10)
    assert (sel.dominant_index[:, 0] == 0).all()  # CLS first
    assert (sel.dominant_index.diff(dim=1) > 0).all()  # positional order
    torch.testing.assert_close(sel.tokens[:, :54], hidden.gather(1, sel.dominant_index[..., None].expand(-1, -1, 32)))
    # every tower token lands in exactly one output row; each dominant row holds one token
    assert sel.slot.shape == (2, 577) and sel.slot.min() >= 0 and sel.slot.max() == 63
    for b in range(2):
        assert sel.slot[b, sel.dominant_index[b]].tolist() == list(range(54))
        assert sel.slot[b, sel.contextual_index[b]].tolist() == list(range(54, 64))
        counts = torch.bincount(sel.slot[b], minlength=64)
        assert (counts[:54] == 1).all() and counts[54:].sum() == 577 - 54


def test_dominant_tokens_are_the_most_attended():
    hidden, attn, metric = random_signals(1, 577, seed=4)
    sel = visionzip_select(hidden, attn, metric, 11, 2)
    patch_scores = attn.sum(1)[0, 1:]
    want = sorted((patch_scores.topk(10).indices + 1).tolist())
    assert sel.dominant_index[0, 1:].tolist() == want


def test_average_merge_rule():
    hidden, attn, metric = random_signals(1, 20, seed=5)
    ref = visionzip_select(hidden, attn, metric, 5, 3, merge="reference")
    avg = visionzip_select(hidden, attn, metric, 5, 3, merge="average")
    torch.testing.assert_close(avg.tokens[:, :5], ref.tokens[:, :5])
    for c in range(3):
        members = (avg.slot[0] == 5 + c).nonzero().squeeze(1)
        torch.testing.assert_close(avg.tokens[0, 5 + c], hidden[0, members].mean(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype_and_matches_fp32(dtype):
    hidden, attn, metric = random_signals(2, 577, seed=6, dtype=dtype)
    got = visionzip_select(hidden, attn, metric, 54, 10)
    assert got.tokens.dtype == dtype and torch.isfinite(got.tokens.float()).all()
    want = reference_visionzip(hidden.float(), attn.float(), metric.float(), 54, 10)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(got.tokens.double(), want, atol=tol, rtol=tol)


def test_too_large_a_budget_is_refused():
    hidden, attn, metric = random_signals(1, 20)
    with pytest.raises(ValueError, match="exceeds the 20 tokens"):
        visionzip_select(hidden, attn, metric, 15, 6)


def test_cls_attention_row_is_row_zero_of_the_full_map():
    g = torch.Generator().manual_seed(7)
    batch, tokens, heads, dim = 2, 40, 4, 32
    q = torch.randn(batch, tokens, dim, generator=g)
    k = torch.randn(batch, tokens, dim, generator=g)
    qh = q.view(batch, tokens, heads, -1).transpose(1, 2)
    kh = k.view(batch, tokens, heads, -1).transpose(1, 2)
    full = ((qh @ kh.transpose(-1, -2)) * (dim // heads) ** -0.5).softmax(-1)
    torch.testing.assert_close(cls_attention_row(q[:, 0], k, heads), full[:, :, 0])
    torch.testing.assert_close(head_mean_keys(k, heads), kh.mean(1))
