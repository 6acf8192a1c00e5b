"""The ``tokred`` model of lmms-eval: a supported checkpoint with a reducer attached, for every family.

``--model tokred`` resolves to [`Tokred`][tokred.vlm.eval.models.Tokred], which reads the checkpoint's config
and builds the class of its family:

* ``llava``, ``llava_next``, ``llava_onevision``, ``video_llava``:
  [`TokredLlava`][tokred.vlm.eval.models.TokredLlava], which extends the stock chat class ``llava_hf``;
* ``qwen2_vl``, ``qwen2_5_vl``: [`TokredQwenVL`][tokred.vlm.eval.models.TokredQwenVL], which extends the stock
  chat class ``qwen2_5_vl``.

Each keeps the stock class's ``generate_until`` — its prompt (the processor's chat template over lmms-eval's
messages), its preprocessing and its generation settings — so scores compare with published lmms-eval numbers.
Only loading is tokred's own (the stock loaders pick CUDA devices by themselves under data parallelism): the
device is ``accelerate``'s (``cuda:LOCAL_RANK``, or the CPU with ``ACCELERATE_USE_CPU=1``), the model is loaded
with ``AutoModelForImageTextToText`` and the reducer attached with [`attach`][tokred.vlm.attach]. Requests run
one at a time, so that every sample's statistics are its own
([`TokredCounts`][tokred.vlm.eval.models.TokredCounts], in lmms-eval's sample logs under ``token_counts``).

Importing this module needs the ``eval`` extra.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tokred.core.errors import InvalidInputError, TokredError
from tokred.vlm.eval import MODEL_ID, require_lmms_eval

require_lmms_eval()

from accelerate import Accelerator  # noqa: E402
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.models.chat.llava_hf import LlavaHf as StockLlavaHf  # noqa: E402
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as StockQwen25VL  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from tokred.vlm.eval.options import split_model_args  # noqa: E402
from tokred.vlm.options import ReductionOptions  # noqa: E402

__all__ = ["FAMILIES", "GenerationFailedError", "Tokred", "TokredCounts", "TokredLlava", "TokredQwenVL"]

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_VISUAL_TOKEN_IDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


class GenerationFailedError(TokredError, RuntimeError):
    """The model produced no prefill for a request (the stock class logged why), or the reducer did not run."""


@dataclass
class TokredCounts(TokenCounts):
    """lmms-eval's per-sample token counts, with what the reduction did to the sample's prefill.

    Attributes:
        visual_tokens: Visual placeholder tokens of the prompt.
        kept_tokens: Visual tokens left after each stage: the first (structural tokens included), then each
            inner stage; empty for the dense model.
        average_tokens: Visual tokens per group averaged over the decoder layers (the paper's count); ``None``
            for the dense model.
        groups: Token groups reduced (images, crops or frames); ``None`` for the dense model.
        prefill_ms: Wall time of the prefill forward pass in milliseconds (the reduction included).
    """

    visual_tokens: int | None = None
    kept_tokens: list[int] = field(default_factory=list)
    average_tokens: float | None = None
    groups: int | None = None
    prefill_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """lmms-eval's counts and tokred's, as logged in a sample's ``token_counts``."""
        counts: dict[str, Any] = dict(super().to_dict())
        counts.update(
            visual_tokens=self.visual_tokens,
            kept_tokens=list(self.kept_tokens),
            average_tokens=self.average_tokens,
            groups=self.groups,
            prefill_ms=self.prefill_ms,
        )
        return counts


class _PrefillProbe:
    """Counts the prompt's visual tokens and times the first forward pass after each reset: the prefill."""

    def __init__(self, model: torch.nn.Module, visual_ids: set[int], device: torch.device) -> None:
        self._visual_ids = visual_ids
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
        ]
        self.reset()

    def reset(self) -> None:
        self.input_tokens: int | None = None
        self.visual_tokens: int | None = None
        self.prefill_ms: float | None = None
        self._start: float | None = None

    def _before(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._start is not None or self.prefill_ms is not None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            self.input_tokens = int(ids.shape[-1])
            self.visual_tokens = sum(int((ids == i).sum()) for i in self._visual_ids)
        self._sync()
        self._start = time.perf_counter()

    def _after(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._start is None or self.prefill_ms is not None:
            return
        self._sync()
        self.prefill_ms = (time.perf_counter() - self._start) * 1000

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _resolve_pretrained(pretrained: Any) -> str:
    from tokred.vlm.checkpoints import resolve_model

    return resolve_model(str(pretrained))


def _device(requested: Any) -> torch.device:
    # Under data parallelism each process takes accelerate's device: cuda:LOCAL_RANK, or the CPU.
    accelerator = Accelerator()
    if requested is not None and torch.device(requested).type == "cpu":
        return torch.device("cpu")
    if accelerator.num_processes > 1:
        return accelerator.device
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: Any, device: torch.device) -> Any:
    if name not in _DTYPES:
        raise InvalidInputError(f"model_args dtype={name!r}: expected one of {', '.join(_DTYPES)}")
    if name == "auto":  # half precision on the CPU is slow and inexact; elsewhere the checkpoint's dtype
        return torch.float32 if device.type == "cpu" else "auto"
    return getattr(torch, name)


class _Reduced:
    """What every family class adds to its stock class: loading, the reducer, per-sample statistics."""

    is_simple = False
    stock_keys: ClassVar[tuple[str, ...]] = ()
    progress: bool = True
    """Whether rank 0 draws a progress bar over the requests (``tokred vlm eval --no-progress`` turns it off)."""

    def _setup(self, model_args: dict[str, Any]) -> dict[str, Any]:
        """Check the options, load the model, attach the reducer; returns the stock options given."""
        lmms.__init__(self)  # type: ignore[arg-type]
        reduction, loading, stock = split_model_args(model_args, self.stock_keys)
        build = reduction.schedule()  # every option mistake before minutes of loading
        batch_size = int(loading.get("batch_size", 1) or 1)
        if batch_size != 1:
            raise InvalidInputError(
                f"--model {MODEL_ID} runs one request at a time, so that each sample's statistics are its own; "
                f"give batch_size 1, not {batch_size}"
            )
        self.reduction: ReductionOptions = reduction
        self.pretrained = str(loading["pretrained"])
        path = _resolve_pretrained(self.pretrained)
        self.accelerator = Accelerator()
        self._device = _device(loading.get("device"))
        self.device_map = str(self._device)
        self._model = self._load_model(path, _dtype(loading.get("dtype", "auto"), self._device), loading)
        self._config = self._model.config
        self.batch_size_per_gpu = 1
        self._max_length = 2048
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._quiet = False
        self.handle = None
        if build is not None:
            from tokred.vlm import attach

            self.handle = attach(self._model, **build(self._model))
        config = self._model.config
        visual_ids = {getattr(config, name, None) for name in _VISUAL_TOKEN_IDS}
        self._probe = _PrefillProbe(self._model, {i for i in visual_ids if isinstance(i, int)}, self._device)
        self._path = path
        return stock

    def _load_model(self, path: str, dtype: Any, loading: dict[str, Any]) -> Any:
        from transformers import AutoModelForImageTextToText

        options: dict[str, Any] = {"dtype": dtype}
        if loading.get("attn_implementation"):
            options["attn_implementation"] = loading["attn_implementation"]
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, **options)
        except Exception as exc:
            raise InvalidInputError(f"cannot load the model {self.pretrained}: {type(exc).__name__}: {exc}") from exc
        return model.to(self._device).eval()

    def _load_processor(self, **options: Any) -> Any:
        from tokred.vlm.processors import load_processor

        return load_processor(self._path, **options)

    @property
    def rank(self) -> int:
        # The stock loop draws a bar on rank 0 for every call; tokred calls it once per request, so while it
        # runs the stock loop sees no rank 0 and tokred draws a single bar over all requests.
        return -1 if self._quiet else self._rank

    @contextmanager
    def _stock_call(self) -> Iterator[None]:
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """The stock ``generate_until``, one request at a time, each result with its counts.

        Each result carries a [`TokredCounts`][tokred.vlm.eval.models.TokredCounts].

        Raises:
            GenerationFailedError: If a request produced no prefill (the stock class logged the error) or the
                reducer did not run on a prompt with visual tokens.
        """
        results = []
        with tqdm(
            total=len(requests), desc=MODEL_ID, unit="request", disable=self._rank != 0 or not self.progress
        ) as bar:
            for request in requests:
                self._probe.reset()
                if self.handle is not None:
                    self.handle.last_stats = None
                with self._stock_call():
                    (result,) = super().generate_until([request])  # type: ignore[misc]
                results.append(self._with_counts(result, request))
                bar.update(1)
        return results

    def _with_counts(self, result: Any, request: Instance) -> GenerationResult:
        where = f"document {request.doc_id} of task {request.task_name}"
        probe = self._probe
        if probe.prefill_ms is None:
            raise GenerationFailedError(f"the model did not generate for {where} (lmms-eval logged the error above)")
        stats = self.handle.last_stats if self.handle is not None else None
        if self.handle is not None and probe.visual_tokens and stats is None:
            raise GenerationFailedError(f"the reducer did not run for {where}, whose prompt has visual tokens")
        text = result.text if isinstance(result, GenerationResult) else str(result)
        stock_counts = result.token_counts if isinstance(result, GenerationResult) else None
        counts = TokredCounts(
            input_tokens=probe.input_tokens,
            output_tokens=getattr(stock_counts, "output_tokens", None),
            visual_tokens=probe.visual_tokens,
            kept_tokens=[]
            if stats is None
            else [stats.kept_visual_tokens, *(s.kept_visual_tokens for s in stats.stages)],
            average_tokens=None if stats is None else stats.average_visual_tokens,
            groups=None if stats is None else stats.groups,
            prefill_ms=probe.prefill_ms,
        )
        return GenerationResult(text=text, token_counts=counts)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Not served: ``--model tokred`` is a chat model, for generation tasks."""
        raise NotImplementedError(f"--model {MODEL_ID} serves generation tasks (output_type: generate_until)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not served."""
        raise NotImplementedError(f"--model {MODEL_ID} serves single-round generation tasks")


class TokredLlava(_Reduced, StockLlavaHf):
    """LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision and Video-LLaVA checkpoints, prompted as lmms-eval's ``llava_hf``.

    Takes the ``model_args`` of [`tokred.vlm.eval.options`][tokred.vlm.eval.options] and the stock option
    ``use_cache``.
    """

    stock_keys = ("use_cache",)

    def __init__(self, **model_args: Any) -> None:
        stock = self._setup(model_args)
        processor = self._load_processor()
        processor.tokenizer.padding_side = "left"
        self._image_processor = processor
        self._tokenizer = processor.tokenizer
        self.use_cache = bool(stock.get("use_cache", True))
        self.chat_template = None
        self.max_frames_num = 32


class TokredQwenVL(_Reduced, StockQwen25VL):
    """Qwen2-VL and Qwen2.5-VL checkpoints, prompted as lmms-eval's ``qwen2_5_vl``.

    Takes the ``model_args`` of [`tokred.vlm.eval.options`][tokred.vlm.eval.options] and the stock options
    ``min_pixels``, ``max_pixels``, ``max_num_frames``, ``fps`` and ``use_cache`` (lmms-eval's defaults).
    """

    stock_keys = ("min_pixels", "max_pixels", "max_num_frames", "fps", "use_cache")

    def __init__(self, **model_args: Any) -> None:
        stock = self._setup(model_args)
        self.min_pixels = int(stock.get("min_pixels", 256 * 28 * 28))
        self.max_pixels = int(stock.get("max_pixels", 1605632))
        self.max_num_frames = int(stock.get("max_num_frames", 32))
        self.fps = stock.get("fps")
        self.use_cache = bool(stock.get("use_cache", True))
        self.processor = self._load_processor(max_pixels=self.max_pixels, min_pixels=self.min_pixels)
        self._tokenizer = self.processor.tokenizer
        self.system_prompt = "You are a helpful assistant."
        self.interleave_visuals = False
        self.reasoning_prompt = None


FAMILIES: dict[str, type] = {
    "llava": TokredLlava,
    "llava_next": TokredLlava,
    "llava_onevision": TokredLlava,
    "video_llava": TokredLlava,
    "qwen2_vl": TokredQwenVL,
    "qwen2_5_vl": TokredQwenVL,
}
"""The family class of each supported ``model_type``."""


class Tokred(lmms):
    """``--model tokred``: builds the family class of the checkpoint named by ``pretrained``.

    ``Tokred(pretrained=..., **model_args)`` returns a [`TokredLlava`][tokred.vlm.eval.models.TokredLlava] or a
    [`TokredQwenVL`][tokred.vlm.eval.models.TokredQwenVL], chosen by the ``model_type`` of the checkpoint's
    config.

    Raises:
        InvalidInputError: Without ``pretrained``, or for a checkpoint of an unsupported family (the message
            lists the supported ones).
    """

    is_simple = False

    def __new__(cls, **model_args: Any) -> Any:  # noqa: D102
        from transformers import AutoConfig

        if "pretrained" not in model_args:
            raise InvalidInputError(
                "model_args needs pretrained=PATH_OR_HUB_ID (a checkpoint folder, a Hub id or a name)"
            )
        path = _resolve_pretrained(model_args["pretrained"])
        try:
            model_type = AutoConfig.from_pretrained(path).model_type
        except Exception as exc:
            raise InvalidInputError(
                f"cannot read the config of {model_args['pretrained']}: {type(exc).__name__}: {exc}"
            ) from exc
        family = FAMILIES.get(model_type)
        if family is None:
            raise InvalidInputError(
                f"--model {MODEL_ID} does not serve {model_type!r} checkpoints; supported: {', '.join(FAMILIES)}"
            )
        return family(**model_args)

    # lmms-eval's base class declares these abstract; the instance is always a family class.
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:  # noqa: D102
        raise NotImplementedError

    def generate_until(self, requests: list[Instance]) -> list[str]:  # noqa: D102
        raise NotImplementedError

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:  # noqa: D102
        raise NotImplementedError
