"""The chunked cross-entropy through the head equals the reference path (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskdiff.cross_entropy import default_chunk_size, linear_cross_entropy
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import Transformer, TransformerConfig
from maskdiff.schedules import get_schedule


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_linear_cross_entropy_matches_full_logits(chunk_size: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    n, d, v = 50, 16, 31
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    upstream = torch.rand(n, generator=g, dtype=torch.float64)  # a non-uniform incoming gradient

    ref = F.cross_entropy(h @ w.T, y, reduction="none")
    (ref * upstream).sum().backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None

    out = linear_cross_entropy(h, w, y, chunk_size=chunk_size)
    (out * upstream).sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)  # float32 log-softmax
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_gradcheck() -> None:
    """Exact autograd check in float64 inputs (the float32 internals bound the tolerance)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (6,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, y, chunk_size=4).double(),
                                    (h, w), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_linear_cross_entropy_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="expected h"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target must have shape"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    assert default_chunk_size(50257) * 50257 <= 2**25 + 50257
    assert default_chunk_size(27) >= 64


def _model(chunked: bool, *, tie: bool = False, classes: int = 0, time: bool = False) -> MaskedDiffusion:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=13, seq_len=16, n_layers=2, d_model=32, n_heads=4,
                            time_conditioning=time, tie_embeddings=tie, num_classes=classes)
    net = Transformer(cfg)
    # Give the zero-initialised head and modulations values, so gradients are non-trivial.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return MaskedDiffusion(net, get_schedule("cosine"), "md4", chunked_loss=chunked)


@pytest.mark.parametrize("variant", [dict(), dict(tie=True), dict(classes=3, time=True)])
def test_chunked_md4_loss_equals_reference(variant: dict) -> None:
    """Same seed, same draws: the chunked path gives the reference path's terms and gradients."""
    x = torch.randint(0, 13, (6, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0, 1, 2]) if variant.get("classes") else None
    results = []
    for chunked in (False, True):
        model = _model(chunked, **variant)
        model.train()
        terms = model(x, generator=torch.Generator().manual_seed(3), labels=labels)
        terms["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((terms, grads))
    (ref, ref_grads), (fast, fast_grads) = results
    for key in ("diffusion", "nelbo", "num_masked"):
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == fast_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_with_nothing_masked_keeps_the_graph() -> None:
    """t near 0 masks nothing: the loss is the boundary terms and backward still works."""
    model = _model(True)
    ce_fn = model._chunked_cross_entropy(None)
    x = torch.randint(0, 13, (2, 16))
    masked = torch.zeros_like(x, dtype=torch.bool)
    ce = ce_fn(x, torch.zeros(2), x, masked)
    assert torch.equal(ce, torch.zeros(2, 16))
    ce.sum().backward()
    assert model.network.head.weight.grad is not None
