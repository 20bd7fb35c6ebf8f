"""maskdiff.evaluate: the one evaluation loop — seeding, the per-sequence and token-weighted
estimates, score masks (zero-shot), the text/image dispatch and the all-reduce across ranks."""

import math

import numpy as np
import pytest
import torch

import maskdiff
from maskdiff.data import CharTokenizer, ImageSplits, TokenSplits
from maskdiff.evaluate import evaluate_batches, evaluate_images, evaluate_nelbo, evaluate_split
from maskdiff.metrics import LN2, eval_seed, mean_estimate
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import Transformer, TransformerConfig
from maskdiff.training.distributed import destroy_process_group

VOCAB, LENGTH = 50, 16


def small_random_model(method, vocab=VOCAB, seq_len=LENGTH, num_classes=0):
    """Small model with random (non-uniform) predictions (as tests/test_losses.py)."""
    torch.manual_seed(1)
    cfg = TransformerConfig(vocab_size=vocab, seq_len=seq_len, n_layers=1, d_model=32, n_heads=2,
                            causal=(method == "ar"), time_conditioning=(method != "ar"), num_classes=num_classes,
                            head_init="zero")  # the draws behind the stored zero-shot numbers
    schedule = maskdiff.get_schedule("genmd4", vocab_size=vocab) if method == "genmd4" else maskdiff.get_schedule(
        "cosine")
    model = MaskedDiffusion(Transformer(cfg), schedule, method)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def padded_sequences():
    """12 sequences (12, 16) scored like zero-shot "pad" rows: a run of tokens after position 0;
    rows 4-7 (one whole batch of 4) are scored everywhere, row 9 nowhere."""
    tokens = torch.randint(0, VOCAB, (12, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(12, LENGTH, dtype=torch.bool)
    for i, n in enumerate([3, 15, 7, 1, 16, 16, 16, 16, 12, 0, 5, 9]):
        mask[i, 1:1 + n] = True
        if n == LENGTH:
            mask[i] = True
    return tokens, mask


def masked_batches(tokens, mask, batch_size=4):
    return [(tokens[a:a + batch_size], None, mask[a:a + batch_size]) for a in range(0, len(tokens), batch_size)]


# Written by maskdiff.zeroshot.evaluate_sequences before the loss took score masks (commit b91f5c8)
# on padded_sequences() with batch_size=4, seed=3. Partly scored batches then went through full
# logits while the model uses its chunked head, hence the 1e-6 tolerance.
OLD_ZEROSHOT = {
    ("md4", None, 2): dict(nats_per_token=18.5783014660099, stderr_nats=3.373243874627693,
                           mc_stderr_nats=2.1851318005076155, diffusion=18.577519093351118,
                           reconstruction=0.0003912023076454402),
    ("md4", 10, 1): dict(nats_per_token=16.652939970829877, stderr_nats=2.6383821356692554,
                         diffusion=16.652157816200933, reconstruction=0.0003912023076454402),
    ("genmd4", None, 2): dict(nats_per_token=19.82674498616814, stderr_nats=2.00549881504095,
                              mc_stderr_nats=1.5753661482705896, diffusion=19.820689930998046,
                              reconstruction=0.0056638448280362606),
    ("ar", None, 1): dict(nats_per_token=4.37380157668015, stderr_nats=0.07111404852313749,
                          diffusion=4.37380157668015, reconstruction=0.0),
}


@pytest.mark.parametrize("method, num_steps, draws", list(OLD_ZEROSHOT))
def test_score_masks_reproduce_the_old_zeroshot_numbers(method, num_steps, draws):
    tokens, mask = padded_sequences()
    r = evaluate_batches(small_random_model(method), masked_batches(tokens, mask), seq_len=LENGTH,
                         num_time_draws=draws, num_steps=num_steps, seed=3)
    old = OLD_ZEROSHOT[(method, num_steps, draws)]
    assert r["n_sequences"] == 12 and r["n_scored_tokens"] == int(mask.sum()) == 116
    for key in ("nats_per_token", "stderr_nats", "mc_stderr_nats"):
        if key in old:
            assert r[key] == pytest.approx(old[key], rel=1e-6), key
    for key in ("diffusion", "reconstruction"):
        assert r["terms_nats_per_token"][key] == pytest.approx(old[key], rel=1e-6, abs=1e-12), key
    assert r["bits_per_token"] == pytest.approx(r["nats_per_token"] / LN2, rel=1e-14)
    assert r["perplexity"] == pytest.approx(math.exp(r["nats_per_token"]), rel=1e-12)
    lo, hi = r["ci95_nats"]
    assert r["perplexity_ci95"] == pytest.approx([math.exp(lo), math.exp(hi)], rel=1e-12)
    # Power: counting the unscored positions would give another figure.
    unmasked = evaluate_batches(small_random_model(method), [(x, None) for x, _, _ in masked_batches(tokens, mask)],
                                seq_len=LENGTH, num_time_draws=draws, num_steps=num_steps, seed=3)
    assert unmasked["nats_per_token"] != pytest.approx(old["nats_per_token"], rel=1e-3)


def test_per_sequence_figures_from_independent_draws():
    """With every position scored the fields are the per-sequence mean and its standard error over
    y_i, each batch k drawing from a generator seeded eval_seed(seed, k) (docs/math.md)."""
    model = small_random_model("md4")
    tokens = torch.randint(0, VOCAB, (10, LENGTH), generator=torch.Generator().manual_seed(4))
    batches = [(tokens[a:a + 4], None) for a in range(0, 10, 4)]
    r = evaluate_batches(model, batches, seq_len=LENGTH, num_time_draws=3, seed=7)
    y, within = [], []
    with torch.no_grad():
        for k, (x, _) in enumerate(batches):
            g = torch.Generator().manual_seed(eval_seed(7, k))
            draws = torch.stack([model(x, generator=g)["nelbo"].double() for _ in range(3)])
            y.append(draws.mean(0))
            within.append(draws.var(0) / 3)
    per_seq = mean_estimate(torch.cat(y)).scaled(1 / (LENGTH * LN2))
    assert r["bits_per_token"] == pytest.approx(per_seq.mean, rel=1e-12)
    assert r["stderr"] == pytest.approx(per_seq.stderr, rel=1e-9)
    assert r["ci95"] == pytest.approx(list(per_seq.ci95), rel=1e-9)
    assert r["mc_stderr"] == pytest.approx(math.sqrt(torch.cat(within).sum()) / 10 / (LENGTH * LN2), rel=1e-9)
    assert r["n_scored_tokens"] == 10 * LENGTH and r["n_sequences"] == 10


def test_a_full_score_mask_is_no_mask_and_zeroshot_uses_the_loop():
    from maskdiff.apps import zeroshot as zs

    model = small_random_model("md4")
    tokens, _ = padded_sequences()
    full = torch.ones_like(tokens, dtype=torch.bool)
    plain = evaluate_batches(model, [(x, None) for x, _, _ in masked_batches(tokens, full)], seq_len=LENGTH, seed=2)
    masked = evaluate_batches(model, masked_batches(tokens, full), seq_len=LENGTH, seed=2)
    assert masked == plain
    tokens, mask = padded_sequences()
    seqs = zs.ZeroShotSequences(tokens.numpy().astype(np.int32), mask.numpy(), "pad", 12)
    via_zeroshot = zs.evaluate_sequences(model, seqs, batch_size=4, num_time_draws=2, seed=3)
    direct = evaluate_batches(model, masked_batches(tokens, mask), seq_len=LENGTH, num_time_draws=2, seed=3)
    assert via_zeroshot == direct


def test_evaluate_split_dispatches_on_the_data():
    model = small_random_model("md4", vocab=27)
    stream = np.random.default_rng(0).integers(0, 27, 2000).astype(np.uint8)
    text = TokenSplits("t", 27, CharTokenizer(), stream[:1000], stream[1000:1500], stream[1500:])
    r = evaluate_split(model, text, "validation", batch_size=8, max_n=20, seed=1, device="cpu")
    ref = evaluate_nelbo(model, text.validation, seq_len=LENGTH, batch_size=8, max_chunks=20, seed=1)
    assert r == ref and r["n_sequences"] == 20

    conditional = small_random_model("md4", vocab=4, num_classes=3)
    rng = np.random.default_rng(1)
    px = [rng.integers(0, 4, (n, LENGTH)).astype(np.uint8) for n in (10, 6, 7)]
    labels = [rng.integers(0, 3, n).astype(np.int64) for n in (10, 6, 7)]
    images = ImageSplits("im", (4, 4, 1), 4, 3, *px, *labels)
    r = evaluate_split(conditional, images, "test", batch_size=4, seed=2, device="cpu", num_time_draws=2)
    ref = evaluate_images(conditional, images.test, images.test_labels, batch_size=4, seed=2, num_time_draws=2)
    assert r == ref and r["n_sequences"] == 7
    unlabelled = evaluate_images(conditional, images.test, None, batch_size=4, seed=2, num_time_draws=2)
    assert unlabelled["nats_per_token"] != r["nats_per_token"]  # the labels were passed
    with pytest.raises(TypeError, match="TokenSplits or ImageSplits"):
        evaluate_split(model, stream, "test", batch_size=8, device="cpu")


def _two_ranks(rank, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    tokens, mask = padded_sequences()
    r = evaluate_batches(small_random_model("md4"), masked_batches(tokens[:11], mask[:11], 3), seq_len=LENGTH,
                         num_time_draws=2, seed=3, rank=rank, world_size=2)
    torch.save(r, f"{out}-{rank}.pt")
    # The library's teardown (barrier first): a rank that destroys its gloo group while the
    # other still talks to it can abort that rank ("terminate called without an active exception").
    destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_give_the_one_process_result(tmp_path):
    """Ranks evaluate alternate batches (of unequal sizes) and all-reduce the per-sequence
    statistics: every rank reports exactly the single-process figures."""
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), str(tmp_path / "r")), nprocs=2, join=True)
    tokens, mask = padded_sequences()
    single = evaluate_batches(small_random_model("md4"), masked_batches(tokens[:11], mask[:11], 3),
                              seq_len=LENGTH, num_time_draws=2, seed=3)
    for rank in range(2):
        assert torch.load(tmp_path / f"r-{rank}.pt") == single


def test_bad_batches_raise():
    model = small_random_model("md4")
    x = torch.zeros(2, LENGTH, dtype=torch.long)
    with pytest.raises(ValueError, match="num_time_draws"):
        evaluate_batches(model, [(x, None)], seq_len=LENGTH, num_time_draws=0)
    with pytest.raises(ValueError, match=r"\(x, labels\) or \(x, labels, score_mask\)"):
        evaluate_batches(model, [(x,)], seq_len=LENGTH)
    with pytest.raises(ValueError, match="zero"):  # nothing scored at all
        evaluate_batches(model, [(x, None, torch.zeros_like(x, dtype=torch.bool))], seq_len=LENGTH)
