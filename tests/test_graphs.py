"""GraphDenoiser: the fast sampling denoiser gives the network's logits (CPU path always; the CUDA
graph path when a GPU is present, within bf16 tolerance)."""

from __future__ import annotations

import pytest
import torch

from maskdiff.networks import Transformer, TransformerConfig
from maskdiff.sampling import sample
from maskdiff.sampling.cuda_graph import GraphDenoiser
from maskdiff.schedules import get_schedule


def _network(device: str = "cpu", *, time: bool = False, classes: int = 0) -> Transformer:
    torch.manual_seed(0)
    net = Transformer(TransformerConfig(vocab_size=11, seq_len=32, n_layers=2, d_model=32, n_heads=4,
                                        time_conditioning=time, num_classes=classes))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.to(device).eval()


def test_cpu_path_is_the_network_in_float32() -> None:
    net = _network(time=True)
    fast = GraphDenoiser(net, 3, 32)
    z = torch.randint(0, 12, (3, 32))
    t = torch.rand(3)
    out = fast(z, t)
    assert out.dtype == torch.float32 and out.shape == (3, 32, 11)
    with torch.no_grad():
        assert torch.equal(out, net(z, t))
    assert fast.eager_calls == 1 and fast.replays == 0
    assert fast.time_conditioning is True


def test_bound_labels_and_shape_checks() -> None:
    net = _network(classes=3)
    labels = torch.tensor([0, 2])
    fast = GraphDenoiser(net, 2, 32, labels=labels)
    z = torch.full((2, 32), 11)
    with torch.no_grad():
        assert torch.equal(fast(z, torch.ones(2)), net(z, torch.ones(2), labels=labels))
    with pytest.raises(ValueError, match="full batch"):
        fast(z[:1], torch.ones(1))
    with pytest.raises(ValueError, match="labels must have shape"):
        GraphDenoiser(net, 3, 32, labels=labels)
    with pytest.raises(ValueError, match="positive"):
        GraphDenoiser(net, 0, 32)


def test_sampling_through_the_cpu_path_equals_plain_sampling() -> None:
    net = _network()
    kwargs = dict(batch_size=2, length=32, vocab_size=11, num_steps=20)
    plain = sample(lambda z, t: net(z, t).float(), get_schedule("cosine"), generator=torch.Generator().manual_seed(5), **kwargs)
    fast = sample(GraphDenoiser(net, 2, 32), get_schedule("cosine"), generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(plain, fast)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_matches_eager_bf16() -> None:
    net = _network("cuda", time=True)
    fast = GraphDenoiser(net, 4, 32)
    eager = GraphDenoiser(net, 4, 32, use_graph=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):  # replays with fresh inputs each time
        z = torch.randint(0, 12, (4, 32), device="cuda", generator=g)
        t = torch.rand(4, device="cuda", generator=g)
        # Same bf16 arithmetic; cuBLAS may pick other kernels under capture, so not always bitwise.
        torch.testing.assert_close(fast(z, t), eager(z, t), rtol=1e-2, atol=1e-2)
        with torch.no_grad():
            ref = net(z, t).float()
        # bf16 weights and activations vs fp32: within a few percent of the logits' scale (a wrong
        # buffer or a stale replay would be off by the scale itself).
        assert float((fast(z, t) - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert fast.replays == 6 and fast.eager_calls == 0
    out = fast(torch.full((2, 32), 11, device="cuda"), torch.ones(2, device="cuda"))  # other shape: eager
    assert out.shape == (2, 32, 11) and fast.eager_calls == 1
