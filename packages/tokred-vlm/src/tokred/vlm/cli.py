r"""``tokred vlm …``: run a transformers vision-language model on images, dense or with fewer visual tokens.

``tokred vlm generate`` loads a checkpoint — a named one (``llava_scenes``, the reference model of tokred-bench),
a local folder written by ``save_pretrained`` or a Hugging Face Hub id — with ``AutoProcessor`` and
``AutoModelForImageTextToText``, builds the prompt with the processor's chat template, attaches a reducer with
[`tokred.vlm.attach`][tokred.vlm.attach] and prints the answer with the reduction's statistics; with ``--compare``
it also runs the dense model on the same inputs. ``tokred vlm eval`` scores a checkpoint on lmms-eval tasks
([`tokred.vlm.eval`][tokred.vlm.eval]). ``tokred vlm models`` lists the supported model families and the
named checkpoints.

A few commands:

```bash
tokred vlm models
tokred vlm generate --model llava-hf/llava-1.5-7b-hf --prompt "Describe the image." --num-keep 64 cat.png
tokred vlm generate --model Qwen/Qwen2-VL-2B-Instruct --prompt "Compare." --compare --keep-ratio 0.25 a.jpg b.jpg
tokred vlm generate --model llava_scenes --prompt "what color is the striped object?" --num-keep 28 scene.png
tokred vlm generate --model llava-hf/llava-1.5-7b-hf --prompt "Describe." --num-keep 96 --layers 16:32 cat.png
tokred vlm generate --model llava-hf/llava-1.5-7b-hf --prompt "Describe." --average 64 cat.png  # the same
tokred vlm eval --model llava-hf/llava-1.5-7b-hf --tasks gqa,pope --average 64 --compare --out results/
```

Without torchvision, transformers cannot build the video processor of Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision or
Video-LLaVA; the processor is then loaded without it, which is all ``generate`` needs (it takes images only).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokred.core.cli.main import set_command
from tokred.core.cli.options import add_device_argument, add_reducer_arguments, fraction, name_list, positive_int
from tokred.core.cli.tables import format_table
from tokred.core.errors import InvalidInputError, MissingFileError, TokredError

__all__ = ["register"]

_PREFIX = "tokred vlm generate"
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_ATTENTION = ("eager", "sdpa", "flash_attention_2")


class ModelLoadError(TokredError, OSError):
    """A model or processor that ``from_pretrained`` could not load; the message says which and why."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``vlm`` subcommand group to the ``tokred`` command.

    Args:
        subparsers: The ``tokred`` command's sub-parsers.
    """
    parser = subparsers.add_parser(
        "vlm",
        help="vision-language models: generate with fewer visual tokens, list the supported models",
        description="Run transformers vision-language models on images, dense or with visual-token reduction.",
    )
    commands = parser.add_subparsers(dest="vlm_command", metavar="COMMAND", required=True)

    models = commands.add_parser(
        "models",
        help="list the supported model families and the named checkpoints",
        description="List the model families attach() supports, with their defaults, and the named checkpoints.",
    )
    set_command(models, _run_models)

    generate = commands.add_parser(
        "generate",
        help="answer a prompt about images, with a reducer attached",
        description="Answer a prompt about one or more images with greedy decoding, dense or with fewer visual "
        "tokens, and print the answer with the reduction's statistics.",
    )
    generate.add_argument(
        "--model", required=True, metavar="MODEL", help="named checkpoint (see `tokred vlm models`), folder or Hub id"
    )
    generate.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
    generate.add_argument(
        "--image", action="append", default=[], metavar="FILE", help="an image file; repeatable (or give them as IMAGE)"
    )
    generate.add_argument("--prompt", required=True, help="the question or instruction")
    generate.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="most tokens to generate (default: the checkpoint's generation config, else 64)",
    )
    add_device_argument(generate)
    generate.add_argument("--dtype", default="auto", choices=_DTYPES, help="parameter dtype (default: auto)")
    generate.add_argument(
        "--attn-implementation", default=None, choices=_ATTENTION, help="attention kernel (default: the model's)"
    )
    _add_reduction_arguments(generate)
    generate.add_argument(
        "--compare",
        action="store_true",
        help="also run the dense model and print both answers and timings (after one untimed warm-up step)",
    )
    set_command(generate, _run_generate)

    evaluate = commands.add_parser(
        "eval",
        help="score a model with a reducer on lmms-eval tasks (needs the eval extra)",
        description="Run lmms-eval's evaluator on a checkpoint with a reducer attached (and, with --compare, "
        "without) and write results.json, summary.md and the logged samples. Under torchrun or accelerate "
        "launch, every process evaluates its share of the documents and rank 0 writes.",
    )
    evaluate.add_argument(
        "--model", required=True, metavar="MODEL", help="named checkpoint (see `tokred vlm models`), folder or Hub id"
    )
    evaluate.add_argument(
        "--tasks", required=True, type=name_list, metavar="TASK[,TASK]", help="lmms-eval tasks, e.g. gqa,pope"
    )
    evaluate.add_argument("--limit", type=positive_int, default=None, help="at most N documents per task")
    evaluate.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the files go (created)")
    evaluate.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of more task YAML files; repeatable (tasks that packages ship, such as tokred_scenes, "
        "are found without it)",
    )
    evaluate.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="cpu, cuda, cuda:1 (default: each process's accelerate device: its GPU, else the CPU)",
    )
    evaluate.add_argument("--dtype", default="auto", choices=_DTYPES, help="parameter dtype (default: auto)")
    evaluate.add_argument(
        "--attn-implementation", default=None, choices=_ATTENTION, help="attention kernel (default: the model's)"
    )
    evaluate.add_argument("--no-progress", action="store_true", help="draw no progress bar")
    _add_reduction_arguments(evaluate)
    evaluate.add_argument(
        "--compare",
        action="store_true",
        help="also evaluate the dense model and report the fraction of each metric the reducer keeps",
    )
    set_command(evaluate, _run_eval)


def _add_reduction_arguments(parser: argparse.ArgumentParser) -> None:
    """The reducer, its budget, the inner stages, ``--space`` and ``--positions`` of ``generate`` and ``eval``."""
    group = parser.add_argument_group("token reduction")
    add_reducer_arguments(group, default="apet")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument(
        "--num-keep", type=positive_int, default=None, help="visual tokens kept per image, crop or frame"
    )
    budget.add_argument("--keep-ratio", type=fraction, default=None, help="fraction of each group's tokens kept")
    budget.add_argument(
        "--average",
        type=_average,
        default=None,
        metavar="A",
        help="the paper's two-stage schedule: A visual tokens per image averaged over the decoder layers "
        "(1.5 A kept, then 0.5 A after half of the layers); a fraction such as 0.2 for a share of each image",
    )
    group.add_argument(
        "--layers",
        type=_stages,
        default=None,
        metavar="L:K[,L:K]",
        help="inner stages: after decoder layer L reduce again to K tokens per image (a fraction: of what is left), "
        "with the same reducer; e.g. 16:32",
    )
    group.add_argument(
        "--space", default=None, choices=["vision", "llm"], help="where the reducer runs (default: the family's)"
    )
    group.add_argument(
        "--positions",
        default=None,
        choices=["original", "compact"],
        help="positions of the kept tokens (default: the family's)",
    )


# -- tokred vlm models -----------------------------------------------------------------------------------------


def _run_models(args: argparse.Namespace) -> int:
    from tokred.vlm.checkpoints import CHECKPOINTS
    from tokred.vlm.models import available_adapters

    rows = []
    for adapter in available_adapters():
        spaces = [adapter.default_space] + [s for s in ("vision", "llm") if s != adapter.default_space]
        space = "|".join(spaces if adapter.vision_space_refusal is None else ["llm"])
        inputs = "+".join(adapter.modalities)
        for name in adapter.model_classes:
            rows.append([adapter.name, adapter.title, name, inputs, space, adapter.default_positions])
    print(format_table(["family", "model", "class", "inputs", "space", "positions"], rows), end="")
    print(
        "\nspace: where the reducer can run, the default first; positions: the default. The defaults are those of "
        "ApET's released code; `tokred vlm generate --space/--positions` override them."
    )
    entries = {entry.name: entry for entry in CHECKPOINTS.entries()}
    if entries:
        named = []
        for name, entry in entries.items():
            doc = (getattr(CHECKPOINTS.get(name), "__doc__", "") or "").strip().splitlines()
            named.append([name, entry.distribution or "-", doc[0] if doc else ""])
        print("\nnamed checkpoints (tokred vlm generate --model NAME):\n")
        print(format_table(["name", "package", "description"], named), end="")
    return 0


# -- loading ---------------------------------------------------------------------------------------------------


def _resolve_model(model_id: str) -> str:
    """A named checkpoint's folder, or the id itself; a local path that does not exist fails early."""
    from tokred.vlm.checkpoints import resolve_model

    resolved = resolve_model(model_id)
    path = Path(resolved).expanduser()
    looks_local = path.is_absolute() or resolved.startswith((".", "~")) or resolved.count("/") > 1 or path.exists()
    if looks_local and path.is_file():
        raise MissingFileError(f"--model {model_id}: is a file; give a checkpoint folder (save_pretrained) or a Hub id")
    if looks_local and not path.is_dir():
        raise MissingFileError(f"model folder not found: {model_id}")
    return resolved


def _load_processor(model_id: str) -> Any:
    """The model's processor."""
    from tokred.vlm.processors import load_processor

    try:
        return load_processor(model_id, warn=lambda note: print(f"{_PREFIX}: {note}", file=sys.stderr))
    except (OSError, ValueError) as error:
        if isinstance(error, TokredError):
            raise
        raise ModelLoadError(str(error)) from error


def _load_model(args: argparse.Namespace, model_id: str) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
        return model.to(args.device).eval()
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model {args.model}: {type(exc).__name__}: {exc}") from exc


def _load_images(paths: Sequence[str]) -> list[Any]:
    from PIL import Image, UnidentifiedImageError

    if not paths:
        raise InvalidInputError("give at least one image file (IMAGE or --image FILE)")
    images = []
    for path in paths:
        if Path(path).is_dir():
            raise MissingFileError(f"{path} is a folder, not an image file")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except FileNotFoundError:
            raise MissingFileError(f"image file not found: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise InvalidInputError(f"cannot read image {path}: {exc}") from None
    return images


def _average(text: str) -> int | float:
    """``--average``: a number of tokens (an integer >= 2) or a fraction in (0, 2/3]."""
    from tokred.vlm.options import parse_average

    try:
        return parse_average(text)
    except InvalidInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _stages(text: str) -> tuple[tuple[int, int | float], ...]:
    """``--layers``: comma-separated ``L:K`` with ``L`` a decoder layer and ``K`` tokens or a fraction."""
    from tokred.vlm.options import parse_layers

    try:
        return parse_layers(text)
    except InvalidInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _options(args: argparse.Namespace) -> Any:
    """The reduction the arguments ask for, as [`ReductionOptions`][tokred.vlm.options.ReductionOptions]."""
    from tokred.vlm.options import ReductionOptions

    return ReductionOptions(
        reducer=args.reducer,
        num_keep=args.num_keep,
        keep_ratio=args.keep_ratio,
        average=args.average,
        layers=tuple(args.layers or ()),
        reducer_args=dict(args.reducer_arg),
        seed=args.seed,
        space=args.space,
        positions=args.positions,
    )


def _build_schedule(args: argparse.Namespace) -> Callable[[Any], dict[str, Any]] | None:
    """What the arguments ask for, as a function of the loaded model giving ``attach``'s keyword arguments.

    None for a dense run. Every argument error is raised here, before anything is loaded.
    """
    options = _options(args)
    if options.dense and args.compare:
        raise InvalidInputError("--compare needs a reducer (not --reducer none)")
    return options.schedule()


# -- prompt and run --------------------------------------------------------------------------------------------


def _prompt_text(processor: Any, num_images: int, prompt: str) -> str:
    """The text the processor expands: the chat template's rendering, else image placeholders and the prompt."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", None) or "<image>"
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:  # Qwen wraps each image
        image_token = f"<|vision_start|>{image_token}<|vision_end|>"
    return "".join(image_token + "\n" for _ in range(num_images)) + prompt


def _inputs(processor: Any, model: Any, images: list[Any], prompt: str) -> dict[str, Any]:
    text = _prompt_text(processor, len(images), prompt)
    options: dict[str, Any] = {}
    preprocess = getattr(getattr(processor, "image_processor", None), "preprocess", None)
    if preprocess is not None and "return_legacy_image_output" in inspect.signature(preprocess).parameters:
        options["return_legacy_image_output"] = False  # Video-LLaVA: `pixel_values`, not the deprecated name
    try:
        batch = processor(text=[text], images=[images], return_tensors="pt", **options)
    except Exception as exc:
        raise InvalidInputError(f"the processor could not prepare the inputs: {type(exc).__name__}: {exc}") from exc
    device, dtype = model.device, model.dtype
    return {
        key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        for key, value in batch.items()
        if hasattr(value, "to")
    }


@dataclass
class _Run:
    text: str
    new_tokens: int
    seconds: float
    prefill: Any  # PrefillStats of the reduced run, None for a dense one
    length: int  # prompt length in tokens
    visual: int  # visual placeholder tokens in the prompt


def _visual_tokens(model: Any, input_ids: Any) -> int:
    ids = {getattr(model.config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")}
    return sum(int((input_ids == i).sum()) for i in ids if isinstance(i, int))


def _max_new_tokens(model: Any, requested: int | None) -> int:
    # A checkpoint trained for short answers says so in its generation config; 64 suits chat models.
    if requested is not None:
        return requested
    configured = getattr(getattr(model, "generation_config", None), "max_new_tokens", None)
    return configured if isinstance(configured, int) and configured > 0 else 64


def _generate(model: Any, processor: Any, inputs: dict[str, Any], max_new_tokens: int, handle: Any = None) -> _Run:
    import torch

    input_ids = inputs["input_ids"]
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = output[:, input_ids.shape[1] :]
    text = processor.batch_decode(new, skip_special_tokens=True)[0].strip()
    prefill = handle.last_stats if handle is not None else None
    return _Run(text, int(new.shape[1]), seconds, prefill, int(input_ids.shape[1]), _visual_tokens(model, input_ids))


def _stats(label: str, run: _Run, dense: _Run | None = None) -> str:
    p = run.prefill
    if p is None:
        line = f"{label}: {run.visual} visual tokens, prefill {run.length} tokens"
    else:
        line = (
            f"{label}: visual tokens kept {p.kept_visual_tokens}/{p.visual_tokens}, "
            f"prefill {p.original_length} -> {p.reduced_length} tokens"
        )
    line += f", {run.new_tokens} new token{'' if run.new_tokens == 1 else 's'} in {run.seconds:.2f} s"
    if dense is not None and run.seconds > 0:
        line += f" ({dense.seconds / run.seconds:.2f}x the dense speed)"
    if p is not None and p.stages:
        stages = ", ".join(f"{stage.length} tokens from layer {stage.layer}" for stage in p.stages)
        line += f"; {stages}; {p.average_visual_tokens:.1f} visual tokens per group averaged over the layers"
    if p is not None and p.dense_decoder_flops:
        line += f"; decoder FLOPs {p.decoder_flops / p.dense_decoder_flops:.0%} of dense"
    return line


def _budget_text(budget: Any) -> str:
    for name in ("num_keep", "keep_ratio", "num_remove"):
        value = getattr(budget, name)
        if value is not None:
            return f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
    return "no budget"


def _label(args: argparse.Namespace, handle: Any) -> str:
    budget = _budget_text(handle.reducer.budget)
    stages = "".join(f", then {_budget_text(s.reducer.budget)} after layer {s.layer}" for s in handle.stages)
    extra = "".join(f", {key}={value!r}" for key, value in args.reducer_arg)
    return f"{args.reducer} ({budget}{stages}{extra}; {handle.space} space, {handle.positions} positions)"


def _check_family(model_id: str, args: argparse.Namespace) -> None:
    """Refuse a model family or options that cannot run, from the checkpoint's config, before loading weights."""
    from transformers import AutoConfig

    from tokred.vlm.models import available_adapters

    try:
        config = AutoConfig.from_pretrained(model_id)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the config of {args.model}: {type(exc).__name__}: {exc}") from exc
    architectures = set(getattr(config, "architectures", None) or ())
    adapter = next((a for a in available_adapters() if architectures & set(a.model_classes)), None)
    if adapter is None:
        return  # attach() names the supported classes once the model is built
    space = args.space or adapter.default_space
    positions = args.positions or adapter.default_positions
    adapter.check_options(space, positions, "frame")
    num_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    for layer, _ in args.layers or ():
        if num_layers is not None and not 1 <= layer <= num_layers - 1:
            raise InvalidInputError(
                f"--layers {layer}:…: the model has {num_layers} decoder layers, so an inner stage follows layer 1 "
                f"to {num_layers - 1}"
            )


def _run_generate(args: argparse.Namespace) -> int:
    build_schedule = _build_schedule(args)  # argument errors first, before anything is loaded
    images = _load_images([*args.images, *args.image])
    model_id = _resolve_model(args.model)
    if build_schedule is not None:
        _check_family(model_id, args)
    processor = _load_processor(model_id)
    model = _load_model(args, model_id)
    inputs = _inputs(processor, model, images, args.prompt)
    args.max_new_tokens = _max_new_tokens(model, args.max_new_tokens)

    if build_schedule is None:
        dense = _generate(model, processor, inputs, args.max_new_tokens)
        print(dense.text)
        print(_stats("dense", dense))
        return 0

    from tokred.vlm import attach

    schedule = build_schedule(model)
    handle = attach(model, **schedule)  # refusals before any run
    handle.detach()  # attached again for the reduced run; the dense one runs on the untouched model
    dense = None
    if args.compare:
        _generate(model, processor, inputs, 1)  # untimed warm-up, so neither timed run pays first-call costs
        dense = _generate(model, processor, inputs, args.max_new_tokens)
    with attach(model, **schedule) as handle:
        reduced = _generate(model, processor, inputs, args.max_new_tokens, handle)
    if reduced.prefill is None:
        raise InvalidInputError("the reducer did not run: the model encoded no visual tokens")
    label = _label(args, handle)
    if dense is None:
        print(reduced.text)
        print(_stats(label, reduced))
        return 0
    print(f"--- dense\n{dense.text}")
    print(f"--- {label}\n{reduced.text}")
    print(_stats("dense", dense))
    print(_stats(args.reducer, reduced, dense))
    return 0


# -- tokred vlm eval -------------------------------------------------------------------------------------------


def _run_eval(args: argparse.Namespace) -> int:
    from tokred.vlm.eval.run import evaluate

    options = _options(args)
    if options.dense and args.compare:
        raise InvalidInputError("--compare needs a reducer (not --reducer none)")
    options.schedule()  # argument errors first, before lmms-eval is even imported
    evaluate(
        args.model,
        args.tasks,
        options,
        out=args.out,
        limit=args.limit,
        compare=args.compare,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        include_path=args.include_path,
        progress=not args.no_progress,
    )
    return 0
