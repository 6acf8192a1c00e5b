"""``tokred mamba …``: classify images and evaluate on a folder, dense or with token reduction."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``mamba`` subcommand group to the ``tokred`` command."""
    parser = subparsers.add_parser(
        "mamba",
        help="Vision Mamba models: classify, evaluate, list",
        description="Run Vim / VideoMamba image classifiers on the CPU or GPU, dense or with token reduction.",
    )
    commands = parser.add_subparsers(dest="mamba_command", metavar="COMMAND", required=True)

    models = commands.add_parser("models", help="list the model names create_model accepts")
    models.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern (default: all)")
    models.set_defaults(func=_run_models)

    classify = commands.add_parser("classify", help="classify image files")
    _add_model_arguments(classify)
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    classify.add_argument("--top-k", type=int, default=5, help="predictions shown per image (default 5)")
    classify.set_defaults(func=_run_classify)

    evaluate = commands.add_parser("eval", help="top-1 / top-5 accuracy on an ImageFolder-layout folder")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--data", required=True, help="folder with one sub-folder of images per class")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    evaluate.set_defaults(func=_run_eval)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model name, see `tokred mamba models`")
    parser.add_argument("--checkpoint", help="official .pth file (or a state dict) to load")
    parser.add_argument(
        "--checkpoint-key",
        default="auto",
        choices=["auto", "model", "model_ema"],
        help="which weights of a training checkpoint to load (Vim-B's published accuracy is model_ema)",
    )
    parser.add_argument(
        "--trusted",
        action="store_true",
        help="allow arbitrary pickled objects in the checkpoint (only for files you trust)",
    )
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scan-backend", default="auto", help="selective-scan backend (default: auto)")
    group = parser.add_argument_group("token reduction")
    group.add_argument("--reducer", default=None, help="reducer name (mtr, tome, random, …); default: dense")
    schedule = group.add_mutually_exclusive_group()
    schedule.add_argument("--flops-cut", type=float, default=None, help="fraction of FLOPs to save (0.2/0.3/0.4)")
    schedule.add_argument("--r", type=int, default=None, help="tokens removed after each scheduled block")
    group.add_argument("--after", type=int, nargs="+", default=None, help="block indices (default: 1, 3, 5, …)")
    group.add_argument("--seed", type=int, default=0, help="seed for stochastic reducers such as random")


def _build(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from tokred.core import get_reducer_class
    from tokred.mamba import attach, create_model

    overrides = {"scan_backend": args.scan_backend}
    if args.img_size:
        overrides["img_size"] = args.img_size
    model = create_model(
        args.model, checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, trusted=args.trusted, **overrides
    )
    model = model.to(torch.device(args.device)).eval()
    handle = None
    if args.reducer:
        if args.flops_cut is None and args.r is None:
            raise SystemExit("tokred mamba: --reducer needs --flops-cut or --r")
        config = {"seed": args.seed} if get_reducer_class(args.reducer).stochastic else {}
        handle = attach(model, args.reducer, r=args.r, after=args.after, flops_cut=args.flops_cut, **config)
    elif args.flops_cut is not None or args.r is not None:
        raise SystemExit("tokred mamba: --flops-cut / --r need --reducer")
    return model, handle


def _describe(model: Any) -> str:
    from tokred.mamba import count_flops

    dense = count_flops(model, schedule={})
    reduced = count_flops(model)
    if reduced == dense:
        return f"{dense / 1e9:.3f} GFLOPs (dense, one-direction convention)"
    return f"{reduced / 1e9:.3f} GFLOPs, {1 - reduced / dense:.1%} less than dense {dense / 1e9:.3f} (one-direction)"


def _run_models(args: argparse.Namespace) -> int:
    from tokred.mamba import available_models

    for name in available_models(args.pattern):
        print(name)
    return 0


def _run_classify(args: argparse.Namespace) -> int:
    import torch

    from tokred.mamba import load_image

    model, _ = _build(args)
    device = next(model.parameters()).device
    print(f"model {args.model}: {_describe(model)}")
    for path in args.images:
        image = load_image(path, img_size=model.img_size).unsqueeze(0).to(device)
        start = time.perf_counter()
        with torch.inference_mode():
            probs = model(image).float().softmax(dim=-1)[0]
        elapsed = time.perf_counter() - start
        top = probs.topk(min(args.top_k, probs.numel()))
        ranked = ", ".join(f"{i}: {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True))
        print(f"{path}\t{ranked}\t({elapsed * 1e3:.0f} ms)")
    return 0


def _progress(done: int, total: int, start: float) -> None:
    stream = sys.stderr  # looked up per call, so redirected streams are honoured
    width = 30
    filled = int(width * done / max(total, 1))
    rate = done / max(time.perf_counter() - start, 1e-9)
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images, {rate:.1f} img/s")
    stream.flush()


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from tokred.mamba import ImageFolder

    model, _ = _build(args)
    device = next(model.parameters()).device
    dataset = ImageFolder(args.data, img_size=model.img_size)
    total = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    if total == 0:
        raise SystemExit(f"tokred mamba: no images found under {args.data}")
    top1 = top5 = seen = 0
    start = time.perf_counter()
    index = 0
    while index < total:
        batch = [dataset[i] for i in range(index, min(index + args.batch_size, total))]
        index += len(batch)
        images = torch.stack([image for image, _ in batch]).to(device)
        labels = torch.tensor([label for _, label in batch], device=device)
        with torch.inference_mode():
            logits = model(images)
        best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels.unsqueeze(1)).any(dim=1).sum())
        seen += len(batch)
        _progress(seen, total, start)
    elapsed = time.perf_counter() - start
    sys.stderr.write("\n")
    print(f"model {args.model}: {_describe(model)}")
    print(f"images: {seen} evaluated, {dataset.skipped} skipped (not readable images)")
    print(f"top-1: {100 * top1 / seen:.2f}%  top-5: {100 * top5 / seen:.2f}%")
    print(f"throughput: {seen / elapsed:.1f} images/s on {device}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience for `python -m`
    """Run ``tokred mamba …`` directly."""
    from tokred.core.cli import main as tokred_main

    return tokred_main(["mamba", *(argv if argv is not None else sys.argv[1:])])
