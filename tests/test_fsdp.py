"""FSDP2 (``train.parallel=fsdp``) on the CPU with two gloo processes under torchrun.

One torchrun launch trains, in four phases (each a new Trainer, as in separate launches):

1. ``straight``: 4 steps under FSDP, with validation at steps 2 and 4 (3 evaluation batches over
   2 ranks: the ranks make unequal numbers of forward passes unless evaluation pads them);
2. ``half``: 2 steps under FSDP, saved, trainer dropped (a copy is kept as ``half-ddp``);
3. ``half`` resumed under FSDP to step 4;
4. ``accum``: 4 steps under FSDP accumulating 2 micro-batches per rank (gradient sync off for the
   first one);
5. ``half-ddp`` resumed under DDP to step 4.

The tests compare them with each other and with one process accumulating 2 (or 4) micro-batches,
which computes the same steps (see :mod:`maskdiff.training.streams`), and check that the run loads,
evaluates and samples on one process.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import maskdiff
from maskdiff.checkpoint import latest_checkpoint
from maskdiff.config import apply_overrides, get_preset
from maskdiff.data import TokenSplits, load_corpus
from maskdiff.evaluate import evaluate_nelbo
from maskdiff.networks import Transformer
from maskdiff.runs import load
from maskdiff.training import Trainer

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed / gloo backend",
)

# Tiny and fast. GenMD4 so that the learned schedule (a vector of 27 = 14 + 13: unevenly
# sharded) is trained too; validation every 2 steps on 3 batches of 8 sequences.
TINY = [
    "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "data.seq_len=32",
    "diffusion.method=genmd4", "train.batch_size=8", "train.steps=4", "train.log_every=1",
    "train.eval_every=2", "train.eval_batches=3", "train.save_every=0", "optim.warmup_steps=2",
    "optim.lr=3e-3", "optim.ema_decay=0.9", "train.num_threads=1",
]
SEED = 0
TOKENS = (200_000, 20_000, 20_000)  # train / validation / test characters used

SCRIPT = textwrap.dedent(
    """
    import shutil, sys
    from pathlib import Path
    from maskdiff.config import apply_overrides, get_preset
    from maskdiff.data import TokenSplits, load_corpus
    from maskdiff.training import Trainer

    root, overrides, sizes = Path(sys.argv[1]), sys.argv[3:], [int(n) for n in sys.argv[2].split(",")]
    full = load_corpus("wiki-char")
    data = TokenSplits(name="w", vocab_size=27, tokenizer=full.tokenizer, train=full.train[:sizes[0]],
                       validation=full.validation[:sizes[1]], test=full.test[:sizes[2]])

    def config(*extra):
        return apply_overrides(get_preset("demo"), overrides + list(extra))

    def fit(cfg, out, resume=False):
        trainer = Trainer(cfg, out, resume=resume, progress=False, data=data)
        assert trainer.fsdp == (cfg.train.parallel == "fsdp") and (trainer.ddp is None) == trainer.fsdp
        trainer.fit()
        return trainer

    # One process group for all phases: each trainer finds it initialised and uses it. (Closing
    # a trainer destroys the group; initialising a new one from the same torchrun store in the
    # same process can then fail to connect, gloo reading the previous group's addresses.)
    fsdp = config("train.parallel=fsdp")
    fit(fsdp, root / "straight")
    trainer = Trainer(fsdp, root / "half", progress=False, data=data)
    assert trainer.fsdp and trainer.ddp is None
    for _ in range(2):
        trainer.train_step()
    trainer.save()
    if trainer.dist.is_main:
        shutil.copytree(root / "half", root / "half-ddp")
    del trainer
    fit(fsdp, root / "half", resume=True)
    fit(config("train.parallel=fsdp", "train.grad_accum=2"), root / "accum")
    last = fit(config("train.parallel=ddp"), root / "half-ddp", resume=True)
    last.close()  # releases the process group
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data():
    full = load_corpus("wiki-char")
    n_train, n_val, n_test = TOKENS
    return TokenSplits(name="w", vocab_size=full.vocab_size, tokenizer=full.tokenizer, train=full.train[:n_train],
                       validation=full.validation[:n_val], test=full.test[:n_test])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """The four torchrun phases (2 processes) and the one-process accumulation run."""
    root = tmp_path_factory.mktemp("fsdp")
    script = root / "fsdp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         f"--master_port={_free_port()}", str(script), str(root), ",".join(map(str, TOKENS)), *TINY],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for accum, name in ((2, "single"), (4, "single-accum4")):
        cfg = apply_overrides(get_preset("demo"), TINY + [f"train.grad_accum={accum}", "train.parallel=fsdp"])
        trainer = Trainer(cfg, root / name, progress=False, data=data)
        try:
            assert not trainer.fsdp and trainer.ddp is None  # one process: train.parallel has no effect
            trainer.fit()
        finally:
            trainer.close()
    return root


def _weights(run: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / f"{name}.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _validation(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["bits_per_token"] for r in rows if r["split"] == "validation"}


def test_config_rejects_unknown_parallel_mode():
    with pytest.raises(ValueError, match=r"train\.parallel must be one of ddp, fsdp, got 'zero'"):
        apply_overrides(get_preset("demo"), ["train.parallel=zero"])


@pytest.mark.slow
def test_two_process_fsdp_matches_single_process_accumulation(runs):
    for fsdp, single, accum in (("straight", "single", 2), ("accum", "single-accum4", 4)):
        for name in ("model", "ema"):
            worst = _max_diff(_weights(runs / fsdp, name), _weights(runs / single, name))
            print(f"fsdp 2 proc × accum {accum // 2} vs 1 proc × accum {accum}, {name}: max |Δweight| = {worst:.3g}")
            # Same data, same draws; only the order of float additions differs.
            assert worst < 1e-5, (fsdp, name, worst)
    a = _weights(runs / "straight")
    assert max(a[k].abs().max().item() for k in a if "head" in k) > 1e-4, "the head starts at zero"
    assert (a["schedule.phi"] - a["schedule.phi"][0]).abs().max() > 0, "GenMD4's schedule was trained"
    # Validation (EMA weights, split over the ranks) ran at steps 2 and 4; its value is checked
    # exactly against one process in test_fsdp_run_loads_evaluates_and_samples_on_one_process
    # (the accumulation run evaluates other batches: micro-batch size 4, not 8).
    val = _validation(runs / "straight")
    assert sorted(val) == [2, 4] and all(3.0 < v < 5.0 for v in val.values()), val


@pytest.mark.slow
def test_fsdp_checkpoints_have_the_single_process_format(runs):
    fsdp, single = latest_checkpoint(runs / "straight"), latest_checkpoint(runs / "single")
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in single.iterdir())
    a = torch.load(fsdp / "optimizer.pt", weights_only=True)
    b = torch.load(single / "optimizer.pt", weights_only=True)
    assert sorted(a["state"]) == sorted(b["state"]) == list(range(len(b["state"])))  # keyed by position
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    for i in b["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for key, value in b["state"][i].items():
            assert a["state"][i][key].shape == value.shape and not hasattr(a["state"][i][key], "placements")
    assert json.loads((fsdp / "state.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_fsdp_checkpoint_round_trip(runs):
    straight_model, straight_ema = _weights(runs / "straight"), _weights(runs / "straight", "ema")
    # FSDP: 2 steps, save, resume 2 more = 4 straight.
    resumed = _max_diff(_weights(runs / "half"), straight_model)
    resumed_ema = _max_diff(_weights(runs / "half", "ema"), straight_ema)
    print(f"fsdp 2+2 resumed vs 4 straight: max |Δweight| = {resumed:.3g}, EMA {resumed_ema:.3g}")
    assert resumed < 1e-6 and resumed_ema < 1e-6
    # The same FSDP checkpoint resumed under DDP.
    ddp = _max_diff(_weights(runs / "half-ddp"), straight_model)
    print(f"fsdp 2 + ddp 2 resumed vs fsdp 4 straight: max |Δweight| = {ddp:.3g}")
    assert ddp < 1e-5
    state = json.loads((latest_checkpoint(runs / "half") / "state.json").read_text())
    assert state["step"] == 4 and state["ema_updates"] == 4


@pytest.mark.slow
def test_fsdp_run_loads_evaluates_and_samples_on_one_process(runs, data):
    run = load(runs / "straight")
    assert run.step == 4 and run.weights == "ema"
    ema = _weights(runs / "straight", "ema")
    loaded = dict(run.model.named_parameters())
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    # One process reproduces the validation that the two FSDP ranks computed together at step 4
    # (the trainer's settings: batches of 8, 3 batches, the run seed).
    result = evaluate_nelbo(run.model, data.validation, seq_len=32, batch_size=8, max_chunks=24, seed=SEED)
    logged = _validation(runs / "straight")[4]
    print(f"validation at step 4: 2-rank FSDP {logged:.6f}, one process {result['bits_per_token']:.6f}")
    assert abs(result["bits_per_token"] - logged) < 1e-5
    # The end-of-training denoiser (gathered from the shards) is the EMA network.
    net = Transformer.from_pretrained(runs / "straight" / "pretrained")
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, ema["network." + name]), name
    tokens = maskdiff.sample(run.model.denoiser, run.model.schedule, batch_size=2, length=16, vocab_size=27,
                             num_steps=8, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 16) and int(tokens.min()) >= 0 and int(tokens.max()) < 27
