"""Prefill time of a LLaVA-1.5-7B-shaped model on the CPU, dense and with ApET at 192 / 128 / 64 visual tokens.

Random weights at realistic shapes (the published checkpoints cannot be downloaded here; speed does not depend
on the weights): a CLIP ViT-L/14-336 vision tower (576 patch tokens from its penultimate layer), LLaVA's
two-layer MLP projector, and a LLaMA-7B-wide decoder (hidden 4096, MLP 11008, 32 heads) with only ``--layers``
layers. Input: one 336 px image and a short prompt of random text tokens around the 576 image placeholders.

Each prefill is one ``model(**inputs, logits_to_keep=1)`` call under ``torch.no_grad`` (what ``generate``
runs first); forward hooks time the vision tower, ApET inside the model, the projector and the language decoder
within the same calls. The dense and reduced runs alternate in every round (in a rotating order), so drifting
background load hits all of them alike; every figure is a median over the rounds, and every speed-up the median
of dense / reduced ratios paired within a round. The language decoder is then also timed alone, replayed on the
exact inputs it received in those prefills (``--decoder-repeats`` rounds; it is cheap, so it gets more of them):
that is the decoder figure the speed-up target is judged on. ApET is also timed on its own, on a
``(batch, 576, 1024)`` CLIP feature tensor (``space="vision"``, LLaVA's default) and on ``(batch, 576, 4096)``
LLM embeddings (``space="llm"``). A 7B-scale prefill is extrapolated as vision tower + projector + 32 x the
measured time of one decoder layer at full length. Run, e.g.:

    uv run python benchmarks/bench_vlm.py                       # fp32, 2 decoder layers, median of 5
    uv run python benchmarks/bench_vlm.py --layers 4 --repeats 3 --keep 192 64
    uv run python benchmarks/bench_vlm.py --quick               # tiny widths, a smoke run of a few seconds

``--two-stage`` adds ApET's two-stage schedule (``paper_schedule(model, average=A)``: ``1.5 A`` tokens per image
in the first half of the decoder, ``0.5 A`` after layer ``layers // 2``, for A in ``--averages``) to the same
alternating rounds, and a table of it against dense and single-stage ApET: prefill and in-prefill decoder time,
the token-count and FLOPs ideals from ``handle.last_stats``, and the inner stage's own cost (tokred's forward
pre-hook of the stage's entry layer, timed by hooks around it in the same prefills, and the inner ApET alone on
a ``(batch, 1.5 A, 4096)`` tensor). It is off by default to keep the default run short; use it with a deeper
decoder, so both halves have several layers (about 11 minutes on 2 idle cores):

    uv run python benchmarks/bench_vlm.py --layers 8 --two-stage --repeats 3 --decoder-repeats 2 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache, LlavaConfig, LlavaForConditionalGeneration

from tokred.bench.measure import time_call
from tokred.bench.speed import IMAGE_TOKEN, llava_7b_config
from tokred.vlm import ApET, Attachment, PrefillStats, attach, paper_schedule
from tokred.vlm.flops import decoder_layer_flops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FULL_DEPTH = 32  # decoder layers of LLaMA-7B / Vicuna-7B, for the 7B-scale extrapolation
TARGET_SPEEDUP = 0.85  # measured decoder speed-up at the smallest budget, as a fraction of the token-count ideal
TARGET_COST = 0.01  # ApET's own time as a fraction of a 7B-scale prefill
SEGMENTS = ("vision", "reduce", "projector", "drop", "decoder")


def build_config(quick: bool, layers: int, attn: str) -> LlavaConfig:
    """LLaVA-1.5-7B's shapes (``--quick``: the same 576 tokens at tiny widths)."""
    config = llava_7b_config(decoder_layers=layers, tiny_widths=quick)
    config._attn_implementation = attn
    return config


def make_inputs(config: LlavaConfig, batch: int, prompt_tokens: int, before: int) -> dict[str, torch.Tensor]:
    """LLaVA-1.5's layout: ``before`` text tokens, 576 image placeholders, then the rest of the prompt."""
    gen = torch.Generator().manual_seed(0)
    num_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    text = torch.randint(1, IMAGE_TOKEN, (batch, prompt_tokens), generator=gen)
    image = torch.full((batch, num_image), IMAGE_TOKEN)
    input_ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
    side = config.vision_config.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch, 3, side, side, generator=gen),
    }


@dataclass(frozen=True)
class Setting:
    """One compared setting: dense, single-stage ``ApET(num_keep=keep)``, or the two-stage schedule at ``average``."""

    keep: int | None = None
    average: int | None = None

    @property
    def label(self) -> str:
        if self.average is not None:
            return f"two-stage avg {self.average}"
        return "dense" if self.keep is None else f"ApET K={self.keep}"

    def attach(self, model: Any) -> Attachment | None:
        """Attach this setting's reducers to ``model`` (None for dense)."""
        if self.average is not None:
            return attach(model, **paper_schedule(model, average=self.average))
        return attach(model, ApET(num_keep=self.keep)) if self.keep is not None else None


DENSE = Setting()


class SegmentTimer:
    """Forward hooks that time the stages of one LLaVA prefill, installed after ``attach`` so they nest inside it.

    * ``vision``: the CLIP tower; ``projector``: the MLP projector's own forward; ``decoder``: the language
      decoder's own forward (after tokred's pre-hook has dropped tokens).
    * ``reduce``: from the first to the last projector pre-hook, i.e. tokred's ``space="vision"`` hook running
      ApET on the pre-projector features; ``drop``: tokred's decoder pre-hook (dropping tokens, positions, mask).
    * ``stage`` (with ``stage_layer``): from the first to the last pre-hook of that decoder layer, i.e. tokred's
      inner-stage hook (ApET on the hidden states, the gather of the survivors, the short mask and rotary
      tables). It runs inside the decoder's forward, so it is part of ``decoder`` too.
    """

    def __init__(self, model: Any, stage_layer: int | None = None) -> None:
        self.start: dict[str, float] = {}
        self.ms: dict[str, float] = defaultdict(float)
        base = model.model
        tower = base.vision_tower
        self.handles = [
            tower.register_forward_pre_hook(self._opener("vision")),
            tower.register_forward_hook(self._closer("vision")),
        ]
        for before, module, name in (
            ("reduce", base.multi_modal_projector, "projector"),
            ("drop", base.language_model, "decoder"),
        ):  # ``before`` spans the module's pre-hooks (tokred's among them), ``name`` the module's own forward
            self.handles += [
                module.register_forward_pre_hook(self._opener(before), prepend=True),
                module.register_forward_pre_hook(self._closer(before)),
                module.register_forward_pre_hook(self._opener(name)),
                module.register_forward_hook(self._closer(name)),
            ]
        if stage_layer is not None:
            layer = base.language_model.layers[stage_layer]
            self.handles += [
                layer.register_forward_pre_hook(self._opener("stage"), prepend=True),
                layer.register_forward_pre_hook(self._closer("stage")),
            ]

    def _opener(self, name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            self.start[name] = time.perf_counter()

        return hook

    def _closer(self, name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            self.ms[name] += (time.perf_counter() - self.start.pop(name)) * 1e3

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def prefill(
    model: Any, inputs: dict[str, torch.Tensor], setting: Setting, capture: dict[str, Any] | None = None
) -> tuple[dict[str, float], PrefillStats | None]:
    """One timed prefill; returns the segment times (ms, ``total`` and ``stage`` included) and tokred's stats.

    With ``capture``, also stores there the arguments the language decoder received (after tokred's hook).
    """
    handle = setting.attach(model)
    timer = SegmentTimer(model, handle.stages[0].layer if handle is not None and handle.stages else None)
    if capture is not None:

        def store(_: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            capture.update(args=args, kwargs=dict(kwargs))

        timer.handles.append(model.model.language_model.register_forward_pre_hook(store, with_kwargs=True))
    try:
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        total = (time.perf_counter() - start) * 1e3
    finally:
        timer.remove()
        if handle is not None:
            handle.detach()
    ms = {name: timer.ms.get(name, 0.0) for name in SEGMENTS}
    ms["total"] = total
    ms["rest"] = total - sum(ms[name] for name in SEGMENTS)
    ms["stage"] = timer.ms.get("stage", 0.0)  # inside ``decoder``, so not part of ``rest``'s sum
    stats = handle.last_stats if handle is not None else None
    assert handle is None or stats is not None, "attach() did not reduce this prefill"
    return ms, stats


def first_stage_shape(inputs: dict[str, torch.Tensor], stats: PrefillStats | None) -> tuple[int, int]:
    """Visual tokens per image and sequence length after the first stage (dense: the input's)."""
    batch, length = inputs["input_ids"].shape
    if stats is None:
        return int((inputs["input_ids"] == IMAGE_TOKEN).sum()) // batch, length
    return stats.kept_visual_tokens // batch, stats.reduced_length


def run_decoder(decoder: Any, call: dict[str, Any]) -> float:
    """Milliseconds of one decoder forward on captured arguments, with a fresh cache as in a prefill."""
    kwargs = dict(call["kwargs"])
    if kwargs.get("past_key_values") is not None:
        kwargs["past_key_values"] = DynamicCache(config=decoder.config)
    start = time.perf_counter()
    decoder(*call["args"], **kwargs)
    return (time.perf_counter() - start) * 1e3


def load_average() -> str:
    """The 1-minute load average, this process's threads included: above the thread count, other work competes."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def progress(what: str, since: float) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[{time.perf_counter() - since:6.0f} s] {what} done, load average {load_average()}", file=sys.stderr)


def paired(dense: list[float], reduced: list[float]) -> float:
    """Median over the rounds of dense / reduced time, each pair measured in the same round."""
    return statistics.median(d / r for d, r in zip(dense, reduced, strict=True))


def token_ideal(stats: PrefillStats | None) -> float:
    """Dense sequence length summed over the decoder layers / the lengths the layers actually ran on."""
    if stats is None:
        return 1.0
    return stats.original_length * stats.num_layers / sum(stats.layer_lengths)


def flops_ideal(stats: PrefillStats | None) -> float:
    """The dense decoder's FLOPs / this prefill's, as tokred counts them (``tokred.vlm.flops``)."""
    return stats.dense_decoder_flops / stats.decoder_flops if stats is not None else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="--two-stage is off by default so that the default run stays short (about 4.5 minutes on 2 cores); "
        "it adds len(--averages) prefills to every round. With --layers 8 the inner stage follows layer 4, the "
        "proportional depth of LLaVA-1.5-7B's layer 16 of 32.",
    )
    parser.add_argument("--keep", type=int, nargs="+", default=[192, 128, 64], help="ApET budgets per image")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built (LLaMA-7B has 32; default 2)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=40, help="text tokens around the image (default 40)")
    parser.add_argument("--before", type=int, default=5, help="of those, how many precede the image (default 5)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefill rounds, after a warm-up round")
    parser.add_argument(
        "--decoder-repeats", type=int, default=9, help="timed rounds of the decoder alone, after a warm-up round"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all CPUs)")
    parser.add_argument("--quick", action="store_true", help="tiny widths (576 tokens kept): a smoke run")
    parser.add_argument(
        "--two-stage",
        action="store_true",
        help="also time ApET's two-stage schedule, attach(model, **paper_schedule(model, average=A)), in the same "
        "alternating rounds, with its inner stage after layer layers // 2; needs --layers >= 2 (8 recommended)",
    )
    parser.add_argument(
        "--averages",
        type=int,
        nargs="+",
        default=[192, 128, 64],
        help="two-stage average budgets per image (default 192 128 64: 288->96, 192->64, 96->32 tokens)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every figure to PATH")
    args = parser.parse_args()
    if args.two_stage and args.layers < 2:
        parser.error("--two-stage needs a decoder of at least 2 layers (--layers 8 recommended)")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dtype = DTYPES[args.dtype]
    wall_start = time.perf_counter()

    config = build_config(args.quick, args.layers, args.attn)
    vision, text = config.vision_config, config.text_config
    start = time.perf_counter()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    build_s = time.perf_counter() - start
    inputs = make_inputs(config, args.batch, args.prompt_tokens, args.before)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    params = sum(p.numel() for p in model.parameters())

    load_start = load_average()
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    print(
        f"CPU: {cpu}, torch {torch.__version__}; {args.dtype}, attn {args.attn}, batch {args.batch}; "
        f"median of {args.repeats} after 1 warm-up round; random weights; load average {load_start}"
    )
    print(
        f"Model: LLaVA-1.5-7B shapes{' (--quick: tiny widths)' if args.quick else ''}: CLIP vision "
        f"{vision.hidden_size}-d x {vision.num_hidden_layers} layers at {vision.image_size} px / {vision.patch_size}, "
        f"feature layer -2; projector {vision.hidden_size}->{text.hidden_size}->{text.hidden_size}; decoder "
        f"{text.hidden_size}-d, MLP {text.intermediate_size}, {text.num_attention_heads} heads, {args.layers} of "
        f"{FULL_DEPTH} layers; {params / 1e6:.0f} M parameters, built in {build_s:.1f} s"
    )
    print(
        "Measured: one model(**inputs, logits_to_keep=1) call under torch.no_grad per run (vision tower + "
        "projector + decoder, the last token's logits); segments by forward hooks inside the same calls; "
        "ApET through attach(model, ApET(num_keep=K)) with the default space='vision' (before the projector)"
        + (", two stages through attach(model, **paper_schedule(model, average=A))" if args.two_stage else "")
        + f". Then the decoder alone, median of {args.decoder_repeats} rounds."
    )

    single = [DENSE, *(Setting(keep=keep) for keep in args.keep)]
    two_stage = [Setting(average=average) for average in args.averages] if args.two_stage else []
    settings = single + two_stage
    runs: dict[Setting, list[dict[str, float]]] = {setting: [] for setting in settings}
    stats: dict[Setting, PrefillStats | None] = {}
    calls: dict[Setting, dict[str, Any]] = {setting: {} for setting in single}
    decoder_runs: dict[Setting, list[float]] = {setting: [] for setting in single}
    decoder = model.model.language_model
    with torch.no_grad():
        # (a, b) whole prefills, dense and reduced, with the stages timed inside them.
        for round_ in range(args.repeats + 1):  # round 0 warms up
            shift = round_ % len(settings)  # rotate the order, so no setting always follows the same one
            for setting in settings[shift:] + settings[:shift]:
                ms, stats[setting] = prefill(model, inputs, setting, calls.get(setting) if round_ == 0 else None)
                if round_:
                    runs[setting].append(ms)
            progress(f"prefill round {round_}/{args.repeats}", wall_start)
        shape = {setting: first_stage_shape(inputs, stats[setting]) for setting in settings}
        # (c) the decoder alone, replayed on the inputs it received in those prefills: cheaper, so more repeats.
        # Single-stage only: an inner stage runs in tokred's layer hooks, which need the whole prefill's context.
        for round_ in range(args.decoder_repeats + 1):
            shift = round_ % len(single)
            for setting in single[shift:] + single[:shift]:
                ms = run_decoder(decoder, calls[setting])
                if round_:
                    decoder_runs[setting].append(ms)
            progress(f"decoder round {round_}/{args.decoder_repeats}", wall_start)
        del calls
        # (d) ApET on its own, on the features it sees in each space.
        num_tokens = shape[DENSE][0]
        gen = torch.Generator().manual_seed(1)
        features = {
            "vision": torch.randn(args.batch, num_tokens, vision.hidden_size, generator=gen).to(dtype),
            "llm": torch.randn(args.batch, num_tokens, text.hidden_size, generator=gen).to(dtype),
        }
        repeats = max(10, 2 * args.repeats)
        alone = {}
        for space, x in features.items():
            for keep in args.keep:
                reducer = ApET(num_keep=keep)
                call = functools.partial(reducer, x)
                alone[(space, keep)] = time_call(call, repeats=repeats, warmup=2).median * 1e3
        # (e) each inner stage's ApET on its own, on a (batch, first-stage tokens, decoder width) tensor.
        inner_alone = {}
        for setting in two_stage:
            (inner,) = paper_schedule(model, average=setting.average)["layers"].values()
            x = torch.randn(args.batch, shape[setting][0], text.hidden_size, generator=gen).to(dtype)
            inner_alone[setting] = time_call(functools.partial(inner, x), repeats=repeats, warmup=2).median * 1e3

    med = {s: {name: statistics.median(run[name] for run in runs[s]) for name in runs[s][0]} for s in settings}
    dec = {setting: statistics.median(times) for setting, times in decoder_runs.items()}
    full, full_length = med[DENSE], shape[DENSE][1]

    def speedup(setting: Setting, name: str) -> float:
        """Paired dense / reduced speed-up of one segment (``replayed``: the decoder replayed alone)."""
        if name == "replayed":
            return paired(decoder_runs[DENSE], decoder_runs[setting])
        return paired([run[name] for run in runs[DENSE]], [run[name] for run in runs[setting]])

    def overhead_ms(setting: Setting) -> float:
        """Median over the rounds of what attach adds: ApET in the model, the token drop, any extra rest time."""
        return statistics.median(
            r["reduce"] + r["drop"] + r["rest"] - d["rest"] for d, r in zip(runs[DENSE], runs[setting], strict=True)
        )

    per_layer = dec[DENSE] / args.layers
    scaled = full["vision"] + full["projector"] + FULL_DEPTH * per_layer
    print(
        f"\n7B-scale prefill (extrapolated): vision tower {full['vision']:.0f} ms + projector "
        f"{full['projector']:.0f} ms + {FULL_DEPTH} x {per_layer:.0f} ms per decoder layer at full length "
        f"({full_length} tokens; decoder {dec[DENSE]:.0f} ms / {args.layers} layers) = {scaled:.0f} ms\n"
    )
    print(
        f"Decoder: the language decoder alone, replayed on the exact inputs it received in the prefills (tokens "
        f"dropped by tokred), with a fresh cache; median of {args.decoder_repeats}. Speed-ups are medians of "
        "dense / reduced ratios paired within a round. Ideal (tokens) = dense / reduced sequence length; ideal "
        "(FLOPs) = the ratio of decoder matmul FLOPs, attention over the full L x L square. ApET: alone, on "
        f"({args.batch}, {num_tokens}, {vision.hidden_size}) CLIP features.\n"
    )
    print(
        "| setting | visual tokens | sequence length | prefill ms | prefill speed-up | decoder ms "
        "| decoder speed-up | ideal (tokens) | ideal (FLOPs) | measured / ideal | ApET ms | ApET % of 7B prefill |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for setting in single:
        (visual, length), total = shape[setting], med[setting]["total"]
        if setting == DENSE:
            print(f"| dense | {visual} | {length} | {total:.0f} | | {dec[DENSE]:.0f} | | | | | | |")
            continue
        gain, ideal = speedup(setting, "replayed"), full_length / length
        flops_ratio = decoder_layer_flops(text, full_length) / decoder_layer_flops(text, length)
        apet = alone[("vision", setting.keep)]
        print(
            f"| {setting.label} | {visual} | {length} | {total:.0f} | {speedup(setting, 'total'):.2f}x "
            f"| {dec[setting]:.0f} | {gain:.2f}x | {ideal:.2f}x | {flops_ratio:.2f}x | {gain / ideal:.0%} "
            f"| {apet:.1f} | {apet / scaled:.3%} |"
        )

    print(
        f"\nWhere the time goes inside the prefills, median ms of {args.repeats} (rest = embedding lookup, "
        "placeholder merge, last-token LM head; attach overhead = ApET in model + token drop + extra rest):\n"
    )
    print(
        "| setting | vision tower | ApET in model | projector | token drop | decoder | decoder speed-up "
        "| measured / ideal | rest | total | attach overhead |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for setting in single:
        m = med[setting]
        if setting == DENSE:
            extra = "| | | {rest:.1f} | {total:.0f} | |"
        else:
            gain = speedup(setting, "decoder")
            extra = (
                f"| {gain:.2f}x | {gain / (full_length / shape[setting][1]):.0%} | {{rest:.1f}} | {{total:.0f}} "
                f"| {overhead_ms(setting):.1f} |"
            )
        print(
            f"| {setting.label} | {m['vision']:.0f} | {m['reduce']:.1f} "
            f"| {m['projector']:.1f} | {m['drop']:.1f} | {m['decoder']:.0f} "
            + extra.format(rest=m["rest"], total=m["total"])
        )

    print(f"\nApET alone, median ms per call on ({args.batch}, {num_tokens}, C), and as % of the 7B-scale prefill:\n")
    print("| space | C | " + " | ".join(f"K={keep}" for keep in args.keep) + " |")
    print("|---|---:|" + "---:|" * len(args.keep))
    for space, x in features.items():
        cells = " | ".join(f"{alone[(space, keep)]:.1f} ({alone[(space, keep)] / scaled:.3%})" for keep in args.keep)
        print(f"| {space} | {x.shape[-1]} | {cells} |")

    print(
        f"\n7B-scale prefill, extrapolated the same way for every setting (vision tower + ApET in model + projector "
        f"+ {FULL_DEPTH} x the decoder's time per layer):"
    )
    estimates = {}
    for setting in single:
        m = med[setting]
        estimates[setting] = m["vision"] + m["reduce"] + m["projector"] + FULL_DEPTH * dec[setting] / args.layers
        ratio = "" if setting == DENSE else f", {scaled / estimates[setting]:.2f}x"
        print(f"* {setting.label}: {estimates[setting]:.0f} ms{ratio}")

    # Decoder time against sequence length: a straight line's intercept is what every call pays whatever its length.
    lengths = [float(shape[setting][1]) for setting in single]
    times = [dec[setting] for setting in single]
    mean_l, mean_t = statistics.fmean(lengths), statistics.fmean(times)
    slope = sum((x - mean_l) * (y - mean_t) for x, y in zip(lengths, times, strict=True)) / sum(
        (x - mean_l) ** 2 for x in lengths
    )
    intercept = mean_t - slope * mean_l
    print(
        f"\nDecoder time against sequence length, least-squares line over the {len(single)} settings: "
        f"{intercept / args.layers:.0f} ms + {slope / args.layers:.3f} ms x tokens per layer. The token-count ideal "
        "assumes the first term is 0."
    )

    stage_estimates: dict[Setting, float] = {}
    if two_stage:
        stage_estimates = report_two_stage(args, settings, shape, stats, runs, med, inner_alone, scaled)
    load_end = load_average()
    print(f"Load average at the end: {load_end}")

    if args.quick:
        print("\n(--quick: tiny widths; the targets below are meant for the real shapes)")
    smallest = min(args.keep)
    fraction = speedup(Setting(keep=smallest), "replayed") / (full_length / shape[Setting(keep=smallest)][1])
    worst = max(max(alone.values()), max(med[setting]["reduce"] for setting in single[1:]))
    print(
        f"\nTarget: decoder speed-up at K={smallest} >= {TARGET_SPEEDUP:.0%} of the token-count ideal: "
        f"{'met' if fraction >= TARGET_SPEEDUP else 'MISSED'} ({fraction:.0%})."
    )
    print(
        f"Target: ApET's own time < {TARGET_COST:.0%} of a 7B-scale prefill: "
        f"{'met' if worst < TARGET_COST * scaled else 'MISSED'} (worst {worst:.1f} ms of {scaled:.0f} ms = "
        f"{worst / scaled:.3%}, over every budget and both spaces, alone and inside the model)."
    )
    wall_s = time.perf_counter() - wall_start
    print(f"Wall time: {wall_s:.0f} s")

    if args.json is not None:
        rows = []
        for setting in settings:
            st, replayable = stats[setting], setting in dec
            rows.append(
                {
                    "label": setting.label,
                    "keep": setting.keep,
                    "average": setting.average,
                    "visual_tokens": shape[setting][0],
                    "sequence_length": shape[setting][1],
                    "layer_lengths": list(st.layer_lengths) if st is not None else [full_length] * args.layers,
                    "inner_stages": [vars(stage) for stage in st.stages] if st is not None else [],
                    "average_visual_tokens": st.average_visual_tokens if st is not None else num_tokens,
                    "ideal_tokens": token_ideal(st),
                    "ideal_flops": flops_ideal(st),
                    "median_ms": med[setting],
                    "prefill_speedup": speedup(setting, "total"),
                    "decoder_speedup": speedup(setting, "decoder"),
                    "replayed_decoder_ms": dec[setting] if replayable else None,
                    "replayed_decoder_speedup": speedup(setting, "replayed") if replayable else None,
                    "inner_apet_alone_ms": inner_alone.get(setting),
                    "estimate_7b_ms": (stage_estimates or estimates).get(setting),
                    "rounds": runs[setting],
                }
            )
        report = {
            "environment": {
                "cpu": cpu,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                "load_average": [load_start, load_end],
                "parameters": params,
                "build_s": build_s,
                "wall_s": wall_s,
            },
            "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "settings": rows,
            "apet_alone_ms": {f"{space} K={keep}": ms for (space, keep), ms in alone.items()},
            "estimate_7b_dense_ms": scaled,
            "decoder_line_per_layer_ms": {"intercept": intercept / args.layers, "slope": slope / args.layers},
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"Wrote {args.json}")


def report_two_stage(
    args: argparse.Namespace,
    settings: list[Setting],
    shape: dict[Setting, tuple[int, int]],
    stats: dict[Setting, PrefillStats | None],
    runs: dict[Setting, list[dict[str, float]]],
    med: dict[Setting, dict[str, float]],
    inner_alone: dict[Setting, float],
    scaled: float,
) -> dict[Setting, float]:
    """Print the two-stage tables (every setting, in-prefill times); return each setting's 7B-scale estimate."""

    def gain(setting: Setting, name: str, base: Setting = DENSE) -> float:
        return paired([run[name] for run in runs[base]], [run[name] for run in runs[setting]])

    def lengths(setting: Setting) -> str:
        st = stats[setting]
        cuts = [f" -> {stage.length}" for stage in st.stages] if st is not None else []
        return f"{shape[setting][1]}" + "".join(cuts)

    def tokens(setting: Setting) -> str:
        st = stats[setting]
        cuts = [f" -> {stage.kept_visual_tokens // st.batch}" for stage in st.stages] if st is not None else []
        return f"{shape[setting][0]}" + "".join(cuts)

    layer = args.layers // 2
    print(
        f"\nTwo stages, decoder of {args.layers} layers, inner stage after layer {layer} (its first short layer is "
        f"{layer}, 0-based); every setting in the same alternating rounds, median ms of {args.repeats}. Decoder = "
        "its forward inside the prefill (the inner stage's hook included); ideal (tokens) = dense length x layers / "
        "the lengths the layers ran on; ideal (FLOPs) = dense_decoder_flops / decoder_flops from handle.last_stats; "
        "speed-ups are medians of ratios paired within a round.\n"
    )
    print(
        "| setting | visual tokens | sequence length | average visual | ideal (tokens) | ideal (FLOPs) | prefill ms "
        "| prefill speed-up | decoder ms | decoder speed-up | measured / ideal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for setting in settings:
        m, st = med[setting], stats[setting]
        average = st.average_visual_tokens if st is not None else shape[setting][0]
        head = (
            f"| {setting.label} | {tokens(setting)} | {lengths(setting)} | {average:.0f} | {token_ideal(st):.2f}x "
            f"| {flops_ideal(st):.2f}x | {m['total']:.0f} "
        )
        if setting == DENSE:
            print(head + f"| | {m['decoder']:.0f} | | |")
            continue
        decoder_gain = gain(setting, "decoder")
        print(
            head + f"| {gain(setting, 'total'):.2f}x | {m['decoder']:.0f} | {decoder_gain:.2f}x "
            f"| {decoder_gain / token_ideal(st):.0%} |"
        )

    print(
        "\nThe inner stage's own cost, median ms: hook = tokred's pre-hook of the entry layer, timed inside the "
        "prefills (ApET on the hidden states, the gather of the survivors, the short mask and rotary tables); "
        "ApET alone = the inner ApET called directly on a random (batch, first-stage tokens, width) tensor; "
        f"7B-scale prefill = vision tower + ApET + projector + token drop + {FULL_DEPTH}/{args.layers} x (decoder "
        "- hook) + hook.\n"
    )
    print(
        "| setting | inner hook | inner ApET alone | hook - ApET | hook % of decoder | hook % of 7B prefill "
        "| 7B-scale prefill | 7B-scale speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    estimates = {}
    for setting in settings:
        m = med[setting]
        fixed = m["vision"] + m["reduce"] + m["projector"] + m["drop"] + m["stage"]
        estimates[setting] = fixed + FULL_DEPTH / args.layers * (m["decoder"] - m["stage"])
        ratio = estimates[DENSE] / estimates[setting]
        if setting not in inner_alone:
            print(f"| {setting.label} | | | | | | {estimates[setting] / 1e3:.1f} s | {ratio:.2f}x |")
            continue
        hook, apet = m["stage"], inner_alone[setting]
        print(
            f"| {setting.label} | {hook:.1f} | {apet:.1f} | {hook - apet:.1f} | {hook / m['decoder']:.2%} "
            f"| {hook / scaled:.3%} | {estimates[setting] / 1e3:.1f} s | {ratio:.2f}x |"
        )

    print("\nTwo stages against single-stage ApET, decoder inside the prefill (paired ratios, > 1: two stages faster):")
    for setting in settings:
        if setting.average is None:
            continue
        first = shape[setting][0]
        lines = []
        same_first, same_average = Setting(keep=first), Setting(keep=setting.average)
        for other, why in ((same_first, "the same first stage"), (same_average, "the same average")):
            if other in runs:
                lines.append(f"{gain(setting, 'decoder', base=other):.2f}x vs {other.label} ({why})")
        print(f"* {setting.label} ({tokens(setting)}): " + ("; ".join(lines) or "no single-stage row to compare"))
    print()
    return estimates


if __name__ == "__main__":
    main()
