"""Tests for the image U-Net denoiser (maskdiff.networks.unet) and for image runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from maskdiff.model import MaskedDiffusion
from maskdiff.networks import Transformer, UNet, UNetConfig, build_network, network_config_from_dict
from maskdiff.schedules import get_schedule

V = 256


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_unet(shape=(8, 12, 3), seed: int = 0, perturb: bool = True, **overrides) -> UNet:
    """A small U-Net; ``perturb`` gives the zero-initialised tensors small random values so the
    output depends on the input, the time and the label."""
    h, w, c = shape
    base = dict(vocab_size=V, seq_len=h * w * c, image_shape=shape, base_channels=16, channel_mult=(1, 2),
                res_blocks=1, mid_attention_layers=1, n_heads=2, embed_dim=8, token_dim=16, cond_dim=16,
                time_embed_dim=16)
    torch.manual_seed(seed)
    net = UNet(UNetConfig(**{**base, **overrides}))
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                if not p.any():
                    p.normal_(0.0, 0.2)
    return net.eval()


def random_tokens(net: UNet, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V + 1, (batch, net.seq_len), generator=g)  # includes the mask id


def test_shapes_uniform_start_and_hidden_states():
    net = make_unet(perturb=False)
    z = random_tokens(net)
    logits = net(z)
    assert logits.shape == (2, 8 * 12 * 3, V)
    assert torch.equal(logits, torch.zeros_like(logits))  # zero head: exactly uniform prediction
    net = make_unet()
    hidden = net(z, return_hidden=True)
    assert hidden.shape == (2, net.seq_len, net.config.token_dim)
    torch.testing.assert_close(hidden @ net.head_weight.T, net(z))


def test_raster_order_is_row_column_channel():
    """Without the attention middle the receptive field is local: changing the token at (row r,
    column c, channel k) changes outputs only near (r, c), in all channels there, and nowhere far.
    A wrong flattening (rows and columns swapped, channels mixed with columns) breaks this on a
    non-square image. GroupNorm's statistics span the whole image, so the norms are replaced by
    the identity here: the test is about the layout."""
    shape = (8, 24, 3)
    net = make_unet(shape, mid_attention_layers=0, channel_mult=(1,), res_blocks=1)
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    h, w, c = shape
    z = random_tokens(net, batch=1)
    r, col, k = 1, 2, 1
    changed = z.clone()
    index = (r * w + col) * c + k
    changed[0, index] = (z[0, index] + 7) % V
    diff = (net(changed) - net(z)).abs().amax(-1)[0].view(h, w, c)  # (H, W, C)
    moved = diff > 1e-6
    assert moved[r, col].all()  # every channel of the changed pixel
    rows, cols, _ = torch.nonzero(moved, as_tuple=True)
    # ten 3×3 convolutions in sequence (conv_in, 2 in each of the 4 residual blocks, conv_out)
    assert int((cols - col).abs().max()) == 10 and int((rows - r).abs().max()) == h - 1 - r
    assert not moved[:, col + 11:].any()  # far columns untouched


def test_time_and_label_conditioning():
    z = random_tokens(make_unet())
    agnostic = make_unet()
    torch.testing.assert_close(agnostic(z, torch.zeros(2)), agnostic(z, torch.ones(2)))
    timed = make_unet(time_conditioning=True)
    assert not torch.allclose(timed(z, torch.full((2,), 0.1)), timed(z, torch.full((2,), 0.9)))
    with pytest.raises(ValueError, match="time-conditioned"):
        timed(z)
    labelled = make_unet(num_classes=3)
    a = labelled(z, labels=torch.tensor([0, 0]))
    b = labelled(z, labels=torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(labelled(z), labelled(z, labels=torch.tensor([3, 3])))  # None = "no label"
    with pytest.raises(ValueError, match="no class conditioning"):
        agnostic(z, labels=torch.tensor([0, 1]))


def test_bad_inputs_and_configs_name_the_fix():
    net = make_unet()
    with pytest.raises(ValueError, match="whole images"):
        net(torch.zeros(1, net.seq_len - 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\]"):
        net(torch.full((1, net.seq_len), V + 1))
    with pytest.raises(ValueError, match=r"divisible by 8; got 28×28.*unet_channel_mult=1,2,2\)"):
        UNetConfig(vocab_size=V, seq_len=28 * 28, image_shape=(28, 28, 1), channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="holds 784 values but seq_len is 100"):
        UNetConfig(vocab_size=V, seq_len=100, image_shape=(28, 28, 1))
    with pytest.raises(ValueError, match="unknown UNetConfig key"):
        UNetConfig.from_dict({**make_unet().config.to_dict(), "depth": 3})


def test_save_load_round_trip_and_architecture_dispatch(tmp_path):
    net = make_unet(num_classes=2, time_conditioning=True)
    net.save_pretrained(tmp_path / "unet")
    again = UNet.from_pretrained(tmp_path / "unet")
    z, t = random_tokens(net), torch.tensor([0.3, 0.7])
    torch.testing.assert_close(again(z, t, labels=torch.tensor([0, 1])), net(z, t, labels=torch.tensor([0, 1])))
    data = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert data["model_type"] == "maskdiff-unet" and data["architecture"] == "unet"
    config = network_config_from_dict(net.config.to_dict())
    assert config == net.config and isinstance(build_network(config), UNet)
    with pytest.raises(ValueError, match="model_type 'maskdiff-unet', expected 'maskdiff-transformer'"):
        Transformer.from_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="unknown network architecture 'mlp'"):
        network_config_from_dict({"architecture": "mlp"})


def test_chunked_loss_matches_full_logits():
    """MD4's memory-lean loss (head applied to masked positions only) gives the same values and
    gradients through the U-Net's hidden states as the full-logits reference."""
    x = torch.randint(0, V, (3, make_unet().seq_len), generator=torch.Generator().manual_seed(5))
    results = []
    for chunked in (True, False):
        net = make_unet(num_classes=2)
        model = MaskedDiffusion(net, get_schedule("linear"), "md4", chunked_loss=chunked)
        terms = model(x, generator=torch.Generator().manual_seed(3), labels=torch.tensor([0, 1, 2]))
        terms["loss"].backward()
        results.append((terms["nelbo"].detach(), net.conv_in.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_image_run_end_to_end_with_the_cli(tmp_path, capsys):
    """Train a class-conditional U-Net on the 8×8 digits, evaluate bits/dim, and write a
    class grid with its unmasking strip and an unconditional grid."""
    from maskdiff.cli import main
    from maskdiff.runs import load

    out = tmp_path / "digits-unet"
    sets = ["data.corpus=digits", "data.seq_len=64", "model.architecture=unet", "model.d_model=16",
            "model.n_heads=2", "model.unet_channel_mult=1,2", "model.unet_res_blocks=1", "train.steps=30",
            "train.batch_size=8", "train.eval_every=30", "train.save_every=30", "train.eval_batches=2",
            "train.log_every=5", "optim.warmup_steps=5", "train.num_threads=1"]
    args = ["train", "--preset", "mnist-md4", "--out", str(out), "--no-progress"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    assert json.loads((out / "network.json").read_text())["architecture"] == "unet"
    losses = [json.loads(line)["bits_per_token"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    assert losses[-1] < losses[0] - 1.0  # from 8 bits/dim (uniform over 256 levels) downwards
    run = load(out)
    assert isinstance(run.model.network, UNet) and run.model.network.num_classes == 10

    assert main(["eval", str(out), "--split", "test", "--max-chunks", "64", "--device", "cpu"]) == 0
    result = json.loads((out / "eval-test-n64.json").read_text())
    assert result["ci95"][0] < result["bits_per_token"] < result["ci95"][1] < 8.0

    grid = tmp_path / "classes.png"
    assert main(["sample", str(out), "--per-class", "1", "--steps", "8", "--guidance", "1", "--strip",
                 "--out", str(grid), "--device", "cpu"]) == 0
    assert grid.is_file() and grid.with_name("classes-strip.png").is_file()
    assert main(["sample", str(out), "--num", "4", "--steps", "8", "--out", str(tmp_path / "u.png"),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--num", "4", "--steps", "8", "--out", str(tmp_path / "u.png"),
                 "--device", "cpu"]) == 2
    assert "never overwritten" in capsys.readouterr().err
