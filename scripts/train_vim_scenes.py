"""Train tokred-bench's reference Vim (``vim_scenes``) from scratch on the CPU and write its weights and card.

Reproduces ``packages/tokred-bench/src/tokred/bench/assets/vim_scenes/`` (``vim_scenes.pt`` and ``card.json``):

    uv run python scripts/train_vim_scenes.py

Every hyper-parameter is a default of ``tokred.bench.training.vim.TrainConfig``; this script only picks
the thread count and the output folder, trains, saves fp16 weights, measures the saved model on held-out
``test`` scenes and writes the card. The committed weights were made with one thread, on the project's
shared 2-core machine, in about 65-80 minutes; another thread count sums in another order and gives slightly
different weights.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from tokred.bench.training.vim import TrainConfig, export_reference, keep_freed_memory, train

__all__ = ["main"]

ASSETS = Path(__file__).resolve().parents[1] / "packages/tokred-bench/src/tokred/bench/assets/vim_scenes"


def main(argv: list[str] | None = None) -> int:
    """Train, then write ``vim_scenes.pt`` and ``card.json`` into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help=f"output folder (default {ASSETS})")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads (default 1, as committed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    config = TrainConfig(threads=args.threads)
    result = train(config, log=lambda line: print(line, flush=True))
    command = shlex.join(["uv", "run", "python", "scripts/train_vim_scenes.py", *sys.argv[1:]])
    weights, card = export_reference(result, args.out, command=command)
    print(f"trained in {result.wall_time_s:.0f} s with {result.threads} thread(s); wrote {weights} and {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
