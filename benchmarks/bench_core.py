"""Time tokred-core's shared numerics and baseline reducers at a realistic size.

The default shape is LLaVA-1.5's: a batch of 8 images, 576 CLIP-L/14-336 patch tokens of width 1024.
Prints a Markdown table of the median wall-clock time per call. This is a benchmark, not a test: run it
on the machine whose figures you want, e.g.

    uv run python benchmarks/bench_core.py                     # CPU, fp32
    uv run python benchmarks/bench_core.py --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import torch

from tokred.bench.measure import time_call
from tokred.core import create_reducer
from tokred.core.ops import (
    assign_to_nearest,
    bipartite_soft_matching,
    cosine_similarity,
    farthest_point_sampling,
    gather_tokens,
    merge_weights,
    projection_residual,
    ridge_least_squares,
    scatter_merge,
    topk_indices,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="B, token sets per call (default 8)")
    parser.add_argument("--tokens", type=int, default=576, help="N, tokens per set (default 576)")
    parser.add_argument("--channels", type=int, default=1024, help="C, channels per token (default 1024)")
    parser.add_argument("--keep", type=int, default=64, help="K, tokens kept by the reducers (default 64)")
    parser.add_argument("--basis", type=int, default=10, help="basis size for FPS and the ridge solve")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    b, n, c, k, m = args.batch, args.tokens, args.channels, args.keep, args.basis
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(b, n, c, generator=gen).to(device=device, dtype=dtype)
    basis_idx = farthest_point_sampling(tokens, m)
    basis = gather_tokens(tokens, basis_idx)
    scores = tokens.float().norm(dim=-1)
    kept = topk_indices(scores, k)
    kept_tokens = gather_tokens(tokens, kept)
    assignment = torch.randint(-1, k, (b, n), generator=gen).to(device)
    weights, _ = merge_weights(assignment, k)

    cases: list[tuple[str, str, Callable[[], object]]] = [
        ("farthest_point_sampling", f"k={m}", lambda: farthest_point_sampling(tokens, m)),
        ("ridge_least_squares", f"k={m}", lambda: ridge_least_squares(basis, tokens)),
        ("projection_residual", f"k={m}", lambda: projection_residual(tokens, basis)),
        ("cosine_similarity", "N x N", lambda: cosine_similarity(tokens)),
        ("topk_indices", f"K={k}", lambda: topk_indices(scores, k)),
        ("gather_tokens", f"K={k}", lambda: gather_tokens(tokens, kept)),
        ("merge_weights + scatter_merge", f"K={k}", lambda: scatter_merge(tokens, assignment, k, weights)),
        ("assign_to_nearest", f"N x K={k}", lambda: assign_to_nearest(tokens, kept_tokens)),
        ("bipartite_soft_matching", f"r={n // 2}", lambda: bipartite_soft_matching(tokens, n // 2)),
    ]
    for name in ("random", "uniform", "norm", "divprune", "tome", "topk"):
        kwargs = {"seed": 0} if name == "random" else {}
        reducer = create_reducer(name, num_keep=k, **kwargs)
        extra = {"scores": scores} if reducer.needs_scores is not None else {}
        cases.append((f"reducer `{name}`", f"K={k}", lambda reducer=reducer, extra=extra: reducer(tokens, **extra)))
    merging_topk = create_reducer("topk", num_keep=k, merge=True)
    cases.append(("reducer `topk`, merge=True", f"K={k}", lambda: merging_topk(tokens, scores=scores)))

    print(
        f"tokred-core numerics: B={b}, N={n}, C={c}, {args.dtype} on {device}"
        f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})"
    )
    print()
    print("| operation | setting | median ms | ms per set |")
    print("|---|---|---:|---:|")
    for name, setting, fn in cases:
        ms = time_call(fn, repeats=args.repeats, warmup=2).median * 1e3
        print(f"| {name} | {setting} | {ms:.2f} | {ms / b:.3f} |")


if __name__ == "__main__":
    main()
