"""Tests for the denoiser network (maskdiff.networks)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from maskdiff.networks import (
    CONFIG_NAME,
    MODEL_PRESETS,
    WEIGHTS_NAME,
    Transformer,
    TransformerConfig,
    model_preset,
)

V, L = 16, 12


@pytest.fixture(autouse=True)
def single_thread():
    """The models here are tiny: one intra-op thread is fastest and avoids OpenMP threads
    spinning against each other when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(**overrides) -> TransformerConfig:
    base = dict(
        vocab_size=V, seq_len=L, n_layers=2, d_model=32, n_heads=4, cond_dim=16, time_embed_dim=16
    )
    return TransformerConfig(**{**base, **overrides})


def make_model(seed: int = 0, perturb: bool = True, **overrides) -> Transformer:
    """A small model; ``perturb`` replaces the zero-initialised tensors (head, modulations) by
    small random values so that the output depends on the input at all."""
    torch.manual_seed(seed)
    model = Transformer(make_config(**overrides))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0.0, 0.2)
    return model.eval()


def tokens(batch: int = 3, length: int = L, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V + 1, (batch, length), generator=g)  # includes the mask id V


# ----------------------------------------------------------------------------------------------
# Shapes, dtypes, initialisation


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_output_shape_and_dtype(time_conditioning):
    model = make_model(time_conditioning=time_conditioning)
    z, t = tokens(), torch.rand(3)
    out = model(z, t)
    assert out.shape == (3, L, V) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(z, t).dtype == torch.bfloat16
    assert model.to(torch.bfloat16)(z, t).dtype == torch.bfloat16


def test_attributes():
    model = make_model(time_conditioning=False)
    assert model.vocab_size == V and model.mask_id == V and model.time_conditioning is False
    assert model.tok_emb.num_embeddings == V + 1
    assert make_model(time_conditioning=True).time_conditioning is True


@pytest.mark.parametrize(
    "overrides", [{}, {"time_conditioning": False}, {"tie_embeddings": True}, {"causal": True}]
)
def test_initial_prediction_is_uniform(overrides):
    """head_init="zero" (maskdiff 0.1/0.2): the first prediction is exactly uniform."""
    model = make_model(perturb=False, head_init="zero", **overrides)
    out = model(tokens(), torch.rand(3))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(
    "overrides", [{}, {"time_conditioning": False}, {"tie_embeddings": True}, {"causal": True}]
)
def test_default_head_starts_with_unit_scale_logits(overrides):
    """The default head (variance 1/d_model on unit-RMS hidden states) gives logits of standard
    deviation ≈ 1 (a tied head: the embedding's 0.02 scale), and they depend on the input."""
    model = make_model(perturb=False, **overrides)
    z = tokens()
    out = model(z, torch.rand(3))
    low, high = (0.5 * 0.02 * 32 ** 0.5, 2 * 0.02 * 32 ** 0.5) if overrides.get("tie_embeddings") else (0.7, 1.3)
    assert low < out.std().item() < high
    assert not torch.equal(out[0], out[1])


def test_init_statistics():
    torch.manual_seed(0)
    model = Transformer(make_config(d_model=256, n_heads=4, n_layers=8))
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 2e-3
    assert abs(model.blocks[0].attn.proj.weight.std().item() - 0.02 / 4) < 1e-3  # 1/sqrt(2*8)
    assert abs(model.head.weight.std().item() - 256 ** -0.5) < 3e-3 and not model.blocks[0].modulation.weight.any()
    assert not Transformer(make_config(d_model=256, n_heads=4, n_layers=8, head_init="zero")).head.weight.any()


def test_adaln_zero_blocks_start_as_identity():
    torch.manual_seed(0)
    model = Transformer(make_config(time_conditioning=True)).eval()
    z = tokens()
    x = model.tok_emb(z)
    block = model.blocks[0]
    from maskdiff.networks.transformer import rope_tables

    cos, sin = rope_tables(L, model.config.head_dim, model.config.rope_base, z.device)
    c = model.time_embed(torch.rand(3))
    assert torch.equal(block(x, cos, sin, c), x)


# ----------------------------------------------------------------------------------------------
# Attention pattern, time dependence, lengths


def test_bidirectional_attention_sees_later_tokens():
    model = make_model(time_conditioning=False)
    z = tokens()
    z2 = z.clone()
    z2[:, -1] = (z[:, -1] + 1) % (V + 1)
    out, out2 = model(z), model(z2)
    assert not torch.allclose(out[:, 0], out2[:, 0])


def test_causal_attention_ignores_later_tokens():
    model = make_model(time_conditioning=False, causal=True)
    z = tokens()
    z2 = z.clone()
    z2[:, -1] = (z[:, -1] + 1) % (V + 1)
    out, out2 = model(z), model(z2)
    torch.testing.assert_close(out[:, :-1], out2[:, :-1], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, -1], out2[:, -1])


def test_time_agnostic_model_ignores_t():
    model = make_model(time_conditioning=False)
    z = tokens()
    out = model(z)
    assert torch.equal(model(z, torch.full((3,), 0.1)), out)
    assert torch.equal(model(z, torch.full((3,), 0.9)), out)
    assert not any("modulation" in name or "time" in name for name, _ in model.named_parameters())


def test_time_conditioned_model_depends_on_t():
    model = make_model(time_conditioning=True)
    z = tokens()
    out1, out2 = model(z, torch.full((3,), 0.1)), model(z, torch.full((3,), 0.9))
    assert not torch.allclose(out1, out2)
    # A scalar t is broadcast over the batch.
    torch.testing.assert_close(model(z, 0.1), out1)
    # Each sequence uses its own t.
    t = torch.tensor([0.1, 0.9, 0.1])
    torch.testing.assert_close(model(z, t)[1], out2[1])


def test_variable_length_inputs():
    model = make_model(time_conditioning=True)
    for length in (1, 5, L):
        assert model(tokens(length=length), torch.rand(3)).shape == (3, length, V)
    # Causal: a prefix is processed exactly as inside the longer sequence (no padding needed).
    causal = make_model(time_conditioning=False, causal=True)
    z = tokens()
    torch.testing.assert_close(causal(z[:, :5]), causal(z)[:, :5], rtol=1e-5, atol=1e-6)


def test_rotary_positions_matter():
    """Attention alone is permutation-equivariant; RoPE must break that."""
    model = make_model(time_conditioning=False)
    z = torch.full((1, L), 3)
    z[0, 0] = 5
    out = model(z)
    # Positions 1.. all hold token 3 but see token 5 at different distances.
    assert not torch.allclose(out[0, 1], out[0, L - 1])


def test_tied_embeddings():
    model = make_model(tie_embeddings=True)
    assert model.head is None
    assert model.num_parameters() == model.num_parameters(non_embedding=True) + (V + 1) * 32
    assert model(tokens(), torch.rand(3)).shape == (3, L, V)


def test_dropout_only_in_training():
    model = make_model(time_conditioning=False, dropout=0.5)
    z = tokens()
    assert torch.equal(model(z), model(z))
    model.train()
    assert not torch.equal(model(z), model(z))


# ----------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_raise_clear_errors():
    model = make_model(time_conditioning=True)
    t = torch.rand(3)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        model(torch.full((3, 4), V + 1), t)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        model(torch.full((3, 4), -1), t)
    with pytest.raises(ValueError, match="exceeds the model's seq_len"):
        model(tokens(length=L + 1), t)
    with pytest.raises(ValueError, match="time-conditioned"):
        model(tokens())
    with pytest.raises(ValueError, match="shape"):
        model(tokens(), torch.rand(2))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.zeros(3, dtype=torch.long), t)
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(3, 4), t)
    # Narrow integer dtypes are accepted.
    z = tokens()
    torch.testing.assert_close(model(z.to(torch.uint8), t), model(z, t))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"d_model": 30, "n_heads": 4}, "divisible"),
        ({"d_model": 12, "n_heads": 4}, "even head dimension"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_layers": 2.0}, "n_layers"),
    ],
)
def test_bad_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(**overrides)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = make_config(causal=True, mlp_hidden=40)
    assert TransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown.*n_layer.*valid keys.*n_layers"):
        TransformerConfig.from_dict({**cfg.to_dict(), "n_layer": 3})
    with pytest.raises(ValueError, match="needs key"):
        TransformerConfig.from_dict({"vocab_size": 5})


def test_presets_and_accounting():
    assert {"md4-s", "md4-m"} <= set(MODEL_PRESETS)
    s = model_preset("md4-s")
    assert (s.n_layers, s.d_model, s.n_heads, s.seq_len, s.vocab_size) == (12, 768, 12, 1024, 50257)
    assert s.hidden_dim == 2048
    m = model_preset("md4-m", time_conditioning=False)
    assert (m.n_layers, m.d_model, m.n_heads, m.time_conditioning) == (24, 1024, 16, False)
    assert m.hidden_dim % 8 == 0
    with pytest.raises(ValueError, match="unknown model preset"):
        model_preset("md4-xl")

    model = make_model(time_conditioning=False)
    cfg = model.config
    n = model.num_parameters(non_embedding=True)
    assert model.num_parameters() == n + (V + 1) * cfg.d_model + V * cfg.d_model
    expected = 6 * n + 6 * cfg.d_model * V + 12 * cfg.n_layers * cfg.d_model * 8
    assert model.flops_per_token(8) == expected


# ----------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True, "time_conditioning": False}])
def test_save_load_round_trip(tmp_path, monkeypatch, overrides):
    model = make_model(**overrides)
    z, t = tokens(), torch.rand(3)
    expected = model(z, t)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == [CONFIG_NAME, WEIGHTS_NAME]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("from_pretrained must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    loaded = Transformer.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded(z, t), expected)


def test_save_overwrites_atomically(tmp_path):
    make_model(seed=0).save_pretrained(tmp_path)
    model = make_model(seed=1)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    z, t = tokens(), torch.rand(3)
    assert torch.equal(Transformer.from_pretrained(tmp_path)(z, t), model(z, t))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")
    make_model().save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / "other.bin")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "other.bin").rename(tmp_path / WEIGHTS_NAME)

    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "d_model": 64}))
    with pytest.raises(ValueError, match="does not match"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(ValueError, match="missing blocks.2"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "bogus": 1}))
    with pytest.raises(ValueError, match="unknown TransformerConfig key"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Transformer.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------
# Learning


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_overfits_a_fixed_batch(time_conditioning):
    """Masked-token cross-entropy on one fixed batch must fall by more than half in 100 steps.

    Each masked target depends on its sequence (seen only through attention to the unmasked
    tokens) and on its position (seen only through RoPE), so this checks both paths learn.
    """
    torch.manual_seed(0)
    model = Transformer(make_config(time_conditioning=time_conditioning, d_model=64))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (8, L), generator=g)
    masked = torch.rand(8, L, generator=g) < 0.5
    z = torch.where(masked, V, x)
    t = torch.full((8,), 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn() -> torch.Tensor:
        logits = model(z, t).float()
        return F.cross_entropy(logits[masked], x[masked])

    initial = loss_fn().item()
    for _ in range(100):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.5 * initial
