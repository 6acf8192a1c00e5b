"""Training the reference Vim on pattern scenes, deterministically, on the CPU.

Every hyper-parameter is a field of [`TrainConfig`][tokred.bench.training.vim.TrainConfig];
[`train`][tokred.bench.training.vim.train] does the rest. Training scenes are rendered on the fly from the ``train``
split, batch ``i`` being scenes ``i·B .. (i+1)·B - 1``, so no scene is seen twice and nothing is stored. The model with
the best accuracy on ``validation`` scenes, checked every ``eval_every`` steps and at the end, is the one returned; the
``test`` split is never touched here.

Runs are deterministic for a given thread count: the weights are drawn after ``torch.manual_seed(seed)``, the
data and their augmentation depend only on the seed and the step, and drop-path draws from the seeded global
generator in a fixed order. On the CPU, gradients go through the chunked scan's own hand-written backward (see
[`selective_scan_chunked`][tokred.mamba.ops.selective_scan_chunked]), several times faster than autograd through
the forward recurrence.

Examples:
    >>> from tokred.bench.training.vim import TrainConfig, train
    >>> config = TrainConfig(steps=2, batch_size=4, eval_every=0, val_scenes=8, model_overrides={"depth": 2})
    >>> result = train(config)
    >>> len(result.history), result.best_step
    (2, 2)
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokred.bench.reference import CARD_NAME
from tokred.bench.reference.vim import REFERENCE_MODEL, REFERENCE_WEIGHTS
from tokred.bench.scenes import NUM_CLASSES, SceneSet, make_scenes
from tokred.bench.training.probes import linear_probe_accuracy, vim_block_features
from tokred.core.errors import InvalidInputError
from tokred.mamba.models import create_model

__all__ = [
    "PATCH_CLASSES",
    "TrainConfig",
    "TrainResult",
    "augment",
    "aux_weight",
    "build_model",
    "diagnose",
    "evaluate",
    "export_reference",
    "fold_input_norm",
    "keep_freed_memory",
    "lr_at",
    "patch_labels",
    "train",
]

PATCH_CLASSES = 2 * NUM_CLASSES + 1
"""Classes of the auxiliary per-patch task: the target's class, a distractor's class (``+ NUM_CLASSES``), or
background (the last)."""


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a training run.

    Attributes:
        model: Registry name of the model to train.
        model_overrides: Constructor overrides of the model (tests train tiny variants this way).
        steps: Optimiser steps.
        batch_size: Scenes per step.
        train_scenes: Size of a finite training set cycled through (``train`` scenes ``0 .. train_scenes - 1``,
            rendered once); None streams fresh scenes, batch ``i`` being scenes ``i·B .. (i+1)·B - 1``.
        lr: Peak learning rate of AdamW.
        min_lr: Learning rate at the end of the cosine decay.
        warmup_steps: Steps of linear warm-up from 0 to ``lr``.
        weight_decay: AdamW weight decay of the matrices (not of norms, biases, ``A_log``, ``D``, position
            embedding and class token, as in Vim).
        betas: AdamW betas.
        grad_clip: Largest global gradient norm (0: no clipping).
        label_smoothing: Label smoothing of the cross-entropy.
        patch_loss_weight: Weight of the auxiliary per-patch loss (0: none). A training-only linear head on
            the final patch tokens predicts what each patch shows: the class of the object covering it, as a
            target or as a distractor, or background ([`patch_labels`][tokred.bench.training.vim.patch_labels]). The
            dense signal teaches the blocks colours and shapes long before the single class-token label does; the head
            is discarded.
        token_loss_weight: Weight of an auxiliary loss that has every final token, not only the class token,
            predict the scene's label through the model's head (0: none): all 197 tokens learn to gather the
            answer along the sequence where one would.
        input_shift: Subtracted from the images during training (they are in ``[0, 1]``, mostly grey).
        input_scale: The shifted images are divided by it during training. Standardised inputs train faster;
            at the end the standardisation is folded into the patch embedding
            ([`fold_input_norm`][tokred.bench.training.vim.fold_input_norm]), so the returned model takes the scenes'
            images as they are.
        seed: Seed of the initial weights.
        threads: ``torch.set_num_threads`` for the run (restored afterwards); None leaves it alone. Results are
            reproducible for a fixed thread count.
        val_scenes: Validation scenes for model selection.
        eval_every: Check validation accuracy every so many steps (0: only at the end).
        eval_batch_size: Batch size of the validation passes.
        device: Where to train (``"cpu"``; ``"cuda"`` for quick experiments, which are not reproducible
            bit for bit on the CPU).
        aux_anneal: None keeps the auxiliary losses at their weights throughout; a fraction ``f`` lowers both
            linearly to zero at step ``f · steps`` and leaves the class-token loss alone after it, so that the
            model ends trained on its real objective.
        augment: DeiT-style augmentation of the training images ([`augment`][tokred.bench.training.vim.augment]):
            random resized crop, horizontal flip, random erasing. Drawn from the seed and the step, so runs stay
            deterministic.
    """

    model: str = REFERENCE_MODEL
    model_overrides: Mapping[str, Any] = field(default_factory=lambda: {"drop_path_rate": 0.05})
    steps: int = 1000
    batch_size: int = 32
    train_scenes: int | None = None
    lr: float = 3e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    patch_loss_weight: float = 1.0
    token_loss_weight: float = 1.0
    input_shift: float = 0.45
    input_scale: float = 0.25
    seed: int = 0
    threads: int | None = 1
    val_scenes: int = 256
    eval_every: int = 100
    eval_batch_size: int = 128
    device: str = "cpu"
    aux_anneal: float | None = 0.5
    augment: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        out = asdict(self)
        out["model_overrides"] = dict(self.model_overrides)
        out["betas"] = list(self.betas)
        return out


@dataclass
class TrainResult:
    """What [`train`][tokred.bench.training.vim.train] returns.

    Attributes:
        model: The selected model (best validation accuracy), in eval mode.
        config: The config of the run.
        history: One dict per step: ``step``, ``loss`` (total), ``class_loss``, ``lr``, and ``val_accuracy`` at
            evaluation steps.
        best_step: Step after which the selected weights were taken.
        val_accuracy: Validation accuracy of the selected weights.
        wall_time_s: Wall time of the whole run in seconds, data rendering and evaluation included.
        threads: Threads PyTorch used.
    """

    model: nn.Module
    config: TrainConfig
    history: list[dict[str, float]]
    best_step: int
    val_accuracy: float
    wall_time_s: float
    threads: int


def build_model(config: TrainConfig) -> nn.Module:
    """The model of ``config`` with its initial weights (drawn after ``torch.manual_seed(config.seed)``)."""
    torch.manual_seed(config.seed)
    return create_model(config.model, **dict(config.model_overrides))


def patch_labels(scenes: SceneSet, patch_size: int, *, min_fraction: float = 0.2) -> torch.Tensor:
    """What each non-overlapping patch of each scene shows, for the auxiliary loss: long ``(B, P)``, row-major.

    A patch takes the label of the object whose visible pixels (the scenes' masks, which follow any
    augmentation applied to them) cover most of it, when that object covers at least ``min_fraction`` of it: the
    object's class for the target, its class ``+ NUM_CLASSES`` for a smaller object; else background
    (``2 · NUM_CLASSES``).

    Args:
        scenes: Rendered scenes ``(B, 3, H, W)`` with their masks and ground truth.
        patch_size: Patch side in pixels; must divide the image side.
        min_fraction: Least share of a patch an object must cover to name it.
    """
    labels = torch.full((len(scenes), scenes.masks.shape[1]), PATCH_CLASSES - 1, dtype=torch.long)
    for row, scene in enumerate(scenes.scenes):
        for k, obj in enumerate(scene.objects):
            labels[row, k] = obj.label + (0 if k == 0 else NUM_CLASSES)
    fraction, winner = scenes.patch_coverage(patch_size).max(1)  # (B, P)
    label = labels.gather(1, winner)
    return torch.where(fraction >= min_fraction, label, torch.full_like(label, PATCH_CLASSES - 1))


def augment(scenes: SceneSet, generator: torch.Generator) -> SceneSet:
    """DeiT-style augmentation of a batch, image by image: random resized crop, horizontal flip, random erasing.

    The crop keeps 50-100% of the area at an aspect ratio of 3/4 to 4/3 and is resized back to the image size;
    half the images are mirrored; a quarter get a rectangle of 2-20% of the area replaced by noise. The masks are
    cropped and mirrored alike (erasing leaves them: the object is still there).

    Args:
        scenes: A batch, images ``(B, 3, H, W)`` and masks ``(B, K, H, W)``.
        generator: The source of every random draw.

    Returns:
        A batch with new images and masks; the ground truth is unchanged.
    """
    images = scenes.images
    masks = scenes.masks
    size = images.shape[-1]
    out_images, out_masks = images.clone(), masks.clone()

    def draw(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    for row in range(images.shape[0]):
        area = draw(0.5, 1.0) * size * size
        ratio = math.exp(draw(math.log(3 / 4), math.log(4 / 3)))
        width = min(size, round(math.sqrt(area * ratio)))
        height = min(size, round(math.sqrt(area / ratio)))
        top = int(torch.randint(size - height + 1, (), generator=generator))
        left = int(torch.randint(size - width + 1, (), generator=generator))
        flip = bool(torch.rand((), generator=generator) < 0.5)

        box = (top, left, height, width)
        out_images[row] = _crop_resize(images[row], box, flip, "bilinear")
        out_masks[row] = _crop_resize(masks[row], box, flip, "nearest") > 0.5
        if torch.rand((), generator=generator) < 0.25:
            erase = draw(0.02, 0.2) * size * size
            aspect = math.exp(draw(math.log(0.3), math.log(3.3)))
            eh, ew = min(size, round(math.sqrt(erase * aspect))), min(size, round(math.sqrt(erase / aspect)))
            y0 = int(torch.randint(size - eh + 1, (), generator=generator))
            x0 = int(torch.randint(size - ew + 1, (), generator=generator))
            out_images[row, :, y0 : y0 + eh, x0 : x0 + ew] = torch.rand((3, eh, ew), generator=generator)
    return SceneSet(out_images, out_masks, scenes.scenes)


def _crop_resize(t: torch.Tensor, box: tuple[int, int, int, int], flip: bool, mode: str) -> torch.Tensor:
    """``t`` ``(K, H, W)`` cut to ``box`` (top, left, height, width), resized back to ``(H, W)``, maybe mirrored."""
    top, left, height, width = box
    part = t[None, :, top : top + height, left : left + width].float()
    options = {"align_corners": False} if mode == "bilinear" else {}
    part = F.interpolate(part, size=t.shape[-2:], mode=mode, **options)[0]
    return part.flip(-1) if flip else part


def _batch(pool: SceneSet | None, step: int, config: TrainConfig, image_size: int) -> SceneSet:
    """The scenes of optimiser step ``step``: fresh from the stream, or the next slice of a cycled pool."""
    batch_size = config.batch_size
    if pool is None:
        batch = make_scenes(batch_size, split="train", start=step * batch_size, image_size=image_size)
    else:
        index = torch.arange(step * batch_size, (step + 1) * batch_size) % len(pool)
        batch = SceneSet(pool.images[index], pool.masks[index], tuple(pool.scenes[i] for i in index.tolist()))
    if config.augment:
        batch = augment(batch, torch.Generator().manual_seed(config.seed * 1_000_003 + step))
    return batch


def aux_weight(config: TrainConfig, step: int) -> float:
    """The factor on the auxiliary losses at optimiser step ``step`` (0-based), 1 unless ``aux_anneal`` is set."""
    if config.aux_anneal is None:
        return 1.0
    end = config.aux_anneal * config.steps
    return max(0.0, 1.0 - step / end) if end > 0 else 0.0


def _all_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The final normalised hidden states of every token ``(B, L, D)``, as ``forward_features`` computes them."""
    hidden = model.embed(images)
    residual = None
    for layer in model.layers:
        hidden, residual = layer(hidden, residual)
    return model.norm_f(residual + hidden)


@torch.no_grad()
def fold_input_norm(model: nn.Module, shift: float, scale: float) -> None:
    """Fold ``(images - shift) / scale`` into the patch embedding, in place: afterwards the model on raw images
    computes what it computed before on standardised ones.
    """  # noqa: D205
    proj = model.patch_embed.proj
    if proj.bias is None:
        raise InvalidInputError("the patch embedding has no bias to fold the shift into")
    proj.bias.sub_(proj.weight.sum(dim=(1, 2, 3)) * (shift / scale))
    proj.weight.div_(scale)


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine decay to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 128) -> float:
    """Top-1 accuracy of ``model`` on ``images`` ``(B, 3, H, W)`` with ``labels`` ``(B,)``, in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(labels)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        exempt = param.ndim < 2 or leaf in ("A_log", "A_b_log", "pos_embed", "cls_token")
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning large blocks to the OS.

    A training step allocates and frees the same large activations again and again; by default glibc serves
    each from fresh pages, which the kernel must fault in and zero. Raising ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` makes the freed memory stay in the heap. Process-wide and never undone; a no-op
    returning False where the C library is not glibc. It changes speed only, never results.

    Returns:
        Whether the setting took effect.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 31))


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``config.model`` to classify the target object of ``train``-split scenes.

    Args:
        config: The hyper-parameters.
        log: Called with one line per evaluation (and at the start); silent when None.

    Returns:
        The model with the best validation accuracy, with the run's history and timing.
    """
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, log or (lambda line: None))
    finally:
        torch.set_num_threads(previous_threads)


def _train(config: TrainConfig, log: Callable[[str], None]) -> TrainResult:
    if config.steps < 1 or config.batch_size < 1:
        raise InvalidInputError(f"steps and batch_size must be positive; got {config.steps} and {config.batch_size}")
    start = time.perf_counter()
    device = torch.device(config.device)
    model = build_model(config).to(device).train()
    size = model.img_size
    groups = _param_groups(model, config.weight_decay)
    patch_head = None
    if config.patch_loss_weight > 0:
        patch_head = nn.Linear(model.embed_dim, PATCH_CLASSES).to(device)
        groups[0]["params"].append(patch_head.weight)
        groups[1]["params"].append(patch_head.bias)
        patch_index = torch.tensor([p if p < model.cls_index else p + 1 for p in range(model.num_patches)])
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
    val = make_scenes(config.val_scenes, split="validation", image_size=size)
    shift, scale = config.input_shift, config.input_scale
    val_images, val_labels = ((val.images - shift) / scale).to(device), val.labels.to(device)
    params = sum(p.numel() for p in model.parameters())
    log(f"{config.model}: {params / 1e6:.2f} M parameters, {config.steps} steps of {config.batch_size} scenes")

    history: list[dict[str, float]] = []
    best = (-1.0, 0, None)  # (accuracy, step, state dict)
    pool = None
    if config.train_scenes is not None:
        pool = make_scenes(config.train_scenes, split="train", image_size=size)
    for step in range(config.steps):
        batch = _batch(pool, step, config, size)
        aux = aux_weight(config, step)
        lr = lr_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = ((batch.images - shift) / scale).to(device)
        token_weight, patch_weight = aux * config.token_loss_weight, aux * config.patch_loss_weight
        if patch_weight == 0 and token_weight == 0:
            logits = model(images)
        else:
            tokens = _all_tokens(model, images)
            logits = model.forward_head(tokens[:, model.cls_index])
        class_loss = F.cross_entropy(logits, batch.labels.to(device), label_smoothing=config.label_smoothing)
        loss = class_loss
        if token_weight > 0:
            every = model.forward_head(tokens).flatten(0, 1)  # (B·L, C)
            labels = batch.labels.to(device).repeat_interleave(tokens.shape[1])
            loss = loss + token_weight * F.cross_entropy(every, labels)
        if patch_head is not None and patch_weight > 0:
            targets = patch_labels(batch, model.patch_size).to(device)
            patch_logits = patch_head(tokens[:, patch_index.to(device)])
            patch_loss = F.cross_entropy(patch_logits.flatten(0, 1), targets.flatten())
            loss = loss + patch_weight * patch_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_([p for group in groups for p in group["params"]], config.grad_clip)
        optimizer.step()
        record = {"step": step + 1, "loss": loss.item(), "class_loss": class_loss.item(), "lr": lr}
        done = step + 1
        if done == config.steps or (config.eval_every and done % config.eval_every == 0):
            accuracy = evaluate(model, val_images, val_labels, batch_size=config.eval_batch_size)
            record["val_accuracy"] = accuracy
            if accuracy > best[0]:
                best = (accuracy, done, copy.deepcopy(model.state_dict()))
            recent = [*history[-config.eval_every or -1 :], record]
            log(
                f"step {done:4d}/{config.steps}  loss {fmean(r['loss'] for r in recent):.3f}  "
                f"class loss {fmean(r['class_loss'] for r in recent):.3f}  "
                f"val acc {accuracy:.3f}  {time.perf_counter() - start:6.1f}s"
            )
        history.append(record)
    model.load_state_dict(best[2])
    fold_input_norm(model, shift, scale)
    return TrainResult(
        model=model.eval(),
        config=config,
        history=history,
        best_step=best[1],
        val_accuracy=best[0],
        wall_time_s=time.perf_counter() - start,
        threads=torch.get_num_threads(),
    )


@torch.no_grad()
def diagnose(
    model: nn.Module,
    held_out: SceneSet,
    predicted: torch.Tensor,
    *,
    probe_train: int = 2000,
    probe_eval: int = 500,
    batch_size: int = 100,
) -> dict[str, Any]:
    """What a model card records about a trained model before any reducer is measured.

    * ``probe``: the accuracy of a linear probe on the class token after each block
      ([`linear_probe_accuracy`][tokred.bench.training.probes.linear_probe_accuracy]), fitted on ``train`` scenes
      and measured on ``validation`` scenes: where the label forms.
    * ``target_patches``: how many patches the target covers at least half of, over the held-out scenes: how
      spread the evidence is.
    * ``accuracy_by``: held-out accuracy per colour and per pattern of the target, and per number of objects in
      the scene.

    Args:
        model: The trained model, eval mode, no reduction.
        held_out: The held-out ``test`` scenes.
        predicted: The model's predictions on them ``(B,)``.
        probe_train: ``train`` scenes the probes are fitted on.
        probe_eval: ``validation`` scenes they are measured on.
        batch_size: Images per forward pass.
    """
    size = model.img_size
    fit = make_scenes(probe_train, split="train", image_size=size)
    check = make_scenes(probe_eval, split="validation", image_size=size)
    fit_features = vim_block_features(model, fit.images, batch_size=batch_size)
    check_features = vim_block_features(model, check.images, batch_size=batch_size)
    probe = [
        round(linear_probe_accuracy(a, fit.labels, b, check.labels, classes=NUM_CLASSES), 3)
        for a, b in zip(fit_features, check_features, strict=True)
    ]
    correct = (predicted == held_out.labels).float()

    def accuracy_by(key: Any) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for scene, right in zip(held_out.scenes, correct.tolist(), strict=True):
            groups.setdefault(str(key(scene)), []).append(right)
        return {name: round(fmean(values), 3) for name, values in sorted(groups.items())}

    out: dict[str, Any] = {
        "probe": {
            "what": "linear probe on the class token after each block (train scenes fitted, validation measured)",
            "train_scenes": probe_train,
            "eval_scenes": probe_eval,
            "accuracy_after_block": probe,
        },
        "accuracy_by": {
            "color": accuracy_by(lambda scene: scene.target.color),
            "pattern": accuracy_by(lambda scene: scene.target.pattern),
            "objects": accuracy_by(lambda scene: len(scene.objects)),
        },
    }
    half = (held_out.patch_coverage(model.patch_size)[:, 0] >= 0.5).sum(-1).float()
    out["target_patches"] = {
        "what": f"patches of {model.patch_size} px the target covers at least half of",
        "of": model.num_patches,
        "mean": round(float(half.mean()), 1),
        "min": int(half.min()),
        "max": int(half.max()),
    }
    return out


def _model_config(model: nn.Module) -> dict[str, Any]:
    names = ("img_size", "patch_size", "stride", "embed_dim", "depth", "d_state", "d_conv", "expand", "dt_rank")
    config = {name: getattr(model, name) for name in names}
    config.update(num_classes=model.num_classes, cls_position=model.cls_position, cls_index=model.cls_index)
    config["num_tokens"] = model.num_tokens
    return config


def export_reference(
    result: TrainResult,
    out_dir: str | Path,
    *,
    command: str,
    held_out: int = 1000,
    small_held_out: int = 200,
    batch_size: int = 100,
    probe_scenes: tuple[int, int] = (2000, 500),
) -> tuple[Path, Path]:
    """Write the trained weights in fp16 and their card (JSON) into ``out_dir``.

    The card's accuracies are those of the saved weights: the fp16-rounded state dict loaded into a fresh
    model and run in fp32, on the first ``held_out`` scenes of the ``test`` split and, for quick checks, on
    the first ``small_held_out`` of them.

    Args:
        result: What [`train`][tokred.bench.training.vim.train] returned.
        out_dir: Folder for ``vim_scenes.pt`` and ``card.json``.
        command: The command that produced the run, recorded in the card.
        held_out: Held-out ``test`` scenes to measure accuracy on.
        small_held_out: The smaller prefix of them whose accuracy is recorded too.
        batch_size: Batch size of the evaluation.
        probe_scenes: ``train`` and ``validation`` scenes of the linear probes
            ([`diagnose`][tokred.bench.training.vim.diagnose]).

    Returns:
        The paths of the weights and of the card.
    """
    config = result.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().to(torch.float16) for key, value in result.model.state_dict().items()}
    weights = out / REFERENCE_WEIGHTS
    torch.save(state, weights)

    model = create_model(config.model, **dict(config.model_overrides))
    loaded = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict({key: value.float() for key, value in loaded.items()}, strict=True)
    model.eval()
    scenes = make_scenes(held_out, split="test", image_size=model.img_size)
    with torch.no_grad():
        predicted = torch.cat(
            [model(scenes.images[i : i + batch_size]).argmax(-1) for i in range(0, held_out, batch_size)]
        )
    correct = predicted == scenes.labels
    small = min(small_held_out, held_out)
    card = {
        "model": config.model,
        "config": _model_config(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": {
            "file": REFERENCE_WEIGHTS,
            "dtype": "float16",
            "bytes": weights.stat().st_size,
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        },
        "task": "classify the large target object of a pattern scene (tokred.bench.scenes): colour x "
        f"pattern, 24 classes, {model.img_size} px images in [0, 1], the target covering 30-60% of the image, 0 "
        "to 2 smaller objects, grey patterned clutter",
        "held_out": {"split": "test", "scenes": held_out, "accuracy": int(correct.sum()) / held_out},
        "held_out_small": {"split": "test", "scenes": small, "accuracy": int(correct[:small].sum()) / small},
        "diagnostics": diagnose(
            model,
            scenes,
            predicted,
            probe_train=probe_scenes[0],
            probe_eval=probe_scenes[1],
            batch_size=batch_size,
        ),
        "validation": {
            "split": "validation",
            "scenes": config.val_scenes,
            "accuracy": result.val_accuracy,
            "best_step": result.best_step,
        },
        "accuracy_note": "of the fp16 weights loaded into an fp32 model (create_model('vim_scenes', pretrained=True))",
        "training": {
            "command": command,
            "config": config.to_dict(),
            "wall_time_s": round(result.wall_time_s, 1),
            "threads": result.threads,
            "final_loss": result.history[-1]["loss"],
        },
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    card_path = out / CARD_NAME
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return weights, card_path
