r"""``tokred vlm …``: run a transformers vision-language model on images, dense or with fewer visual tokens.

``tokred vlm generate`` loads a checkpoint (a local folder written by ``save_pretrained`` or a Hugging Face Hub id)
with ``AutoProcessor`` and ``AutoModelForImageTextToText``, builds the prompt with the processor's chat template,
attaches a reducer with :func:`tokred.vlm.attach` and prints the answer with the reduction's statistics; with
``--compare`` it also runs the dense model on the same inputs. ``tokred vlm models`` lists the supported models.

Examples::

    tokred vlm models
    tokred vlm generate --model llava-hf/llava-1.5-7b-hf --image cat.png --prompt "Describe the image." --num-keep 64
    tokred vlm generate --model Qwen/Qwen2-VL-2B-Instruct --image a.jpg --image b.jpg --prompt "Compare." --compare \
        --keep-ratio 0.25

Without torchvision, transformers cannot build the video processor of Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision or
Video-LLaVA; the processor is then loaded without it, which is all ``generate`` needs (it takes images only).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["register"]

_PREFIX = "tokred vlm"
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_ATTENTION = ("eager", "sdpa", "flash_attention_2")


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

    models = commands.add_parser("models", help="list the supported model classes and their defaults")
    models.set_defaults(func=_run_models)

    generate = commands.add_parser(
        "generate",
        help="answer a prompt about images, with a reducer attached",
        description="Answer a prompt about one or more images with greedy decoding, dense or with fewer visual "
        "tokens, and print the answer with the reduction's statistics.",
    )
    generate.add_argument("--model", required=True, help="local folder (save_pretrained) or Hugging Face Hub id")
    generate.add_argument(
        "--image", action="append", required=True, metavar="FILE", help="image file; repeat for several images"
    )
    generate.add_argument("--prompt", required=True, help="the question or instruction")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate (default 64)")
    generate.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    generate.add_argument("--dtype", default="auto", choices=_DTYPES, help="parameter dtype (default: auto)")
    generate.add_argument(
        "--attn-implementation", default=None, choices=_ATTENTION, help="attention kernel (default: the model's)"
    )
    group = generate.add_argument_group("token reduction")
    group.add_argument("--reducer", default="apet", help="reducer name (apet, random, …) or 'none' (default: apet)")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument("--num-keep", type=_positive_int, default=None, help="visual tokens kept per image/crop/frame")
    budget.add_argument("--keep-ratio", type=float, default=None, help="fraction of each group's tokens kept")
    group.add_argument(
        "--reducer-arg",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="reducer hyper-parameter, e.g. num_basis=16 or variant=reference; repeatable",
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
    group.add_argument("--seed", type=int, default=0, help="seed for stochastic reducers (default 0)")
    group.add_argument(
        "--compare",
        action="store_true",
        help="also run the dense model and print both answers and timings (after one untimed warm-up step)",
    )
    generate.set_defaults(func=_run_generate)


# -- argument types --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE``; the value is a Python literal (``16``, ``0.5``, ``true``, ``None``) or a string."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    lowered = raw.strip().lower()
    if lowered in ("true", "false", "none"):
        return key, {"true": True, "false": False, "none": None}[lowered]
    try:
        return key, ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        return key, raw


def _fail(message: str) -> SystemExit:
    """A one-line error for ``raise``: the interpreter prints it to stderr and exits with status 1."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return SystemExit(f"{_PREFIX}: {' '.join(lines)}")


# -- tokred vlm models -----------------------------------------------------------------------------------------


def _run_models(args: argparse.Namespace) -> int:
    from tokred.vlm.models import SUPPORTED_MODELS

    rows = [("family", "model", "class", "inputs", "space", "positions")]
    for family in SUPPORTED_MODELS:
        spaces = [family.default_space] + [s for s in ("vision", "llm") if s != family.default_space]
        space = "|".join(spaces if family.vision_space else ["llm"])
        inputs = "+".join(family.modalities)
        for name in family.class_names:
            rows.append((family.name, family.title, name, inputs, space, family.default_positions))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(
        "\nspace: where the reducer can run, the default first; positions: the default. The defaults are those of "
        "ApET's released code; `tokred vlm generate --space/--positions` override them."
    )
    return 0


# -- loading ---------------------------------------------------------------------------------------------------


def _load_processor(model_id: str) -> Any:
    """The model's processor, or a one-line error and exit."""
    from tokred.vlm.processors import load_processor

    try:
        return load_processor(model_id, warn=lambda note: print(f"{_PREFIX}: {note}", file=sys.stderr))
    except (OSError, ValueError) as error:
        raise _fail(str(error)) from None


def _check_model_path(model_id: str) -> None:
    """Fail early on a local path that does not exist (a Hub id is ``name`` or ``owner/name``)."""
    path = Path(model_id).expanduser()
    looks_local = path.is_absolute() or model_id.startswith((".", "~")) or model_id.count("/") > 1
    if looks_local and not path.is_dir():
        raise _fail(f"model folder not found: {model_id}")


def _load_model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(args.model, **kwargs)
        return model.to(torch.device(args.device)).eval()
    except Exception as exc:
        raise _fail(f"cannot load the model {args.model}: {type(exc).__name__}: {exc}") from exc


def _load_images(paths: Sequence[str]) -> list[Any]:
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except FileNotFoundError:
            raise _fail(f"image file not found: {path}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise _fail(f"cannot read image {path}: {exc}") from None
    return images


def _build_reducer(args: argparse.Namespace) -> Any | None:
    """The reducer the arguments ask for, or None for a dense run."""
    dense = args.reducer is None or args.reducer.lower() == "none"
    budget = {"num_keep": args.num_keep} if args.num_keep is not None else {}
    if args.keep_ratio is not None:
        budget = {"keep_ratio": args.keep_ratio}
    extra = dict(args.reducer_arg)
    if dense:
        if budget or extra or args.compare:
            raise _fail("--num-keep / --keep-ratio / --reducer-arg / --compare need a reducer (not --reducer none)")
        return None
    if not budget:
        raise _fail(f"--reducer {args.reducer} needs --num-keep or --keep-ratio (or --reducer none for a dense run)")
    clash = sorted({"num_keep", "keep_ratio", "num_remove"} & extra.keys())
    if clash:
        raise _fail(f"give the budget with --num-keep or --keep-ratio, not --reducer-arg {clash[0]}")
    import tokred.vlm  # noqa: F401  (registers "apet")
    from tokred.core import create_reducer, get_reducer_class

    try:
        if get_reducer_class(args.reducer).stochastic and "seed" not in extra:
            extra["seed"] = args.seed
        return create_reducer(args.reducer, **budget, **extra)
    except (LookupError, ImportError, TypeError, ValueError) as exc:
        raise _fail(f"reducer {args.reducer!r}: {exc}") from None


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
        raise _fail(f"the processor could not prepare the inputs: {type(exc).__name__}: {exc}") from exc
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


def _generate(model: Any, processor: Any, inputs: dict[str, Any], max_new_tokens: int, handle: Any = None) -> _Run:
    import torch

    input_ids = inputs["input_ids"]
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = output[:, input_ids.shape[1] :]
    text = processor.batch_decode(new, skip_special_tokens=True)[0].strip()
    prefill = handle.last_prefill if handle is not None else None
    return _Run(text, int(new.shape[1]), seconds, prefill, int(input_ids.shape[1]), _visual_tokens(model, input_ids))


def _stats(label: str, run: _Run, dense: _Run | None = None) -> str:
    if run.prefill is None:
        line = f"{label}: {run.visual} visual tokens, prefill {run.length} tokens"
    else:
        p = run.prefill
        line = (
            f"{label}: visual tokens kept {p.kept_visual_tokens}/{p.visual_tokens}, "
            f"prefill {p.original_length} -> {p.reduced_length} tokens"
        )
    line += f", {run.new_tokens} new tokens in {run.seconds:.2f} s"
    if dense is not None and run.seconds > 0:
        line += f" ({dense.seconds / run.seconds:.2f}x the dense speed)"
    return line


def _label(args: argparse.Namespace, handle: Any) -> str:
    budget = f"num_keep={args.num_keep}" if args.num_keep is not None else f"keep_ratio={args.keep_ratio}"
    extra = "".join(f", {key}={value!r}" for key, value in args.reducer_arg)
    return f"{args.reducer} ({budget}{extra}; {handle.space} space, {handle.positions} positions)"


def _run_generate(args: argparse.Namespace) -> int:
    reducer = _build_reducer(args)  # argument errors first, before anything is loaded
    images = _load_images(args.image)
    _check_model_path(args.model)
    processor = _load_processor(args.model)
    model = _load_model(args)
    inputs = _inputs(processor, model, images, args.prompt)

    if reducer is None:
        dense = _generate(model, processor, inputs, args.max_new_tokens)
        print(dense.text)
        print(_stats("dense", dense))
        return 0

    from tokred.vlm import attach

    try:
        handle = attach(model, reducer, space=args.space, positions=args.positions)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    handle.detach()  # attached again for the reduced run; the dense one runs on the untouched model
    dense = None
    if args.compare:
        _generate(model, processor, inputs, 1)  # untimed warm-up, so neither timed run pays first-call costs
        dense = _generate(model, processor, inputs, args.max_new_tokens)
    with attach(model, reducer, space=args.space, positions=args.positions) as handle:
        reduced = _generate(model, processor, inputs, args.max_new_tokens, handle)
    if reduced.prefill is None:
        raise _fail("the reducer did not run: the model encoded no visual tokens")
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


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience for `python -m`
    """Run ``tokred vlm …`` directly.

    Args:
        argv: Arguments after ``tokred vlm``; default ``sys.argv[1:]``.

    Returns:
        The exit code.
    """
    from tokred.core.cli import main as tokred_main

    return tokred_main(["vlm", *(argv if argv is not None else sys.argv[1:])])
