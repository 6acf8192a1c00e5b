"""Throughput of Vim models on the CPU: dense per scan backend, and with MTR at given FLOPs cuts.

Random weights at the real sizes (the published checkpoints cannot be downloaded here; speed does not depend
on the weights). For each model prints a Markdown table: images/s, the measured speed-up over dense, the
FLOPs ratio (one-direction convention) and how much of the FLOPs ratio the measured speed-up achieves. Each
reduced run is timed alternately with the dense model, and the MTR timings include MTR's own scoring and
matching. Run, e.g.:

    uv run python benchmarks/bench_mamba.py                              # vim_tiny, vim_small, vim_base
    uv run python benchmarks/bench_mamba.py --models vim_small --batch 8 --cuts 0.2 0.3 0.4
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from tokred.bench.measure import time_call
from tokred.mamba import attach, count_flops, create_model
from tokred.mamba.ops import available_backends


def median_seconds(model: torch.nn.Module, images: torch.Tensor, repeats: int) -> float:
    """Median wall-clock seconds of one forward pass, after one warm-up pass."""
    with torch.inference_mode():
        return time_call(lambda: model(images), repeats=repeats, warmup=1).median


def timed(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Seconds of one forward pass."""
    start = time.perf_counter()
    model(images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vim_tiny", "vim_small", "vim_base"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuts", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    parser.add_argument("--reducer", default="mtr")
    parser.add_argument("--fast-backend", default="chunked", help="backend for the reduced runs")
    parser.add_argument(
        "--reference-batch", type=int, default=1, help="batch for the (slow) sequential reference backend; 0 skips it"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"CPU: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"batch {args.batch}, median of {args.repeats}; random weights"
    )
    for name in args.models:
        model = create_model(name).eval()
        images = torch.randn(args.batch, 3, model.img_size, model.img_size)
        dense_flops = count_flops(model, schedule={})
        print(f"\n### {name} ({dense_flops / 1e9:.2f} GFLOPs dense)\n")
        print("| run | backend | tokens at the end | GFLOPs | images/s | speed-up | FLOPs ratio | speed-up / ratio |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for backend in available_backends():
            if backend == "reference" and args.reference_batch == 0:
                continue
            model.scan_backend = backend
            batch = images[: args.reference_batch] if backend == "reference" else images
            seconds = median_seconds(model, batch, 1 if backend == "reference" else args.repeats)
            print(
                f"| dense | {backend} | {model.num_tokens} | {dense_flops / 1e9:.2f} | {len(batch) / seconds:.2f} "
                f"| | | |"
            )
        model.scan_backend = args.fast_backend
        for cut in args.cuts:
            # Dense and reduced passes alternate, so drifting background load hits both alike.
            handle = attach(model, args.reducer, flops_cut=cut)
            schedule, flops = handle.schedule, count_flops(model)
            handle.detach()
            dense_times, reduced_times = [], []
            with torch.inference_mode():
                model(images)
                for _ in range(args.repeats):
                    dense_times.append(timed(model, images))
                    with attach(model, args.reducer, schedule=schedule):
                        reduced_times.append(timed(model, images))
            dense_seconds, seconds = statistics.median(dense_times), statistics.median(reduced_times)
            speedup, ratio = dense_seconds / seconds, dense_flops / flops
            remaining = model.num_tokens - sum(schedule.values())
            print(
                f"| {args.reducer} −{cut:.0%} (r={max(schedule.values())}) | {args.fast_backend} | {remaining} "
                f"| {flops / 1e9:.2f} | {len(images) / seconds:.2f} (dense {len(images) / dense_seconds:.2f}) "
                f"| {speedup:.2f}× | {ratio:.2f}× | {speedup / ratio:.0%} |"
            )


if __name__ == "__main__":
    main()
