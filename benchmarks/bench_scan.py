"""Time the selective-scan backends at the shapes of Vim-Tiny, -Small and -Base.

One scan direction of one Vim block at 224 px: ``d_inner`` D = 384 / 768 / 1536, N = 16 states, L = 197 tokens,
fp32, with a Vim-like initialisation (S4D-real A, dt in [1e-3, 1e-1], D and the z gate on). Each backend runs
``--repeats`` times after a warm-up, interleaved with the others so that background load hits all of them
alike; the table gives the median wall-clock time per call and the chunked backend's speed-up over the
sequential reference. This is a benchmark, not a test: run it on the machine whose figures you want, e.g.

    uv run python benchmarks/bench_scan.py                        # CPU, batch 1 and 8, Vim-T/S/B
    uv run python benchmarks/bench_scan.py --batch 8 --dims 768 --repeats 11
    uv run python benchmarks/bench_scan.py --device cuda          # adds mamba_ssm when it imports

With ``--backward`` it times a training step instead: forward and backward through the scan, every input
(``A`` as ``-exp(A_log)``) requiring grad, the loss a fixed random weighting of the output; the error column
is then the largest gradient error relative to the reference's, over all inputs. For a Vision Mamba trained
at width 64 / 96 (``d_inner`` 128 / 192), batch 32:

    uv run python benchmarks/bench_scan.py --backward --batch 32 --dims 128 192 --threads 1
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch

from tokred.mamba.ops import available_backends, selective_scan

MODELS = {384: "Vim-T", 768: "Vim-S", 1536: "Vim-B"}


def vim_like_inputs(batch: int, channels: int, length: int, state: int, device: torch.device) -> dict:
    """Scan inputs distributed like an initialised Vim mixer's (``reference/mtr.md`` §4.2)."""
    g = torch.Generator().manual_seed(0)
    dt = torch.exp(torch.rand(channels, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    tensors = {
        "u": torch.randn(batch, channels, length, generator=g),
        "delta": 0.5 * torch.randn(batch, channels, length, generator=g),
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(channels, 1),
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.ones(channels),
        "z": torch.randn(batch, channels, length, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
    }
    return {name: t.to(device) for name, t in tensors.items()}


def training_step(x: dict, backend: str, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward and backward through the scan; returns the gradients of the leaves in ``x``."""
    for t in x.values():
        t.grad = None
    inputs = {name: t for name, t in x.items() if name != "A_log"}
    y = selective_scan(**inputs, A=-torch.exp(x["A_log"]), delta_softplus=True, backend=backend)
    (y * weights).sum().backward()
    return {name: t.grad for name, t in x.items()}


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict:
    """Median milliseconds per call of each function, the functions taking turns after one warm-up call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768, 1536], help="D = d_inner values")
    parser.add_argument("--length", type=int, default=197, help="L, tokens per sequence (default 197)")
    parser.add_argument("--state", type=int, default=16, help="N, SSM states (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per backend (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward (a training step)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    backends = ["reference", "chunked"]
    if device.type == "cuda" and "mamba_ssm" in available_backends():
        backends.append("mamba_ssm")

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, ", end="")
    print(f"{torch.get_num_threads()} threads, device {device}, fp32, N = {args.state}, L = {args.length}, ", end="")
    print(f"median of {args.repeats}" + (", forward + backward" if args.backward else "") + "\n")
    if args.backward:
        time_training(args, backends, device)
        return
    header = ["model", "B", "D"] + [f"{name} ms" for name in backends]
    header += [f"{name} speed-up" for name in backends[1:]] + ["chunked max rel. error"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 1 else "---:" for i in range(len(header))) + "|")
    with torch.inference_mode():
        for batch in args.batch:
            for channels in args.dims:
                x = vim_like_inputs(batch, channels, args.length, args.state, device)
                fns = {
                    name: (lambda name=name, x=x: selective_scan(**x, delta_softplus=True, backend=name))
                    for name in backends
                }
                ms = interleaved_medians(fns, device, args.repeats)
                ref = fns["reference"]()
                err = ((fns["chunked"]() - ref).abs().max() / ref.abs().max()).item()
                row = [MODELS.get(channels, "-"), str(batch), str(channels)]
                row += [f"{ms[name]:.2f}" for name in backends]
                row += [f"{ms['reference'] / ms[name]:.1f}x" for name in backends[1:]]
                row.append(f"{err:.1e}")
                print("| " + " | ".join(row) + " |", flush=True)


def time_training(args: argparse.Namespace, backends: list[str], device: torch.device) -> None:
    """The ``--backward`` table: a training step per backend, and the chunked gradients' largest error."""
    header = ["B", "D"] + [f"{name} fwd+bwd ms" for name in backends]
    header += [f"{name} speed-up" for name in backends[1:]] + ["chunked max rel. grad error"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for batch in args.batch:
        for channels in args.dims:
            x = vim_like_inputs(batch, channels, args.length, args.state, device)
            x["A_log"] = torch.log(-x.pop("A"))
            x = {name: t.requires_grad_() for name, t in x.items()}
            weights = torch.randn(batch, channels, args.length, generator=torch.Generator().manual_seed(1))
            weights = weights.to(device)
            fns = {name: (lambda name=name, x=x, w=weights: training_step(x, name, w)) for name in backends}
            ms = interleaved_medians(fns, device, args.repeats)
            ref = {k: g.clone() for k, g in fns["reference"]().items()}
            ours = fns["chunked"]()
            err = max(((ours[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
            row = [str(batch), str(channels)] + [f"{ms[name]:.1f}" for name in backends]
            row += [f"{ms['reference'] / ms[name]:.1f}x" for name in backends[1:]]
            row.append(f"{err:.1e}")
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
