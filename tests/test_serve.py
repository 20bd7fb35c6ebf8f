"""``maskdiff serve``: the HTTP API in-process and as a real server process, and the sampler hook it uses."""

from __future__ import annotations

import torch

import maskdiff


def _toy_denoiser(vocab_size: int):
    def denoiser(z, t):
        g = torch.Generator().manual_seed(int(z.sum()))
        return torch.randn(z.shape[0], z.shape[1], vocab_size, generator=g)
    return denoiser


def test_on_step_sees_every_state_in_order():
    v, length, steps = 5, 12, 6
    seen: list[tuple[int, torch.Tensor]] = []
    out, info = maskdiff.sample(
        _toy_denoiser(v), maskdiff.get_schedule("linear"), batch_size=2, length=length, vocab_size=v,
        num_steps=steps, generator=torch.Generator().manual_seed(0), return_info=True, record_every=1,
        on_step=lambda i, z: seen.append((i, z.clone())),
    )
    assert [i for i, _ in seen] == list(range(steps + 1))
    assert torch.equal(torch.stack([z for _, z in seen]), info.trajectory)
    assert bool((seen[0][1] == v).all())
    if info.leftover_masks == 0:
        assert torch.equal(seen[-1][1], out)
    # the same seed without the hook gives the same tokens: watching does not change the draws
    again = maskdiff.sample(_toy_denoiser(v), maskdiff.get_schedule("linear"), batch_size=2, length=length,
                            vocab_size=v, num_steps=steps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out)
