"""Every registered sampler keeps the interface's promises (maskdiff.sampling.base).

The tests iterate over the registry, so a sampler added later is checked too: it terminates with
no mask left, never changes a fixed token (prompt, suffix, infilling positions), is deterministic
given a generator, says whether it is exact and what it preserves, and its network calls are
counted (SampleInfo agrees with the calls the denoiser saw). Unknown names and options, and bad
option values, are one-line errors. Option values given as text are converted by their types.
Finally ``maskdiff sample --sampler first-hitting`` runs on the golden run folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch

import maskdiff
from maskdiff.sampling import (
    FREE,
    Sampler,
    UnknownOption,
    get_sampler,
    make_fixed,
    sample,
    sampler_class,
    sampler_names,
)

V, L, B = 6, 12, 4
GOLDEN = Path(__file__).resolve().parent / "data" / "golden-run"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Net:
    """A fixed random, time-dependent denoiser that counts its calls and rows."""

    time_conditioning = True

    def __init__(self, seed: int = 0):
        g = gen(seed)
        self.emb = torch.randn(V + 1, V, generator=g)
        self.pos = torch.randn(L, V, generator=g)
        self.time = torch.randn(V, generator=g)
        self.calls = self.rows = 0

    def __call__(self, z, t):
        self.calls += 1
        self.rows += z.shape[0]
        ctx = self.emb[z].mean(1, keepdim=True)  # (B, 1, V): the whole sequence matters
        return 2.0 * (self.emb[z] + ctx + self.pos[: z.shape[1]] + t[:, None, None] * self.time)


def schedules():
    return {"linear": maskdiff.get_schedule("linear"), "genmd4": maskdiff.get_schedule("genmd4", vocab_size=V,
                                                                                       init_exponent=1.5)}


def fixed_rows() -> torch.Tensor:
    """A prompt, a suffix and two infilling positions, different per row."""
    fixed = make_fixed(L, prefix=torch.tensor([[1, 2], [3, 4], [5, 0], [1, 1]]), suffix=[2, 3],
                       positions={5: 4}, batch_size=B).clone()
    fixed[1, 7] = 0  # one more fixed token in row 1 only
    return fixed


def runs_on(name: str, schedule) -> bool:
    try:
        sampler_class(name)().check_schedule(schedule)
    except ValueError:
        return False
    return True


CASES = [(name, sched) for name in sampler_names() for sched in ("linear", "genmd4")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registry_names_and_labels():
    names = sampler_names()
    assert names[:2] == ("ancestral", "mean") and {"first-hitting", "genmd4-exact"} <= set(names)
    assert len(set(names)) == len(names)
    for name in names:
        cls = sampler_class(name)
        assert issubclass(cls, Sampler) and cls.name == name
        assert isinstance(cls.exact, bool)
        for text in (cls.preserves, cls.calls):
            assert isinstance(text, str) and text.strip() and "\n" not in text
        assert name in cls.describe()
    exact = {name for name in names if sampler_class(name).exact}
    assert {"ancestral", "mean", "first-hitting", "genmd4-exact"} <= exact


@pytest.mark.parametrize("name,sched_name", CASES)
def test_every_sampler_fills_every_free_position_and_keeps_fixed_tokens(name, sched_name):
    sched = schedules()[sched_name]
    if not runs_on(name, sched):
        # A sampler that does not run on this schedule must refuse it with a one-line error.
        with pytest.raises(ValueError) as refused:
            sample(Net(), sched, batch_size=B, length=L, vocab_size=V, num_steps=6, sampler=name)
        message = str(refused.value)
        assert "\n" not in message and "schedule" in message, message
        return
    fixed = fixed_rows()
    runs = []
    for _ in range(2):
        net = Net()
        x, info = sample(net, sched, batch_size=B, length=L, vocab_size=V, num_steps=6, sampler=name, fixed=fixed,
                         generator=gen(5), return_info=True, record_every=2)
        runs.append((x, info, net))
    (x, info, net), (x2, _, _) = runs
    assert x.shape == (B, L) and x.dtype == torch.long
    assert bool(((x >= 0) & (x < V)).all())  # no mask left
    keep = fixed != FREE
    assert torch.equal(x[keep], fixed[keep])  # fixed tokens never change
    assert torch.equal(x, x2)  # deterministic given the generator
    assert info.sampler == name
    assert (info.denoiser_calls, info.denoiser_rows) == (net.calls, net.rows)  # calls counted
    assert net.calls >= 1 and info.nfe_per_sample == net.rows / B
    assert info.num_masked.shape[1] == B and info.num_masked[-1].sum() >= 0
    assert torch.equal(info.num_masked[0], (fixed == FREE).sum(1))
    # Another seed gives other samples (the generator is used).
    y = sample(Net(), sched, batch_size=B, length=L, vocab_size=V, num_steps=6, sampler=name, fixed=fixed,
               generator=gen(6))
    assert not torch.equal(x, y)


@pytest.mark.parametrize("name", sampler_names())
def test_every_sampler_with_progress_float32_and_an_object(name, capsys):
    sched = maskdiff.get_schedule("cosine")
    kw = dict(batch_size=2, length=L, vocab_size=V, num_steps=5)
    x = sample(Net(), sched, sampler=name, generator=gen(1), progress=True, precision="float32", **kw)
    assert bool((x < V).all())
    assert "sampling" in capsys.readouterr().err
    by_name = sample(Net(), sched, sampler=name, generator=gen(2), **kw)
    obj = sampler_class(name)()
    assert torch.equal(sample(Net(), sched, sampler=obj, generator=gen(2), **kw), by_name)
    assert torch.equal(obj(Net(), sched, generator=gen(2), **kw), by_name)


def one_line_error(exc_type, fn):
    with pytest.raises(exc_type) as err:
        fn()
    assert "\n" not in str(err.value) and str(err.value)
    return str(err.value)


def test_unknown_names_and_options_are_one_line_errors():
    kw = dict(batch_size=1, length=4, vocab_size=V, num_steps=2)
    sched = maskdiff.get_schedule("linear")
    msg = one_line_error(ValueError, lambda: sample(Net(), sched, sampler="greedy", **kw))
    assert "greedy" in msg and "first-hitting" in msg
    msg = one_line_error(TypeError, lambda: sample(Net(), sched, sampler="first-hitting", tau=0.5, **kw))
    assert "tau" in msg and "first-hitting" in msg
    one_line_error(UnknownOption, lambda: sample(Net(), sched, sampler=sampler_class("ancestral")(), bogus=1, **kw))
    for name in sampler_names():  # every option refuses a value of the wrong type, in one line
        for option in sampler_class(name)().options():
            one_line_error(ValueError, lambda: get_sampler(name, {option: "not a valid value"}))
    one_line_error(ValueError, lambda: get_sampler("genmd4-exact", {"proposals": "sometimes"}))
    one_line_error(ValueError, lambda: sample(Net(), maskdiff.get_schedule("genmd4", vocab_size=V),
                                              sampler="first-hitting", **kw))


@dataclass(frozen=True)
class Knobs(Sampler):
    """A sampler with one option of every kind, to test the conversions of the base class."""

    name: ClassVar[str] = "knobs"
    preserves: ClassVar[str] = "nothing"
    calls: ClassVar[str] = "none"

    tau: float = field(default=0.5, metadata={"help": "a threshold"})
    k: int = 3
    flag: bool = False
    mode: Literal["cap", "loop"] = "cap"
    limit: int | None = None

    def validate(self) -> None:
        self.require(0 < self.tau <= 1, f"tau must lie in (0, 1], got {self.tau}")


def test_options_are_converted_from_text_and_checked():
    knobs = Knobs.from_options({"tau": "0.25", "k": "7", "flag": "true", "mode": "loop", "limit": "none"})
    assert knobs.options() == {"tau": 0.25, "k": 7, "flag": True, "mode": "loop", "limit": None}
    assert Knobs.from_options({"limit": "4", "tau": 1}).options()["limit"] == 4
    assert isinstance(Knobs(tau=1).tau, float)
    for bad in ({"tau": "x"}, {"k": "1.5"}, {"k": 2.0}, {"flag": "maybe"}, {"mode": "rescale"}, {"limit": "x"},
                {"tau": 2.0}):
        msg = one_line_error(ValueError, lambda bad=bad: Knobs.from_options(bad))
        assert msg.startswith("sampler 'knobs'")
    assert "tau: float, default 0.5: a threshold" in Knobs.describe()
    one_line_error(UnknownOption, lambda: Knobs.from_options({"sigma": 1}))


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    copy = tmp_path_factory.mktemp("golden") / "run"
    shutil.copytree(GOLDEN, copy)
    return copy


def test_cli_sample_first_hitting_on_the_golden_run(golden, tmp_path, capsys):
    from maskdiff.cli import main

    out = tmp_path / "fh.jsonl"
    assert main(["sample", str(golden), "--sampler", "first-hitting", "--num", "3", "--prompt", "the ",
                 "--out", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["sampler"] == "first-hitting" and row["text"].startswith("the ") and len(row["text"]) == 32
    # The options reach the sampler through the generic --sampler-option mechanism.
    out2 = tmp_path / "g.jsonl"
    assert main(["sample", str(golden), "--sampler", "genmd4-exact", "--sampler-option", "proposals=envelope",
                 "--num", "2", "--out", str(out2), "--device", "cpu"]) == 0
    row = json.loads(out2.read_text().splitlines()[0])
    assert row["sampler_options"] == {"proposals": "envelope"} and row["network_calls_per_sample"] == 32


def test_cli_sampler_options_help_and_errors(golden, capsys):
    from maskdiff.cli import main

    assert main(["sample", str(golden), "--sampler", "genmd4-exact", "--sampler-option", "help"]) == 0
    assert "proposals" in capsys.readouterr().out
    for args in (["--sampler-option", "bogus=1"], ["--sampler-option", "novalue"],
                 ["--sampler", "genmd4-exact", "--sampler-option", "proposals=sometimes"],
                 ["--block-length", "0"]):
        assert main(["sample", str(golden), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(golden), "--sampler", "greedy"])
    assert exit_.value.code == 2


def test_cli_samplers_on_an_image_run(tmp_path, capsys):
    """`maskdiff sample --sampler first-hitting` (and an approximate one) writes an image grid."""
    from maskdiff.cli import main

    run = tmp_path / "digits"
    sets = ["data.corpus=digits", "data.seq_len=64", "model.architecture=unet", "model.d_model=16",
            "model.n_heads=2", "model.unet_channel_mult=1,2", "model.unet_res_blocks=1", "train.steps=2",
            "train.batch_size=8", "train.eval_every=0", "train.save_every=2", "train.num_threads=1"]
    assert main(["train", "--preset", "mnist-md4", "--out", str(run), "--no-progress",
                 *[a for item in sets for a in ("--set", item)]]) == 0
    for name in ("first-hitting", "confidence"):
        out = tmp_path / f"{name}.png"
        assert main(["sample", str(run), "--sampler", name, "--per-class", "1", "--steps", "8", "--out", str(out),
                     "--device", "cpu"]) == 0
        assert out.stat().st_size > 0
