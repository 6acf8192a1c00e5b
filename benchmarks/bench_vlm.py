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
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from transformers import CLIPVisionConfig, DynamicCache, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tokred.bench.measure import time_call
from tokred.vlm import ApET, attach

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FULL_DEPTH = 32  # decoder layers of LLaMA-7B / Vicuna-7B, for the 7B-scale extrapolation
TARGET_SPEEDUP = 0.85  # measured decoder speed-up at the smallest budget, as a fraction of the token-count ideal
TARGET_COST = 0.01  # ApET's own time as a fraction of a 7B-scale prefill
IMAGE_TOKEN = 32000  # llava-hf/llava-1.5-7b-hf: image token 32000 in a 32064-entry vocabulary
SEGMENTS = ("vision", "reduce", "projector", "drop", "decoder")


def build_config(quick: bool, layers: int, attn: str) -> LlavaConfig:
    """LLaVA-1.5-7B's shapes (``--quick``: the same 576 tokens at tiny widths)."""
    if quick:
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
        text = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    else:  # openai/clip-vit-large-patch14-336, lmsys/vicuna-7b-v1.5
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
        text = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32}
    vision_config = CLIPVisionConfig(
        **vision, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5
    )
    text_config = LlamaConfig(
        **text,
        num_hidden_layers=layers,
        num_key_value_heads=text["num_attention_heads"],
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
    )
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


class SegmentTimer:
    """Forward hooks that time the stages of one LLaVA prefill, installed after ``attach`` so they nest inside it.

    * ``vision``: the CLIP tower; ``projector``: the MLP projector's own forward; ``decoder``: the language
      decoder's own forward (after tokred's pre-hook has dropped tokens).
    * ``reduce``: from the first to the last projector pre-hook, i.e. tokred's ``space="vision"`` hook running
      ApET on the pre-projector features; ``drop``: tokred's decoder pre-hook (dropping tokens, positions, mask).
    """

    def __init__(self, model: Any) -> None:
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
    model: Any, inputs: dict[str, torch.Tensor], keep: int | None, capture: dict[str, Any] | None = None
) -> tuple[dict[str, float], int, int]:
    """One timed prefill; returns the segment times (ms, ``total`` included), the visual tokens and length.

    With ``capture``, also stores there the arguments the language decoder received (after tokred's hook).
    """
    handle = attach(model, ApET(num_keep=keep)) if keep is not None else None
    timer = SegmentTimer(model)
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
    batch, length = inputs["input_ids"].shape
    visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum()) // batch
    if handle is not None:
        stats = handle.last_stats
        assert stats is not None, "attach() did not reduce this prefill"
        visual, length = stats.kept_visual_tokens // batch, stats.reduced_length
    return ms, visual, length


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


def decoder_flops(length: int, config: LlamaConfig) -> float:
    """Matmul FLOPs of one decoder layer on ``length`` tokens, attention scores counted over the full square."""
    d, ff = config.hidden_size, config.intermediate_size
    return 2 * length * (4 * d * d + 3 * d * ff) + 4 * length * length * d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dtype = DTYPES[args.dtype]

    config = build_config(args.quick, args.layers, args.attn)
    vision, text = config.vision_config, config.text_config
    start = time.perf_counter()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    build_s = time.perf_counter() - start
    inputs = make_inputs(config, args.batch, args.prompt_tokens, args.before)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    params = sum(p.numel() for p in model.parameters())

    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}; {args.dtype}, attn {args.attn}, batch {args.batch}; "
        f"median of {args.repeats} after 1 warm-up round; random weights; load average {load_average()}"
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
        "ApET through attach(model, ApET(num_keep=K)) with the default space='vision' (before the projector). "
        f"Then the decoder alone, median of {args.decoder_repeats} rounds."
    )

    settings: list[int | None] = [None, *args.keep]
    runs: dict[int | None, list[dict[str, float]]] = {keep: [] for keep in settings}
    shape: dict[int | None, tuple[int, int]] = {}
    calls: dict[int | None, dict[str, Any]] = {keep: {} for keep in settings}
    decoder_runs: dict[int | None, list[float]] = {keep: [] for keep in settings}
    decoder = model.model.language_model
    with torch.no_grad():
        # (a, b) whole prefills, dense and reduced, with the stages timed inside them.
        for round_ in range(args.repeats + 1):  # round 0 warms up
            shift = round_ % len(settings)  # rotate the order, so no setting always follows the same one
            for keep in settings[shift:] + settings[:shift]:
                ms, visual, length = prefill(model, inputs, keep, calls[keep] if round_ == 0 else None)
                shape[keep] = (visual, length)
                if round_:
                    runs[keep].append(ms)
        # (c) the decoder alone, replayed on the inputs it received in those prefills: cheaper, so more repeats.
        for round_ in range(args.decoder_repeats + 1):
            shift = round_ % len(settings)
            for keep in settings[shift:] + settings[:shift]:
                ms = run_decoder(decoder, calls[keep])
                if round_:
                    decoder_runs[keep].append(ms)
        del calls
        # (d) ApET on its own, on the features it sees in each space.
        num_tokens = shape[None][0]
        gen = torch.Generator().manual_seed(1)
        features = {
            "vision": torch.randn(args.batch, num_tokens, vision.hidden_size, generator=gen).to(dtype),
            "llm": torch.randn(args.batch, num_tokens, text.hidden_size, generator=gen).to(dtype),
        }
        alone = {}
        for space, x in features.items():
            for keep in args.keep:
                reducer = ApET(num_keep=keep)
                call = functools.partial(reducer, x)
                alone[(space, keep)] = time_call(call, repeats=max(10, 2 * args.repeats), warmup=2).median * 1e3

    med = {keep: {name: statistics.median(run[name] for run in runs[keep]) for name in runs[keep][0]} for keep in runs}
    dec = {keep: statistics.median(times) for keep, times in decoder_runs.items()}
    full, full_length = med[None], shape[None][1]

    def paired(keep: int, name: str) -> float:
        """Median over the rounds of dense / reduced time, each pair measured in the same round."""
        if name == "replayed":
            pairs = zip(decoder_runs[None], decoder_runs[keep], strict=True)
        else:
            pairs = ((d[name], r[name]) for d, r in zip(runs[None], runs[keep], strict=True))
        return statistics.median(d / r for d, r in pairs)

    def overhead_ms(keep: int) -> float:
        """Median over the rounds of what attach adds: ApET in the model, the token drop, any extra rest time."""
        return statistics.median(
            r["reduce"] + r["drop"] + r["rest"] - d["rest"] for d, r in zip(runs[None], runs[keep], strict=True)
        )

    per_layer = dec[None] / args.layers
    scaled = full["vision"] + full["projector"] + FULL_DEPTH * per_layer
    print(
        f"\n7B-scale prefill (extrapolated): vision tower {full['vision']:.0f} ms + projector "
        f"{full['projector']:.0f} ms + {FULL_DEPTH} x {per_layer:.0f} ms per decoder layer at full length "
        f"({full_length} tokens; decoder {dec[None]:.0f} ms / {args.layers} layers) = {scaled:.0f} ms\n"
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
    for keep in settings:
        (visual, length), total = shape[keep], med[keep]["total"]
        if keep is None:
            print(f"| dense | {visual} | {length} | {total:.0f} | | {dec[None]:.0f} | | | | | | |")
            continue
        speedup, ideal = paired(keep, "replayed"), full_length / length
        flops_ideal = decoder_flops(full_length, text) / decoder_flops(length, text)
        apet = alone[("vision", keep)]
        print(
            f"| ApET K={keep} | {visual} | {length} | {total:.0f} | {paired(keep, 'total'):.2f}x | {dec[keep]:.0f} "
            f"| {speedup:.2f}x | {ideal:.2f}x | {flops_ideal:.2f}x | {speedup / ideal:.0%} | {apet:.1f} "
            f"| {apet / scaled:.3%} |"
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
    for keep in settings:
        m = med[keep]
        if keep is None:
            extra = "| | | {rest:.1f} | {total:.0f} | |"
        else:
            speedup = paired(keep, "decoder")
            extra = (
                f"| {speedup:.2f}x | {speedup / (full_length / shape[keep][1]):.0%} | {{rest:.1f}} | {{total:.0f}} "
                f"| {overhead_ms(keep):.1f} |"
            )
        print(
            f"| {'dense' if keep is None else f'ApET K={keep}'} | {m['vision']:.0f} | {m['reduce']:.1f} "
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
    for keep in settings:
        m = med[keep]
        estimate = m["vision"] + m["reduce"] + m["projector"] + FULL_DEPTH * dec[keep] / args.layers
        label = "dense" if keep is None else f"ApET K={keep}"
        ratio = "" if keep is None else f", {scaled / estimate:.2f}x"
        print(f"* {label}: {estimate:.0f} ms{ratio}")

    # Decoder time against sequence length: a straight line's intercept is what every call pays whatever its length.
    lengths = [float(shape[keep][1]) for keep in settings]
    times = [dec[keep] for keep in settings]
    mean_l, mean_t = statistics.fmean(lengths), statistics.fmean(times)
    slope = sum((x - mean_l) * (y - mean_t) for x, y in zip(lengths, times, strict=True)) / sum(
        (x - mean_l) ** 2 for x in lengths
    )
    intercept = mean_t - slope * mean_l
    print(
        f"\nDecoder time against sequence length, least-squares line over the {len(settings)} settings: "
        f"{intercept / args.layers:.0f} ms + {slope / args.layers:.3f} ms x tokens per layer. The token-count ideal "
        "assumes the first term is 0."
    )
    print(f"Load average at the end: {load_average()}")

    if args.quick:
        print("\n(--quick: tiny widths; the targets below are meant for the real shapes)")
    smallest = min(args.keep)
    fraction = paired(smallest, "replayed") / (full_length / shape[smallest][1])
    worst = max(max(alone.values()), max(med[keep]["reduce"] for keep in args.keep))
    print(
        f"\nTarget: decoder speed-up at K={smallest} >= {TARGET_SPEEDUP:.0%} of the token-count ideal: "
        f"{'met' if fraction >= TARGET_SPEEDUP else 'MISSED'} ({fraction:.0%})."
    )
    print(
        f"Target: ApET's own time < {TARGET_COST:.0%} of a 7B-scale prefill: "
        f"{'met' if worst < TARGET_COST * scaled else 'MISSED'} (worst {worst:.1f} ms of {scaled:.0f} ms = "
        f"{worst / scaled:.3%}, over every budget and both spaces, alone and inside the model)."
    )


if __name__ == "__main__":
    main()
