"""chunked_token_loss: equals the plain computation, keeps no per-chunk graph, backward only scales."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from prefkd.losses.chunked import chunked_token_loss


def toy_fn(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A per-token value using every input: (t · log_softmax(s)).sum + s[y]²."""
    return (t.float() * torch.log_softmax(s, -1)).sum(-1) + s.gather(-1, y[:, None]).squeeze(-1) ** 2


def make(B=3, T=5, V=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g).to(dtype)
    t = torch.randn(B, T, V, generator=g).softmax(-1)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    return s, t, y, mask


def plain(s, t, y, mask, weights=None):
    """The same sum with ordinary autograd over the whole (masked) batch."""
    x = s.detach().clone().float().requires_grad_(True)
    vals = toy_fn(x[mask], t[mask], y[mask])
    if weights is not None:
        vals = vals * weights[mask]
    total = vals.sum()
    total.backward()
    return total.detach(), x.grad


def chunked(s, t, y, mask, chunk_size, weights=None):
    x = s.detach().clone().requires_grad_(True)
    loss = chunked_token_loss(toy_fn, x, mask, t, y, chunk_size=chunk_size, weights=weights)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 1000])
def test_equals_plain_computation(chunk_size):
    s, t, y, mask = make()
    ref_v, ref_g = plain(s, t, y, mask)
    v, g = chunked(s, t, y, mask, chunk_size)
    torch.testing.assert_close(v, ref_v)
    torch.testing.assert_close(g, ref_g)
    assert (g[~mask] == 0).all()


def test_weights_scale_each_token():
    s, t, y, mask = make(seed=1)
    w = torch.rand(mask.shape)
    ref_v, ref_g = plain(s, t, y, mask, w)
    v, g = chunked(s, t, y, mask, 2, w)
    torch.testing.assert_close(v, ref_v)
    torch.testing.assert_close(g, ref_g)


def test_grad_output_scales_the_gradient():
    s, t, y, mask = make(seed=2)
    _, g1 = chunked(s, t, y, mask, 2)
    x = s.clone().requires_grad_(True)
    (-2.5 * chunked_token_loss(toy_fn, x, mask, t, y, chunk_size=2)).backward()
    torch.testing.assert_close(x.grad, -2.5 * g1)


def test_gradient_reaches_a_non_leaf_student_and_only_it():
    s, t, y, mask = make(seed=3)
    w_head = torch.randn(s.shape[-1], s.shape[-1], requires_grad=True)
    t = t.clone().requires_grad_(True)
    weights = torch.rand(mask.shape, requires_grad=True)
    logits = s @ w_head  # non-leaf, like an LM head's output
    chunked_token_loss(toy_fn, logits, mask, t, y, chunk_size=2, weights=weights).backward()
    assert w_head.grad is not None and torch.isfinite(w_head.grad).all()
    assert t.grad is None and weights.grad is None


def test_non_contiguous_inputs():
    s, t, y, mask = make(T=6, seed=4)
    s_view, t_view, y_view, m_view = s[:, :-1], t[:, 1:], y[:, 1:], mask[:, :-1]
    assert not s_view.is_contiguous()
    ref_v, ref_g = plain(s_view.contiguous(), t_view.contiguous(), y_view, m_view)
    v, g = chunked(s_view, t_view, y_view, m_view, 2)
    torch.testing.assert_close(v, ref_v)
    torch.testing.assert_close(g, ref_g)


def test_empty_mask_gives_zero_and_zero_grad():
    s, t, y, mask = make(seed=5)
    v, g = chunked(s, t, y, torch.zeros_like(mask), 2)
    assert v.item() == 0.0 and (g == 0).all()


def test_holds_no_per_chunk_graph():
    """After forward the loss's node is the Function's, it saves exactly one tensor (the gradient buffer,
    shaped like the logits), and every per-chunk tensor is already gone; backward still works."""
    s, t, y, mask = make(seed=6)
    x = s.clone().requires_grad_(True)
    seen: list[weakref.ref] = []

    def fn(s_chunk, t_chunk, y_chunk):
        out = toy_fn(s_chunk, t_chunk, y_chunk)
        seen.extend(weakref.ref(z) for z in (s_chunk, t_chunk, y_chunk, out))
        return out

    loss = chunked_token_loss(fn, x, mask, t, y, chunk_size=2)
    gc.collect()
    assert len(seen) == 4 * -(-int(mask.sum()) // 2)  # one call per chunk
    assert all(r() is None for r in seen), "a per-chunk tensor survived the forward"
    assert type(loss.grad_fn).__name__ == "_ChunkedRowsBackward"
    saved = loss.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == x.shape and saved[0].dtype == x.dtype
    # the only edge of the graph leads to the student logits
    edges = [fn_ for fn_, _ in loss.grad_fn.next_functions if fn_ is not None]
    assert len(edges) == 1 and edges[0].variable is x
    loss.backward()
    torch.testing.assert_close(x.grad, plain(s, t, y, mask)[1])


def test_second_backward_is_refused():
    s, t, y, mask = make(seed=7)
    x = s.clone().requires_grad_(True)
    loss = chunked_token_loss(toy_fn, x, mask, t, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_no_gradient_work_without_grad():
    s, t, y, mask = make(seed=8)
    calls = []

    def fn(s_chunk, *rest):
        calls.append(s_chunk.requires_grad)
        return toy_fn(s_chunk, *rest)

    v = chunked_token_loss(fn, s, mask, t, y, chunk_size=2)  # s does not require grad
    assert v.grad_fn is None and not any(calls)
    with torch.no_grad():
        v2 = chunked_token_loss(fn, s.clone().requires_grad_(True), mask, t, y, chunk_size=2)
    assert v2.grad_fn is None and not any(calls)
    torch.testing.assert_close(v, plain(s, t, y, mask)[0])


def test_bf16_student_upcast_per_chunk():
    s, t, y, mask = make(seed=9, dtype=torch.bfloat16)
    seen = []

    def fn(s_chunk, *rest):
        seen.append(s_chunk.dtype)
        return toy_fn(s_chunk, *rest)

    x = s.clone().requires_grad_(True)
    loss = chunked_token_loss(fn, x, mask, t, y, chunk_size=2)
    loss.backward()
    assert set(seen) == {torch.float32} and loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref_v, ref_g = plain(s, t, y, mask)  # same bf16 values, upcast
    torch.testing.assert_close(loss, ref_v)
    torch.testing.assert_close(x.grad, ref_g.bfloat16())


def test_argument_checks():
    s, t, y, mask = make(seed=10)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_loss(toy_fn, s, mask, t, y, chunk_size=0)
    with pytest.raises(ValueError, match="mask"):
        chunked_token_loss(toy_fn, s, mask[:, 1:], t, y)
    with pytest.raises(ValueError, match="other"):
        chunked_token_loss(toy_fn, s, mask, t[:, 1:], y)
    with pytest.raises(ValueError, match="one value per row"):
        chunked_token_loss(lambda a, *r: a, s, mask, t, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    s, t, y, mask = make(B=4, T=64, V=300, seed=11)
    ref_v, ref_g = chunked(s, t, y, mask, 7)
    v, g = chunked(s.cuda(), t.cuda(), y.cuda(), mask.cuda(), 7)
    torch.testing.assert_close(v.cpu(), ref_v, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g.cpu(), ref_g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_chunked_rows_loss_features_share_the_sum_gradient(chunk_size):
    """chunked_rows_loss with RowFeatures: (Σ CE, top-k of softmax rows) with value and gradient of any function
    of both equal to plain autograd, and the features' rows given by flat indices."""
    from prefkd.losses.chunked import RowFeatures, chunked_rows_loss
    from prefkd.losses.divergences import cross_entropy

    s, _, y, mask = make(B=3, T=5, V=7, seed=4)
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([0, 2, 7, 11, 14])
    feats = RowFeatures(index, select=lambda r: torch.softmax(r, -1).topk(3, -1).indices,
                        value=lambda r, idx: torch.softmax(r, -1).gather(1, idx))
    x = s.detach().clone().requires_grad_(True)
    total, values = chunked_rows_loss(cross_entropy, (x,), mask, y, chunk_size=chunk_size, features=feats)
    (total * 0.5 + (values * w).sum()).backward()

    ref_x = s.detach().clone().requires_grad_(True)
    ref_total = cross_entropy(ref_x[mask], y[mask]).sum()
    ref_values = torch.softmax(ref_x.reshape(-1, 7)[index], -1).topk(3, -1).values
    (ref_total * 0.5 + (ref_values * w).sum()).backward()
    torch.testing.assert_close(total, ref_total)
    torch.testing.assert_close(values, ref_values)
    torch.testing.assert_close(x.grad, ref_x.grad)
    with torch.no_grad():
        nt, nv = chunked_rows_loss(cross_entropy, (x,), mask, y, chunk_size=chunk_size, features=feats)
    torch.testing.assert_close(nv, ref_values)


def parts_fn(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    """toy_fn's two parts as named terms: (their sum, {"mix": ..., "gold": ...})."""
    mix = (t.float() * torch.log_softmax(s, -1)).sum(-1)
    gold = s.gather(-1, y[:, None]).squeeze(-1) ** 2
    return mix + gold, {"mix": mix, "gold": gold}


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_named_terms_are_summed_beside_the_loss(chunk_size, weighted):
    """terms=: the loss and its gradient are those without terms; each named term is Σ over the masked rows of its
    per-row values (unweighted, detached), with and without grad."""
    s, t, y, mask = make(B=3, T=6, V=5, seed=7)
    weights = torch.rand(3, 6, generator=torch.Generator().manual_seed(2)) if weighted else None
    ref_v, ref_g = plain(s, t, y, mask, weights)
    x = s.detach().clone().requires_grad_(True)
    loss, terms = chunked_token_loss(parts_fn, x, mask, t, y, chunk_size=chunk_size, weights=weights,
                                     terms=("mix", "gold"))
    loss.backward()
    torch.testing.assert_close(loss, ref_v)
    torch.testing.assert_close(x.grad, ref_g)
    mix, gold = parts_fn(s[mask], t[mask], y[mask])[1].values()
    torch.testing.assert_close(terms["mix"], mix.sum())
    torch.testing.assert_close(terms["gold"], gold.sum())
    assert not terms["mix"].requires_grad and list(terms) == ["mix", "gold"]
    with torch.no_grad():
        loss_ng, terms_ng = chunked_token_loss(parts_fn, s, mask, t, y, chunk_size=chunk_size, weights=weights,
                                               terms=("mix", "gold"))
    torch.testing.assert_close(loss_ng, ref_v)
    torch.testing.assert_close(terms_ng["gold"], gold.sum())
    with pytest.raises(ValueError, match="missing"):
        chunked_token_loss(parts_fn, x, mask, t, y, terms=("mix", "other"))


def test_named_terms_with_features():
    """terms= and features= together: (sum, feature values, {name: sum}), the features' gradient unchanged."""
    from prefkd.losses.chunked import RowFeatures, chunked_rows_loss

    s, t, y, mask = make(B=2, T=4, V=6, seed=3)
    index = torch.tensor([0, 3, 5])
    feats = RowFeatures(index, select=lambda r: r.topk(2, -1).indices, value=lambda r, idx: r.gather(1, idx))
    x = s.detach().clone().requires_grad_(True)
    total, values, terms = chunked_rows_loss(parts_fn, (x,), mask, t, y, chunk_size=2, features=feats,
                                             terms=("gold",))
    (total + values.sum()).backward()
    ref_x = s.detach().clone().requires_grad_(True)
    ref_total = toy_fn(ref_x[mask], t[mask], y[mask]).sum()
    (ref_total + ref_x.reshape(-1, 6)[index].topk(2, -1).values.sum()).backward()
    torch.testing.assert_close(total, ref_total)
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(terms["gold"], parts_fn(s[mask], t[mask], y[mask])[1]["gold"].sum())


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_row_terms_give_per_row_values_and_their_vjp(chunk_size):
    """chunked_row_terms: the B×T×K terms at the masked rows (0 elsewhere) and, for any incoming gradient, the
    gradient plain autograd gives; a second backward is refused."""
    from prefkd.losses.chunked import chunked_row_terms

    s, t, y, mask = make(B=3, T=5, V=6, seed=9)

    def two(rows, t_rows, y_rows):  # n×2: toy_fn and the label's log-prob
        return torch.stack([toy_fn(rows, t_rows, y_rows),
                            torch.log_softmax(rows, -1).gather(1, y_rows[:, None]).squeeze(1)], -1)

    x = s.detach().clone().requires_grad_(True)
    terms = chunked_row_terms(two, 2, x, mask, t, y, chunk_size=chunk_size)
    g = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0))
    (terms * g).sum().backward()
    ref_x = s.detach().clone().requires_grad_(True)
    ref = torch.zeros(3, 5, 2)
    ref[mask] = two(ref_x[mask], t[mask], y[mask])
    (ref * g).sum().backward()
    torch.testing.assert_close(terms, ref.detach())
    torch.testing.assert_close(x.grad, ref_x.grad)
    again = chunked_row_terms(two, 2, x, mask, t, y, chunk_size=chunk_size).sum()
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        again.backward()
