r"""``tokred mamba …``: classify images and evaluate on a folder, dense or with token reduction.

A few commands:

```bash
tokred mamba models
tokred mamba classify --model vim_small --checkpoint vim_s_midclstok_80p5acc.pth cat.jpg dog.jpg
tokred mamba classify --model vim_scenes --reducer mtr --flops-cut 0.4 scene.png   # bundled weights
tokred mamba eval --model vim_small --checkpoint vim_s.pth --data imagenet/val --reducer mtr --flops-cut 0.3 \
    --out results/
torchrun --standalone --nproc_per_node 2 --no-python tokred mamba eval --model vim_scenes --data scenes/ --out out/
```

A model is loaded with ``--checkpoint FILE``, or with the weights a package bundles for it (``vim_scenes``);
a model with neither is refused unless ``--random-weights`` asks for random ones. Images are prepared the way
the model's registration says (the official ImageNet transform, or the reference model's own). Under torchrun,
``eval`` splits the images across the processes and rank 0 writes the results
([`tokred.mamba.distributed`][tokred.mamba.distributed]).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokred.core.cli.main import set_command
from tokred.core.cli.options import add_device_argument, add_reducer_arguments, open_fraction, positive_int
from tokred.core.cli.tables import format_table
from tokred.core.errors import IncompatibleReducerError, InvalidInputError, TokredError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``mamba`` subcommand group to the ``tokred`` command."""
    from tokred.mamba.ops import BACKENDS

    parser = subparsers.add_parser(
        "mamba",
        help="Vision Mamba models: classify, evaluate, list",
        description="Run Vim / VideoMamba image classifiers on the CPU or GPU, dense or with token reduction.",
    )
    commands = parser.add_subparsers(dest="mamba_command", metavar="COMMAND", required=True)

    models = commands.add_parser(
        "models", help="list the models create_model accepts", description="List the registered Vision Mamba models."
    )
    models.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'vim_*' (default: all)")
    set_command(models, _run_models)

    classify = commands.add_parser(
        "classify",
        help="classify image files",
        description="Print each image's top classes (with their names when the model has them), dense or reduced.",
    )
    _add_model_arguments(classify, BACKENDS)
    classify.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
    classify.add_argument(
        "--image", action="append", default=[], metavar="FILE", help="an image file; repeatable (or give them as IMAGE)"
    )
    classify.add_argument("--top-k", type=positive_int, default=5, help="predictions shown per image (default 5)")
    set_command(classify, _run_classify)

    evaluate = commands.add_parser(
        "eval",
        help="top-1 / top-5 accuracy on an ImageNet-style folder",
        description="Top-1 and top-5 accuracy on a folder with one sub-folder of images per class (root/<class>/"
        "<image>, classes sorted by name as in ImageNet's validation set), dense or reduced.",
    )
    _add_model_arguments(evaluate, BACKENDS)
    evaluate.add_argument(
        "--data", required=True, type=Path, metavar="FOLDER", help="folder with one sub-folder of images per class"
    )
    evaluate.add_argument("--batch-size", type=positive_int, default=16, help="images per forward (default 16)")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="evaluate at most this many images")
    evaluate.add_argument(
        "--out", type=Path, default=None, metavar="FOLDER", help="write results.json and predictions.csv there"
    )
    evaluate.add_argument("--no-progress", action="store_true", help="draw no progress bar")
    set_command(evaluate, _run_eval)


def _add_model_arguments(parser: argparse.ArgumentParser, backends: Sequence[str]) -> None:
    parser.add_argument("--model", required=True, metavar="NAME", help="model name, see `tokred mamba models`")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, metavar="FILE", help="official .pth file (or a state dict) to load")
    weights.add_argument(
        "--random-weights",
        action="store_true",
        help="run with random weights, drawn from a fixed seed (for models without a checkpoint or bundled weights; "
        "answers are meaningless)",
    )
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
    parser.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the model's)")
    add_device_argument(parser)
    parser.add_argument(
        "--scan-backend", default="auto", choices=list(backends), help="selective-scan backend (default: auto)"
    )
    group = parser.add_argument_group("token reduction")
    add_reducer_arguments(group, default=None)
    schedule = group.add_mutually_exclusive_group()
    schedule.add_argument(
        "--flops-cut", type=open_fraction, default=None, metavar="CUT", help="fraction of FLOPs to save (0.2/0.3/0.4)"
    )
    schedule.add_argument(
        "--num-remove",
        "--r",
        dest="num_remove",
        type=positive_int,
        default=None,
        metavar="R",
        help="tokens removed after each scheduled block",
    )
    group.add_argument(
        "--after", type=int, nargs="+", default=None, metavar="BLOCK", help="block indices (default: 1, 3, 5, …)"
    )


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from tokred.mamba import attach, create_model, model_spec

    spec = model_spec(args.model)  # an unknown name fails here, with the known ones
    overrides: dict[str, Any] = {"scan_backend": args.scan_backend}
    if args.img_size:
        overrides["img_size"] = args.img_size
    weights: dict[str, Any] = {}
    if args.checkpoint is not None:
        weights = {"checkpoint": args.checkpoint, "checkpoint_key": args.checkpoint_key, "trusted": args.trusted}
    elif spec.pretrained is not None and not args.random_weights:
        weights = {"pretrained": True}
    elif not args.random_weights:
        raise InvalidInputError(
            f"model {spec.name!r} has no bundled weights: give --checkpoint FILE (an official .pth file), or "
            "--random-weights to run it untrained"
        )
    if weights:
        model = create_model(spec.name, **weights, **overrides)
    else:  # random weights from a fixed seed: the same in every run and in every process of a torchrun launch
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_model(spec.name, **overrides)
    model = model.to(args.device).eval()
    handle = None
    reducer_given = args.reducer is not None and args.reducer.lower() != "none"
    if reducer_given:
        if args.flops_cut is None and args.num_remove is None:
            raise InvalidInputError(f"--reducer {args.reducer} needs a schedule: --flops-cut CUT or --num-remove R")
        from tokred.core import get_reducer_class

        config = dict(args.reducer_arg)
        if get_reducer_class(args.reducer).stochastic:
            config.setdefault("seed", args.seed)
        for key in ("num_keep", "keep_ratio", "num_remove"):
            if key in config:
                raise IncompatibleReducerError(
                    f"--reducer-arg {key}=… has no effect: the schedule sets how many tokens each step removes "
                    "(--flops-cut or --num-remove)"
                )
        handle = attach(model, args.reducer, r=args.num_remove, after=args.after, flops_cut=args.flops_cut, **config)
    elif args.flops_cut is not None or args.num_remove is not None or args.reducer_arg:
        raise InvalidInputError("--flops-cut, --num-remove and --reducer-arg need --reducer NAME")
    return model, handle


def _describe(model: Any) -> str:
    from tokred.mamba import count_flops

    dense = count_flops(model, schedule={})
    reduced = count_flops(model)
    if reduced == dense:
        return f"{dense / 1e9:.3f} GFLOPs (dense, one-direction convention)"
    return f"{reduced / 1e9:.3f} GFLOPs, {1 - reduced / dense:.1%} less than dense {dense / 1e9:.3f} (one-direction)"


def _run_models(args: argparse.Namespace) -> int:
    from tokred.core.registry import RegistryEntry
    from tokred.mamba.models.registry import MODELS

    entries: dict[str, RegistryEntry] = {e.name: e for e in MODELS.entries()}
    rows = []
    for name in MODELS.names(args.pattern):
        spec = MODELS.get(name)
        weights = "bundled" if spec.pretrained is not None else "--checkpoint"
        classes = f"{len(spec.class_names)} named" if spec.class_names else ""
        rows.append([name, entries[name].distribution or "-", weights, classes, spec.description])
    if not rows:
        raise InvalidInputError(f"no model matches {args.pattern!r}; `tokred mamba models` lists them all")
    print(format_table(["name", "package", "weights", "classes", "description"], rows), end="")
    return 0


def _images(args: argparse.Namespace) -> list[str]:
    paths = [*args.images, *args.image]
    if not paths:
        raise InvalidInputError("give at least one image file (IMAGE or --image FILE)")
    return paths


def _run_classify(args: argparse.Namespace) -> int:
    import torch

    from tokred.mamba import load_image

    paths = _images(args)
    model, _ = _load(args)
    tensors = [load_image(path, model.img_size, model.preprocess_config) for path in paths]  # all read first
    names = getattr(model, "class_names", None)
    print(f"model {model.model_name}: {_describe(model)}")
    for path, image in zip(paths, tensors, strict=True):
        start = time.perf_counter()
        with torch.inference_mode():
            probs = model(image.unsqueeze(0).to(args.device)).float().softmax(dim=-1)[0]
        elapsed = time.perf_counter() - start
        top = probs.topk(min(args.top_k, probs.numel()))
        ranked = ", ".join(
            f"{names[i] if names else i}: {p:.3f}"
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        )
        print(f"{path}\t{ranked}\t({elapsed * 1e3:.0f} ms)")
    return 0


def _check_classes(model: Any, classes: Sequence[str]) -> str | None:
    """A loud warning when the folder's classes cannot be the model's, or None."""
    names = getattr(model, "class_names", None)
    num_classes = getattr(model, "num_classes", None)
    if names:
        unknown = [c for c in classes if c not in names]
        if unknown:
            return (
                f"the folder's classes are not the model's: {len(unknown)} of {len(classes)} sub-folders "
                f"({', '.join(unknown[:3])}{', …' if len(unknown) > 3 else ''}) name no class of {model.model_name}; "
                "the accuracy below compares labels that do not correspond"
            )
        if list(classes) != [n for n in names if n in classes]:
            return "the folder's classes are in another order than the model's; labels are matched by name"
    elif num_classes is not None and len(classes) != num_classes:
        return (
            f"the folder has {len(classes)} class sub-folders but the model has {num_classes} classes: labels are "
            "the sub-folders' sorted order, so the accuracy below is only meaningful if that is the model's order"
        )
    return None


def _run_eval(args: argparse.Namespace) -> int:
    from tokred.mamba import distributed

    info = distributed.from_environment()  # a single process unless torchrun started several
    args.device = distributed.local_device(args.device, info)
    with distributed.process_group(info, args.device), warnings.catch_warnings():
        if not info.is_main:
            warnings.simplefilter("ignore")  # rank 0 shows each warning once
        return _evaluate(args, info)


def _prepare_eval(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from tokred.mamba import ImageFolder

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise InvalidInputError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    model, handle = _load(args)
    dataset = ImageFolder(args.data, img_size=model.img_size, config=model.preprocess_config)
    return model, handle, dataset


def _evaluate(args: argparse.Namespace, info: Any) -> int:
    import torch
    from tqdm.auto import tqdm

    from tokred.mamba import distributed

    error: TokredError | OSError | None = None
    try:
        model, handle, dataset = _prepare_eval(args)
    except (TokredError, OSError) as exc:
        error = exc
    failure = distributed.first_failure(error, info)  # the same mistake on every process is reported once
    if failure is not None:
        if error is not None and (info.is_main or getattr(args, "debug", False)):
            raise error
        if info.is_main:
            raise InvalidInputError(f"process {failure[0]} of {info.world_size}: {failure[1]}")
        return 2  # rank 0 reports it
    warning = _check_classes(model, dataset.classes)
    if warning is not None and info.is_main:
        print(f"tokred mamba eval: WARNING: {warning}", file=sys.stderr)
    names = getattr(model, "class_names", None)
    # With named classes, a folder's label is the model's index of its name; else the sorted order.
    label_of = [names.index(c) if names and c in names else i for i, c in enumerate(dataset.classes)]
    total = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    mine = distributed.shard(total, info.rank, info.world_size)  # every world_size-th image from this rank
    rows: list[tuple[str, str, int, list[int]]] = []
    start = time.perf_counter()
    # Rank 0's bar counts every process's images, taking the others to keep its pace.
    with tqdm(total=total, desc="tokred mamba eval", unit="img", disable=args.no_progress or not info.is_main) as bar:
        for begin in range(0, len(mine), args.batch_size):
            indices = mine[begin : begin + args.batch_size]
            batch = [dataset[i] for i in indices]
            images = torch.stack([image for image, _ in batch]).to(args.device)
            with torch.inference_mode():
                best = model(images).topk(min(5, model.num_classes), dim=-1).indices.cpu()
            for i, (_, label), top in zip(indices, batch, best.tolist(), strict=True):
                path, _ = dataset.samples[i]
                rows.append((str(path), dataset.classes[label], label_of[label], top))
            bar.update(min(total, len(rows) * info.world_size) - bar.n)
    parts = distributed.gather_to_main(rows, info)
    elapsed = time.perf_counter() - start
    if parts is None:  # not rank 0: its predictions are in rank 0's outputs
        return 0
    predictions = distributed.unshard(parts, total)
    top1 = sum(top[0] == label for _, _, label, top in predictions)
    top5 = sum(label in top for _, _, label, top in predictions)
    results = {
        "model": model.model_name,
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "data": str(args.data),
        "images": total,
        "skipped": dataset.skipped,
        "top1": top1 / total,
        "top5": top5 / total,
        "reducer": None if handle is None else repr(handle.reducer),
        "schedule": None if handle is None else {str(k): v for k, v in handle.schedule.items()},
        "gflops": _gflops(model),
        "images_per_second": total / elapsed if elapsed > 0 else None,
        "device": str(args.device),
        "processes": info.world_size,
        "warning": warning,
    }
    print(f"model {model.model_name}: {_describe(model)}")
    print(f"images: {total} evaluated, {dataset.skipped} skipped (not readable images)")
    print(f"top-1: {100 * results['top1']:.2f}%  top-5: {100 * results['top5']:.2f}%")
    processes = f" ({info.world_size} processes)" if info.distributed else ""
    print(f"throughput: {results['images_per_second']:.1f} images/s on {args.device}{processes}")
    if args.out is not None:
        _write_eval(args.out, results, predictions, names)
        print(f"results: {(args.out / 'results.json').resolve()}")
    return 0


def _gflops(model: Any) -> float:
    from tokred.mamba import count_flops

    return count_flops(model) / 1e9


def _write_eval(
    out: Path, results: dict[str, Any], predictions: list[tuple[str, str, int, list[int]]], names: Sequence[str] | None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    with (out / "predictions.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "class", "label", "prediction", "prediction_name", "correct", "top5"])
        for path, cls, label, top in predictions:
            predicted = top[0]
            writer.writerow(
                [
                    path,
                    cls,
                    label,
                    predicted,
                    names[predicted] if names else "",
                    int(predicted == label),
                    " ".join(map(str, top)),
                ]
            )
