"""Train the reference LLaVA of tokred-bench from scratch on the CPU and write the bundled checkpoint and its card.

Reproduces ``packages/tokred-bench/src/tokred/bench/assets/llava_scenes`` (same weights on the same machine with
the same thread count)::

    uv run python scripts/train_llava_scenes.py

The hyper-parameters are those of ``tokred.bench.training.llava.TrainConfig``; this script only chooses the
thread count, the device and the output folder, trains, saves fp16 weights, evaluates the saved model on the
held-out questions and writes ``card.json``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from tokred.bench.reference import reference_dir
from tokred.bench.training.llava import TrainConfig, save_checkpoint, train, write_card

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, train, save and evaluate; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=reference_dir("llava_scenes"), help="output folder (default: the bundled model)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    parser.add_argument("--device", default="cpu", help="training device (the shipped model: cpu)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = TrainConfig(threads=args.threads)
    result = train(config, device=args.device, log=lambda line: print(line, flush=True))
    print(f"trained in {result.wall_time_s:.0f} s with {args.threads} thread(s)", flush=True)
    folder = save_checkpoint(result.model.cpu(), result.processor, args.out)
    words = ["uv", "run", "python", "scripts/train_llava_scenes.py", *(argv if argv is not None else sys.argv[1:])]
    card = write_card(folder, result, command=shlex.join(words), device=args.device)
    held_out = card["held_out"]
    kinds = ", ".join(f"{kind} {value:.1%}" for kind, value in held_out["per_kind"].items())
    print(f"held-out accuracy {held_out['accuracy']:.1%} on {held_out['questions']} questions ({kinds})")
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
