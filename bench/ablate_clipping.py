"""Why does MD4 train worse without gradient clipping than the authors' code? An ablation (issue 18).

Each variant changes one thing about the demo-shaped MD4 (3 layers × 128, seq 128, batch 64,
600 steps, lr 2e-3, 100 warm-up steps then cosine) and trains it with the library trainer, then
evaluates the test split with raw weights and 4 time draws per sequence (``maskdiff eval RUN
--split test --weights raw --draws 4``). Variants are applied from here, without touching the
library: network options through ``TransformerConfig`` fields, initialisations by re-initialising
the built network under the run's model seed, optimiser changes by patching the trainer module.

    # one job per (variant, seed); results land in OUT/<variant>-s<seed>/result.json
    python bench/ablate_clipping.py train --variants base,fanin --seeds 0 --out /tmp/ablate
    # per-step speed of each variant against ``base``, interleaved in one process
    python bench/ablate_clipping.py speed --variants base,fixed --steps 20
    # the table of everything under OUT
    python bench/ablate_clipping.py table --out /tmp/ablate
    # gradient norms of the network body over the first steps, zero head against fan-in head
    python bench/ablate_clipping.py grads --grad-steps 100

``--clip`` sets the recipe: ``none`` (default: ``optim.grad_clip=0 optim.ema_decay=0``, the
reference's recipe) or ``demo`` (the demo preset's clipping 1.0 and EMA 0.995).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import maskdiff.build as build_mod
import maskdiff.training.trainer as trainer_mod
from maskdiff.config import apply_overrides, get_preset

# the 0.2 network, pinned (TransformerConfig's defaults may change)
OLD_NETWORK: dict[str, Any] = dict(mlp="swiglu", norm="rms", mod_activation="silu", init="gpt2", time_mlp_hidden=None,
                                   cond_dim=128, time_embed_dim=256, norm_eps=1e-6, head_init="zero")
REFERENCE_NETWORK: dict[str, Any] = dict(mlp="glu", norm="layer", mod_activation="sigmoid", init="fan_in",
                                         time_mlp_hidden=128, cond_dim=32, time_embed_dim=32, norm_eps=1e-5,
                                         head_init="zero")


# ----------------------------------------------------------------------------------------------
# Variants


def _trunc_normal_(weight: torch.Tensor, std: float) -> None:
    """Truncated normal at ±2σ with the given standard deviation (as flax's variance_scaling)."""
    nn.init.trunc_normal_(weight, std=std / 0.87962566103423978, a=-2 * std / 0.8796, b=2 * std / 0.8796)


def reference_linear_init(network: nn.Module, *, attention: bool = True, mlp: bool = True,
                          time: bool = True) -> None:
    """The authors' initialisation of the linear layers on maskdiff's architecture: lecun normal
    (std 1/sqrt(fan_in)) for attention and the time MLP, fan-in variance 2/n_layers for the MLP."""
    n_layers = network.config.n_layers
    for block in network.blocks:
        if attention:
            for lin in (block.attn.qkv, block.attn.proj):
                _trunc_normal_(lin.weight, 1 / math.sqrt(lin.in_features))
        if mlp:
            for lin in (block.mlp.fc, block.mlp.proj):
                _trunc_normal_(lin.weight, math.sqrt(2 / n_layers / lin.in_features))
    if time and network.time_embed is not None:
        for lin in network.time_embed.mlp:
            if isinstance(lin, nn.Linear):
                _trunc_normal_(lin.weight, 1 / math.sqrt(lin.in_features))
                nn.init.zeros_(lin.bias)


def head_init(std: float) -> Callable[[nn.Module], None]:
    """Output head N(0, std²) instead of zeros (the network then starts from non-uniform logits)."""
    def apply(network: nn.Module) -> None:
        nn.init.normal_(network.head.weight, std=std)
    return apply


def embedding_init(std: float) -> Callable[[nn.Module], None]:
    def apply(network: nn.Module) -> None:
        nn.init.normal_(network.tok_emb.weight, std=std)
    return apply


@dataclass
class Variant:
    """One change against ``base`` (the 0.2 network and trainer)."""

    doc: str
    network: dict[str, Any] = field(default_factory=dict)  # TransformerConfig fields
    init: Callable[[nn.Module], None] | None = None  # applied to the built network
    warmup_from_zero: bool = False  # lr·k/W (the reference) instead of lr·(k+1)/W
    overrides: list[str] = field(default_factory=list)  # RunConfig overrides
    adam_eps: float | None = None  # AdamW's epsilon (torch's default 1e-8 when None)


VARIANTS: dict[str, Variant] = {
    "base": Variant("maskdiff 0.2: N(0, 0.02), residual projections /sqrt(2L), embedding 0.02",
                    network=dict(OLD_NETWORK)),
    "warmup0": Variant("warm-up lr·k/100 as the reference (first step at lr 0)", network=dict(OLD_NETWORK),
                       warmup_from_zero=True),
    "fanin": Variant("reference init of all linears (lecun; MLP fan-in var 2/L) and embedding 1/sqrt(D)",
                     network=dict(OLD_NETWORK),
                     init=lambda n: (reference_linear_init(n), embedding_init(n.config.d_model ** -0.5)(n))),
    "fanin_lin": Variant("reference init of the linears only (embedding stays 0.02)", network=dict(OLD_NETWORK),
                         init=reference_linear_init),
    "emb1": Variant("embedding std 1 (only change)", network=dict(OLD_NETWORK), init=embedding_init(1.0)),
    "emb_ref": Variant("embedding std 1/sqrt(D) (only change)", network=dict(OLD_NETWORK),
                       init=lambda n: embedding_init(n.config.d_model ** -0.5)(n)),
    "fanin_attn": Variant("reference init of attention only", network=dict(OLD_NETWORK),
                          init=lambda n: reference_linear_init(n, mlp=False, time=False)),
    "fanin_mlp": Variant("reference init of the MLP only", network=dict(OLD_NETWORK),
                         init=lambda n: reference_linear_init(n, attention=False, time=False)),
    "ref": Variant("every reference choice: GLU, LayerNorm, sigmoid(c), fan-in init, 32-d time embedding",
                   network=dict(REFERENCE_NETWORK)),
    "sigmod": Variant("sigmoid instead of silu before the adaLN modulation layers (only change)",
                      network={**OLD_NETWORK, "mod_activation": "sigmoid"}),
    "glu": Variant("GLU (sigmoid gate) instead of SwiGLU (only change)", network={**OLD_NETWORK, "mlp": "glu"}),
    "layernorm": Variant("parameter-free LayerNorm instead of RMSNorm (only change)",
                         network={**OLD_NETWORK, "norm": "layer"}),
    "time32": Variant("reference time embedding: 32 sinusoids, MLP 32→128→32 (only change)",
                      network={**OLD_NETWORK, "cond_dim": 32, "time_embed_dim": 32, "time_mlp_hidden": 128}),
    "beta2_099": Variant("AdamW beta2 0.99 instead of 0.999 (optimiser only)", network=dict(OLD_NETWORK),
                         overrides=["optim.beta2=0.99"]),
    # maskdiff's loss is nats per token, the reference's nats per sequence (128 tokens): Adam's
    # step is the same for both up to eps, so eps / 128 gives maskdiff the reference's step.
    "eps_seq": Variant("AdamW eps 1e-8/128: the reference's Adam step for its per-sequence loss scale",
                       network=dict(OLD_NETWORK), adam_eps=1e-8 / 128),
    "head_fanin": Variant("output head N(0, 1/D) instead of zeros (only change; drawn here, untruncated)",
                          network=dict(OLD_NETWORK),
                          init=lambda n: head_init(n.config.d_model ** -0.5)(n)),
    "head002": Variant("output head N(0, 0.02²) instead of zeros (only change)", network=dict(OLD_NETWORK),
                       init=head_init(0.02)),
    "beta2_095": Variant("AdamW beta2 0.95 instead of 0.999 (optimiser only)", network=dict(OLD_NETWORK),
                         overrides=["optim.beta2=0.95"]),
    "fixed": Variant("the library's current defaults (since 0.3: the 0.2 network with head_init='fan_in', "
                     "a truncated-normal head of variance 1/D)"),
}


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def run_config(seed: int, steps: int, threads: int, clip: str, extra: list[str]) -> Any:
    recipe = ["optim.grad_clip=0", "optim.ema_decay=0"] if clip == "none" else []
    return apply_overrides(get_preset("demo"), [
        *recipe, f"train.steps={steps}", f"train.seed={seed}", f"train.num_threads={threads}",
        f"train.eval_every={steps}", f"train.save_every={steps}", "train.log_every=1", *extra])


def install(variant: Variant) -> None:
    """Patch the library (in this process only) so that the trainer builds ``variant``."""
    original_config_for = build_mod.network_config_for
    original_build = trainer_mod.build_model
    original_lr = trainer_mod.learning_rate

    def network_config_for(*args: Any, **kwargs: Any) -> Any:
        cfg = original_config_for(*args, **kwargs)
        data = {**cfg.to_dict(), **variant.network}
        return type(cfg).from_dict(data)

    def build_model(*args: Any, **kwargs: Any) -> Any:
        model = original_build(*args, **kwargs)
        if variant.init is not None:
            variant.init(model.network)
        return model

    def learning_rate(step: int, cfg: Any, total_steps: int) -> float:
        if variant.warmup_from_zero and cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return cfg.lr * step / cfg.warmup_steps
        return original_lr(step, cfg, total_steps)

    if variant.adam_eps is not None:
        torch.optim.AdamW = functools.partial(torch.optim.AdamW, eps=variant.adam_eps)  # type: ignore[misc]
    build_mod.network_config_for = network_config_for
    trainer_mod.build_model = build_model
    trainer_mod.learning_rate = learning_rate


def train_one(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from maskdiff.apps.likelihood import run_eval
    from maskdiff.runs import read_metrics

    variant = VARIANTS[name]
    install(variant)
    tag = "" if args.clip == "none" else f"-{args.clip}"
    out = Path(args.out) / f"{name}{tag}-s{seed}"
    config = run_config(seed, args.steps, args.threads, args.clip, [*variant.overrides, *args.set])
    trainer_mod.train(config, out, overwrite=True, progress=False)
    train_rows = read_metrics(out)["train"]
    tokens_per_step = config.train.batch_size * config.data.seq_len
    s_per_step = statistics.median(tokens_per_step / r["tokens_per_s"] for r in train_rows if r.get("tokens_per_s"))
    res = run_eval(out, split="test", draws=4, weights="raw", progress=False)
    curve = {r["step"]: round(r["bits_per_token"], 3) for r in train_rows if r["step"] in (150, 300, 450, 600)}
    result = dict(variant=name, seed=seed, clip=args.clip, steps=args.steps, test_bpc=res["bits_per_token"],
                  stderr=res["stderr"], s_per_step=s_per_step, train_bpt=curve,
                  max_grad_norm=max(r["grad_norm"] for r in train_rows),
                  grad_norm={r["step"]: round(r["grad_norm"], 3) for r in train_rows
                             if r["step"] in (1, 5, 10, 25, 50, 100, 200, 400, 600)})
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------
# Speed: interleaved training steps of each variant in one process


def speed(args: argparse.Namespace) -> None:
    """Median seconds per training step (forward, backward, AdamW) of each variant, the variants'
    steps interleaved so that a shared machine's load hits them alike."""
    torch.set_num_threads(args.threads)
    cfg = run_config(0, 600, args.threads, "none", args.set)
    data = build_mod.run_data(cfg)
    length, batch = cfg.data.seq_len, cfg.train.batch_size
    x = torch.from_numpy(data.train[: batch * length].astype("int64")).view(batch, length)
    models, opts = {}, {}
    for name in args.variants.split(","):
        net_cfg = build_mod.network_config_for(cfg, data.vocab_size)
        net_cfg = type(net_cfg).from_dict({**net_cfg.to_dict(), **VARIANTS[name].network})
        models[name] = build_mod.model_from_network(cfg, build_mod.build_network(net_cfg))
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    times: dict[str, list[float]] = {n: [] for n in models}
    gen = torch.Generator().manual_seed(0)
    for i in range(args.speed_steps + 2):
        for name, model in models.items():
            t0 = time.perf_counter()
            opts[name].zero_grad()
            model(x, generator=gen)["loss"].backward()
            opts[name].step()
            if i >= 2:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - t0)
    first = statistics.median(next(iter(times.values())))
    print(f"| variant | params | s/step (median of {args.speed_steps}) | × {next(iter(times))} |\n|---|---|---|---|")
    for name, t in times.items():
        n = sum(p.numel() for p in models[name].parameters())
        print(f"| {name} | {n:,} | {statistics.median(t):.3f} | {statistics.median(t) / first:.3f} |")


def gradients(args: argparse.Namespace) -> None:
    """Why the head matters: the gradient norm of everything but the head over the first steps,
    with the head started at zero and at fan-in scale (same seed, same batches, same times, AdamW
    at the recipe's warm-up, no clipping). Printed as a table of medians over step windows."""
    torch.set_num_threads(args.threads)
    cfg = run_config(0, 600, args.threads, "none", args.set)
    data = build_mod.run_data(cfg)
    length, batch = cfg.data.seq_len, cfg.train.batch_size
    rng = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data.train) - length, (args.grad_steps, batch), generator=rng)
    train = torch.from_numpy(data.train.astype("int64"))
    norms: dict[str, list[tuple[float, float]]] = {}
    net_cfg = build_mod.network_config_for(cfg, data.vocab_size)
    for head in ("zero", "fan_in"):
        torch.manual_seed(0)
        network = build_mod.build_network(dataclasses.replace(net_cfg, head_init=head))
        model = build_mod.model_from_network(cfg, network)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                weight_decay=0.0)
        gen = torch.Generator().manual_seed(1)
        rows = []
        for step in range(args.grad_steps):
            for group in opt.param_groups:
                group["lr"] = trainer_mod.learning_rate(step, cfg.optim, 600)
            x = train[starts[step, :, None] + torch.arange(length)]
            opt.zero_grad()
            model(x, generator=gen)["loss"].backward()
            body = torch.linalg.vector_norm(torch.stack([p.grad.norm() for n, p in model.named_parameters()
                                                         if p.grad is not None and not n.endswith("head.weight")]))
            rows.append((float(body), float(model.network.head.weight.grad.norm())))
            opt.step()
        norms[head] = rows
    windows = [(0, 1), (1, 5), (5, 10), (10, 25), (25, 50), (50, args.grad_steps)]
    print("| steps | body gradient norm, zero head | body, fan-in head | head gradient norm, zero head "
          "| head, fan-in head |\n|---|---|---|---|---|")
    for lo, hi in windows:
        if lo >= args.grad_steps:
            break
        med = {h: [statistics.median(r[i] for r in norms[h][lo:hi]) for i in (0, 1)] for h in norms}
        print(f"| {lo + 1}–{min(hi, args.grad_steps)} | {med['zero'][0]:.3g} | {med['fan_in'][0]:.3g} "
              f"| {med['zero'][1]:.3g} | {med['fan_in'][1]:.3g} |")


def table(args: argparse.Namespace) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*/result.json"))]
    base = {(r["seed"], r["clip"]): r["s_per_step"] for r in rows if r["variant"] == "base"}
    print("| variant | recipe | seed | test bits/char (raw, 4 draws) | ± | train bpt @150/300/600 "
          "| max grad norm | s/step | × base s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["clip"], r["variant"] != "base", r["variant"], r["seed"])):
        c = r["train_bpt"]
        curve = "/".join(str(c.get(str(s), c.get(s, "–"))) for s in (150, 300, 600))
        ref = base.get((r["seed"], r["clip"]))
        ratio = f"{r['s_per_step'] / ref:.2f}" if ref else "–"
        recipe = "no clip, no EMA" if r["clip"] == "none" else "clip 1.0, EMA 0.995"
        print(f"| {r['variant']} | {recipe} | {r['seed']} | {r['test_bpc']:.3f} | {r['stderr']:.3f} | {curve} "
              f"| {r['max_grad_norm']:.2f} | {r['s_per_step']:.3f} | {ratio} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "speed", "table", "list", "grads"])
    p.add_argument("--variants", default="base")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--speed-steps", type=int, default=20, help="timed steps per variant (speed)")
    p.add_argument("--grad-steps", type=int, default=100, help="steps per head initialisation (grads)")
    p.add_argument("--clip", choices=["none", "demo"], default="none")
    p.add_argument("--out", default="/tmp/ablate")
    p.add_argument("--set", action="append", default=[], help="extra RunConfig override, e.g. model.n_layers=6")
    args = p.parse_args(argv)
    if args.what == "list":
        for name, v in VARIANTS.items():
            print(f"{name:12s} {v.doc}")
    elif args.what == "table":
        table(args)
    elif args.what == "speed":
        speed(args)
    elif args.what == "grads":
        gradients(args)
    else:
        for name in args.variants.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                train_one(name, seed, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
