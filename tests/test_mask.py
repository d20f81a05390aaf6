"""The block-causal mask: every rule of DESIGN.md token pair by token pair, and its three forms agree."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from wam.platform.layout import TokenKind, TokenLayout
from wam.trainer.model.attention import FlexKernel, SDPAKernel
from wam.trainer.model.mask import AttentionMask
from wam.trainer.model.model import _padded_mask

K, F, TPF, A = 4, 1, 2, 3
LAYOUT = TokenLayout.teacher_forcing(K, F, TPF, A)
DENSE = AttentionMask(LAYOUT).dense()


def tok(kind: TokenKind, chunk: int = -1, j: int = 0) -> int:
    """Index of the j-th token of the span (kind, chunk)."""
    for span, offset in zip(LAYOUT.spans, LAYOUT.offsets, strict=True):
        if span.kind == kind and (kind == TokenKind.FIRST or span.chunk == chunk):
            assert j < span.length
            return offset + j
    raise KeyError((kind, chunk))


def sees(q, k) -> bool:
    return bool(DENSE[q, k])


FIRST, CLEAN, NOISY, ACTION, STATE = TokenKind


def test_sequence_order_and_sizes():
    kinds = [s.kind for s in LAYOUT.spans]
    assert kinds == [FIRST] + [CLEAN] * (K - 1) + [NOISY] * K + [ACTION] * K + [STATE] * K
    assert LAYOUT.length == TPF + (K - 1) * F * TPF + K * F * TPF + K * A + K


def test_first_frame_sees_only_itself():
    q = tok(FIRST)
    assert sees(q, tok(FIRST, j=1))
    for k in (tok(CLEAN, 0), tok(NOISY, 0), tok(ACTION, 0), tok(STATE, 0)):
        assert not sees(q, k)


def test_clean_chunk_sees_first_frame_and_clean_chunks_up_to_itself():
    q = tok(CLEAN, 1)
    assert sees(q, tok(FIRST)) and sees(q, tok(CLEAN, 0)) and sees(q, tok(CLEAN, 1, j=1))
    assert sees(tok(CLEAN, 1, j=1), q)  # bidirectional inside the chunk
    assert not sees(q, tok(CLEAN, 2))
    for kind in (NOISY, ACTION, STATE):
        assert not sees(q, tok(kind, 1)) and not sees(q, tok(kind, 0))


@pytest.mark.parametrize("kind", [NOISY, ACTION])
def test_noisy_and_action_chunk_i_see_context_and_their_own_chunk(kind):
    i = 2
    q = tok(kind, i)
    assert sees(q, tok(FIRST))
    assert sees(q, tok(CLEAN, 0)) and sees(q, tok(CLEAN, 1))
    assert not sees(q, tok(CLEAN, 2)), "clean chunk i must be hidden from its own prediction"
    assert sees(q, tok(NOISY, i)) and sees(q, tok(NOISY, i, j=1))
    assert sees(q, tok(ACTION, i)) and sees(q, tok(ACTION, i, j=A - 1))
    assert sees(q, tok(STATE, i))
    for other in (i - 1, i + 1):
        for k_kind in (NOISY, ACTION, STATE):
            assert not sees(q, tok(k_kind, other)), (kind, k_kind, other)
    assert sees(tok(kind, i, j=1), tok(kind, i, j=0))  # bidirectional inside the chunk


def test_noisy_chunk_zero_sees_only_the_first_frame_as_context():
    q = tok(NOISY, 0)
    assert sees(q, tok(FIRST)) and not sees(q, tok(CLEAN, 0))


def test_state_sees_only_itself():
    q = tok(STATE, 2)
    assert sees(q, q)
    for k in (tok(FIRST), tok(CLEAN, 0), tok(NOISY, 2), tok(ACTION, 2), tok(STATE, 1), tok(STATE, 3)):
        assert not sees(q, k)


def test_every_row_attends_somewhere_and_pair_count_matches_accounting():
    assert DENSE.any(dim=1).all()
    assert int(DENSE.sum()) == LAYOUT.allowed_pairs()


def test_inference_mask_is_the_matching_block_of_the_training_mask():
    """The KV-cached prediction of chunk c sees exactly what chunk c sees in the training sequence."""
    c = 2
    context = TokenLayout.first_frame(TPF, A)
    for i in range(c):
        context = context + TokenLayout.clean_chunk(i, F, TPF, A)
    query = TokenLayout.prediction(range(c, c + 1), F, TPF, A)
    inference = AttentionMask(query, context + query).dense()
    rows = [tok(NOISY, c, j) for j in range(F * TPF)] + [tok(ACTION, c, j) for j in range(A)] + [tok(STATE, c)]
    cols = [tok(FIRST, j=j) for j in range(TPF)] + [tok(CLEAN, i, j) for i in range(c) for j in range(F * TPF)] + rows
    assert torch.equal(inference, DENSE[rows][:, cols])


LAYOUTS = [
    TokenLayout.teacher_forcing(1, 2, 16, 24),
    TokenLayout.teacher_forcing(2, 2, 16, 48),
    TokenLayout.teacher_forcing(4, 2, 16, 24),
    TokenLayout.teacher_forcing(3, 2, 20, 48),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay.count(STATE)}chunks-{lay.actions_per_chunk}act")
@pytest.mark.parametrize("block", [16, 64, 128])
def test_block_layout_visits_every_allowed_tile_and_no_forbidden_one(layout, block):
    mask = AttentionMask(layout)
    dense = mask.dense()
    tiles = mask.block_layout(block, block)
    n = layout.length
    pad = -(-n // block) * block - n
    padded = torch.nn.functional.pad(dense, (0, pad, 0, pad))
    per_tile = padded.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # (qb, block, kb, block)
    any_allowed = per_tile.any(dim=3).any(dim=1)
    valid = torch.nn.functional.pad(torch.ones(n, n, dtype=torch.bool), (0, pad, 0, pad))
    valid = valid.unflatten(0, (-1, block)).unflatten(2, (-1, block))
    all_allowed = (per_tile | ~valid).all(dim=3).all(dim=1)
    assert torch.equal(tiles.visited, any_allowed), "visited tiles must be exactly those with an allowed pair"
    assert torch.equal(tiles.full, any_allowed & all_allowed), "full tiles must contain no forbidden pair"
    assert not (tiles.full & tiles.partial).any()


@pytest.mark.parametrize("block", [32, 128])
def test_flex_block_mask_matches_create_block_mask_and_sdpa(block):
    layout = TokenLayout.teacher_forcing(4, 2, 16, 8)
    mask = AttentionMask(layout)
    ours = mask.block_mask("cpu", block)
    qk_meta = mask.dense()
    reference = create_block_mask(lambda b, h, q, k: qk_meta[q, k], None, None, layout.length, layout.length,
                                  device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), reference.to_dense())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.length, 4, 16, generator=g) for _ in range(3))
    sdpa = SDPAKernel(SDPAKernel.Config())(q, k, v, mask)
    flex = FlexKernel(FlexKernel.Config(block_size=block))(q, k, v, mask)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_flex_mask_for_inference_shapes_matches_sdpa():
    context = TokenLayout.first_frame(16, 24) + TokenLayout.clean_chunk(0, 2, 16, 24)
    query = TokenLayout.prediction(range(1, 2), 2, 16, 24)
    mask = AttentionMask(query, context + query)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, query.length, 2, 8, generator=g)
    k, v = (torch.randn(1, context.length + query.length, 2, 8, generator=g) for _ in range(2))
    torch.testing.assert_close(FlexKernel(FlexKernel.Config(block_size=32))(q, k, v, mask),
                               SDPAKernel(SDPAKernel.Config())(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_a_served_chunk_attends_without_a_mask_but_its_state_token_sees_only_itself():
    """Every query of a served chunk but its state token sees every key, so SDPAKernel runs them unmasked (the
    flash kernel on a GPU) and redoes only the state row under the mask: the same values and gradients as the
    dense mask; the training sequence, where many rows see only some keys, keeps the dense mask."""
    context = TokenLayout.first_frame(16, 24) + TokenLayout.clean_chunk(0, 2, 16, 24)
    query = TokenLayout.prediction(range(1, 2), 2, 16, 24)
    mask = AttentionMask(query, context + query)
    state = query.slice(STATE)
    full, partial = mask.split_queries()
    assert partial.tolist() == list(range(state.start, state.stop))
    assert sorted(full.tolist() + partial.tolist()) == list(range(query.length))
    assert len(AttentionMask(LAYOUT).split_queries()[1]) * 8 > LAYOUT.length
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, query.length, 2, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, context.length + query.length, 2, 8, generator=g, requires_grad=True) for _ in range(2))
    ours = SDPAKernel(SDPAKernel.Config())(q, k, v, mask)
    dense = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask.dense()).transpose(1, 2)
    torch.testing.assert_close(ours, dense, atol=1e-6, rtol=1e-6)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(dense.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_padded_batch_splits_its_queries_only_where_no_row_is_padded():
    """The compiled engine's batch pads every row's committed keys to the longest: rows at one chunk position
    need no padding and attend unmasked but for their state token; rows at different positions keep the mask."""
    query = TokenLayout.prediction(range(1, 2), 2, 16, 24)
    one_chunk = TokenLayout.first_frame(16, 24) + TokenLayout.clean_chunk(0, 2, 16, 24)
    same = _padded_mask(((one_chunk, query), (one_chunk, query)), (2, 1), one_chunk.length, torch.device("cpu"))
    state = query.slice(STATE)
    assert same.rows.shape == (3, 1, query.length, one_chunk.length + query.length)
    assert same.partial.tolist() == list(range(state.start, state.stop)) and len(same.full) == query.length - 1
    earlier = TokenLayout.prediction(range(0, 1), 2, 16, 24)
    mixed = _padded_mask(((one_chunk, query), (TokenLayout.first_frame(16, 24), earlier)), (1, 1), one_chunk.length,
                         torch.device("cpu"))
    assert len(mixed.full) == 0 and len(mixed.partial) == query.length
