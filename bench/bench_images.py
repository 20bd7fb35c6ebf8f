"""Image denoisers side by side: the sequence transformer and the U-Net, in one run.

For each architecture, built exactly as ``maskdiff train --preset mnist-md4`` builds it (or with
``--set``-style overrides), it times MD4 training steps (forward with the linear schedule,
backward, clipping, AdamW) on real MNIST batches and denoiser calls as the sampler makes them
(no gradient), and prints

* params       parameter count;
* ms/step      median training step over ``--steps`` timed steps (after one untimed);
* images/s     batch / median step time, and the ratio to the first architecture's;
* ms/call      median sampling call at ``--sample-batch`` images, and its ratio.

Examples::

    python bench/bench_images.py                        # MNIST shapes of the mnist-md4 preset
    python bench/bench_images.py --threads 1 --steps 10
    python bench/bench_images.py --device cuda --batch-size 128 --sample-batch 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from maskdiff.build import build_model, run_data
from maskdiff.config import apply_overrides, get_preset
from maskdiff.devices import resolve_device

ARCHITECTURES = {
    "transformer": ["model.architecture=transformer", "model.d_model=128", "model.n_layers=3", "model.n_heads=4"],
    "unet": ["model.architecture=unet", "model.d_model=64", "model.n_heads=4"],
}


def median_seconds(fn: Any, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one untimed call."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_architecture(name: str, args: argparse.Namespace, device: torch.device, data: Any) -> dict[str, Any]:
    config = apply_overrides(get_preset(args.preset), ARCHITECTURES[name])
    torch.manual_seed(0)
    model = build_model(config, 256, image_shape=data.shape, num_classes=data.num_classes).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = torch.from_numpy(data.split("train")[: args.batch_size].astype("int64")).to(device)
    labels = torch.from_numpy(data.labels("train")[: args.batch_size].astype("int64")).to(device)
    gen = torch.Generator(device=device).manual_seed(1)

    def train_step() -> None:
        loss = model(rows, generator=gen, labels=labels)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = median_seconds(train_step, args.steps, device)
    model.eval()
    z = torch.full((args.sample_batch, config.data.seq_len), 256, device=device)
    z[:, ::3] = rows[0, ::3]  # a partly unmasked canvas
    with torch.no_grad():
        call_s = median_seconds(lambda: model.network(z, None), args.steps, device)
    return {"architecture": name, "params_M": model.network.num_parameters() / 1e6, "ms_per_step": 1e3 * step_s,
            "images_per_s": args.batch_size / step_s, "ms_per_call": 1e3 * call_s}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist-md4")
    p.add_argument("--architectures", default="transformer,unet")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sample-batch", type=int, default=36)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = run_data(get_preset(args.preset))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.preset}: {data.shape} images, training batch {args.batch_size}, sampling batch "
          f"{args.sample_batch}, median of {args.steps}, {where}")
    print(f"{'architecture':>12} {'params M':>9} {'ms/step':>9} {'images/s':>9} {'×':>5} {'ms/call':>9} {'×':>5}")
    results = []
    for name in [a.strip() for a in args.architectures.split(",")]:
        if name not in ARCHITECTURES:
            raise SystemExit(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
        r = bench_architecture(name, args, device, data)
        base = results[0] if results else r
        print(f"{name:>12} {r['params_M']:>9.2f} {r['ms_per_step']:>9.1f} {r['images_per_s']:>9.1f} "
              f"{r['images_per_s'] / base['images_per_s']:>5.2f} {r['ms_per_call']:>9.1f} "
              f"{base['ms_per_call'] / r['ms_per_call']:>5.2f}")
        results.append(r)
    return results


if __name__ == "__main__":
    main()
