"""Loading the released Vim / VideoMamba ``.pth`` files safely, strictly, and at other resolutions.

The official training scripts save a container dict ``{"model", "model_ema", "optimizer", "lr_scheduler",
"epoch", "scaler", "args"}`` whose ``args`` is a pickled ``argparse.Namespace``; some VideoMamba files are a
bare state dict. Files are read with ``torch.load(weights_only=True)`` and only ``argparse.Namespace`` added to
the allowed types, so a file cannot run code unless the caller says it is trusted.

Position embeddings are adapted to the model being loaded:

* ``pos_embed`` ``(1, M + 1, D)``: bicubic interpolation over the square patch grid (``align_corners=False``,
  as in the official DeiT-derived fine-tuning code), with the class-token entry taken out before and put back
  after. Unlike that code, which always takes entry 0 as the class token, the entry is taken from the class
  position of the layout (the middle for Vim), so Vim's middle-token layout survives a change of size.
* ``temporal_pos_embedding`` ``(1, T, D)``: linear interpolation over frames (``align_corners=False``), as in
  the official VideoMamba fine-tuning code.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokred.core.errors import InvalidInputError, MissingFileError

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "extract_state_dict",
    "load_checkpoint",
    "read_checkpoint",
    "resize_pos_embed",
    "resize_temporal_pos_embed",
]

_CONTAINER_KEYS = ("model", "module", "state_dict")
_BACKWARD_PARAMS = ("A_b_log", "D_b", "conv1d_b.", "x_proj_b.", "dt_proj_b.")


class CheckpointError(InvalidInputError):
    """A checkpoint that cannot be read, is not a model checkpoint, or does not fit the model."""


@dataclass
class LoadedCheckpoint:
    """What [`load_checkpoint`][tokred.mamba.models.checkpoint.load_checkpoint] did.

    Attributes:
        key: The container entry the weights came from (``"model"``, ``"model_ema"``, …), or None for a bare
            state dict.
        missing_keys: Model parameters the checkpoint did not provide (empty when loaded strictly).
        unexpected_keys: Checkpoint entries the model has no parameter for (empty when loaded strictly).
        resized_keys: Entries interpolated to the model's geometry (``pos_embed``, ``temporal_pos_embedding``).
        args: The training arguments stored in the container, if any.
    """

    key: str | None
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    resized_keys: list[str] = field(default_factory=list)
    args: Any = None


@contextlib.contextmanager
def _allow_namespace() -> Iterator[None]:
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is not None:
        with safe_globals([argparse.Namespace]):
            yield
    else:  # torch 2.4 has only the process-wide allow-list
        torch.serialization.add_safe_globals([argparse.Namespace])
        yield


def _looks_like_torch_file(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4)
    # New-style torch files are zip archives; legacy ones start with a pickle protocol marker.
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_checkpoint(path: str | os.PathLike[str], *, trusted: bool = False) -> Any:
    """Read a ``.pth`` file onto the CPU without executing code from it unless ``trusted``.

    Args:
        path: The file.
        trusted: Use ``torch.load(weights_only=False)``, which can run arbitrary code from the file; only for
            files from a source you trust.

    Returns:
        Whatever the file holds (usually a dict).

    Raises:
        MissingFileError: If the file does not exist (a ``FileNotFoundError``).
        CheckpointError: If the file is not a readable PyTorch file, or holds objects that a safe load refuses.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise MissingFileError(f"checkpoint {str(path)!r} {what}")
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        with _allow_namespace():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if not trusted and "Weights only load failed" in message:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
            what = f"an object of type {found.group(1)}" if found else "objects other than tensors and plain data"
            raise CheckpointError(
                f"refusing to load {str(path)!r}: it contains {what}, and unpickling that could run code from the "
                "file. If you trust the file's source, load it with trusted=True (torch.load(weights_only=False))"
            ) from error
        raise _unreadable(path, error) from error
    except Exception as error:  # garbage bytes make the unpickler fail in arbitrary ways (IndexError, KeyError…)
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    size = path.stat().st_size
    if size == 0:
        return CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes); the download or copy did not finish")
    if not _looks_like_torch_file(path):
        return CheckpointError(
            f"{str(path)!r} is not a PyTorch checkpoint ({size} bytes that start like neither a torch.save zip "
            "archive nor a pickle); check the path"
        )
    return CheckpointError(
        f"checkpoint {str(path)!r} ({size} bytes) is corrupted or truncated and cannot be read "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}); download it again"
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _list(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f", … ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} ({shown}{more})"


def extract_state_dict(checkpoint: Any, key: str | None = "auto") -> tuple[dict[str, torch.Tensor], str | None]:
    """Pick the weights out of a checkpoint container.

    Args:
        checkpoint: What [`read_checkpoint`][tokred.mamba.models.checkpoint.read_checkpoint] returned.
        key: ``"auto"``: the first of ``"model"``, ``"module"``, ``"state_dict"`` the container has, else the
            object itself if it is a bare state dict (the official files' ``"model"`` entry is the plain
            weights, so Vim-B users who want its published accuracy pass ``"model_ema"``). A string: that
            entry. None: the object must itself be a bare state dict.

    Returns:
        ``(state_dict, key used)``; a ``"module."`` prefix left by DataParallel is removed.

    Raises:
        CheckpointError: If the entry is missing or the object is not a state dict of tensors.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"not a model checkpoint: the file holds a {type(checkpoint).__name__}, not a dict of weights"
        )
    top = [str(k) for k in checkpoint]
    if key == "auto":
        key = next((k for k in _CONTAINER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
    if key is None:
        state = checkpoint
    elif key in checkpoint:
        state = checkpoint[key]
    else:
        raise CheckpointError(f"checkpoint has no {key!r} entry; its top-level keys are {_list(top, 10)}")
    if not _is_state_dict(state):
        where = f"entry {key!r}" if key is not None else "checkpoint"
        raise CheckpointError(
            f"the {where} is not a state dict of tensors: no 'model' / 'model_ema' entry and not a bare state "
            f"dict. Top-level keys: {_list(top, 10)}"
        )
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, key


def resize_pos_embed(
    pos_embed: torch.Tensor, *, src_cls_index: int, dst_grid: tuple[int, int], dst_cls_index: int
) -> torch.Tensor:
    """Interpolate a class-token-plus-patch-grid position embedding to another grid.

    Args:
        pos_embed: ``(1, M + 1, D)`` with a square source grid of ``M`` patches.
        src_cls_index: Position of the class-token entry in ``pos_embed``.
        dst_grid: ``(rows, cols)`` of the target patch grid.
        dst_cls_index: Position of the class-token entry in the result.

    Returns:
        ``(1, rows · cols + 1, D)`` in the dtype of ``pos_embed``; bicubic over the grid, class entry copied.

    Raises:
        CheckpointError: If the source patches do not form a square grid.
    """
    _, length, dim = pos_embed.shape
    side = math.isqrt(length - 1)
    if side * side != length - 1:
        raise CheckpointError(
            f"cannot interpolate pos_embed of {length} entries: {length - 1} patches are not a square grid"
        )
    cls_entry = pos_embed[:, src_cls_index : src_cls_index + 1]
    patches = torch.cat((pos_embed[:, :src_cls_index], pos_embed[:, src_cls_index + 1 :]), dim=1)
    grid = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=dst_grid, mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, dst_grid[0] * dst_grid[1], dim).to(pos_embed.dtype)
    return torch.cat((patches[:, :dst_cls_index], cls_entry, patches[:, dst_cls_index:]), dim=1)


def resize_temporal_pos_embed(temporal: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Linearly interpolate a ``(1, T, D)`` temporal position embedding to ``num_frames`` frames."""
    resized = F.interpolate(temporal.float().transpose(1, 2), size=num_frames, mode="linear", align_corners=False)
    return resized.transpose(1, 2).to(temporal.dtype).contiguous()


def _hints(model: nn.Module, state: Mapping[str, torch.Tensor], args: Any, mismatched: list[str]) -> list[str]:
    hints = []
    own = model.state_dict()
    ckpt_dim = state["norm_f.weight"].shape[0] if "norm_f.weight" in state else None
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    ckpt_depth = max(layer_ids) + 1 if layer_ids else None
    dim, depth = getattr(model, "embed_dim", None), getattr(model, "depth", None)
    if (ckpt_dim, ckpt_depth) != (dim, depth) and ckpt_dim is not None and ckpt_depth is not None:
        hints.append(
            f"the checkpoint is a D={ckpt_dim}, {ckpt_depth}-block model but this one is D={dim}, {depth} blocks: "
            "pick the model of the checkpoint's size (see available_models())"
        )
    elif "head.weight" in mismatched and "head.weight" in state:
        hints.append(
            f"the checkpoint's head has {state['head.weight'].shape[0]} classes and the model's "
            f"{own['head.weight'].shape[0]}: build the model with num_classes={state['head.weight'].shape[0]}"
        )
    patch = state.get("patch_embed.proj.weight")
    # (An image checkpoint in a video model needs no hint: its patch embedding is inflated, see VideoMamba.)
    if "patch_embed.proj.weight" in mismatched and patch is not None and patch.ndim == 5:
        hints.append("the checkpoint is a video model (Conv3d patch embedding): use a videomamba_*_f8/_f16 model")
    missing = [k for k in own if k not in state]
    if missing and all(any(p in k for p in _BACKWARD_PARAMS) for k in missing):
        hints.append("the checkpoint has no backward-scan parameters: it is a one-directional Mamba, not Vim")
    trained_as = getattr(args, "model", None)
    if isinstance(trained_as, str):
        hints.append(f"the training arguments name the model {trained_as!r}")
    return hints


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    *,
    key: str | None = "auto",
    trusted: bool = False,
    strict: bool = True,
) -> LoadedCheckpoint:
    """Load official (or tokred-saved) weights into a tokred-mamba model.

    Args:
        model: The model, built for the image size / stride / frame count you want; position embeddings of
            another geometry are interpolated (see the module docstring).
        checkpoint: A ``.pth`` path, or an already-loaded checkpoint object.
        key: Container entry, see [`extract_state_dict`][tokred.mamba.models.checkpoint.extract_state_dict]: ``"auto"``,
            ``"model"``, ``"model_ema"`` (use this for Vim-B, whose published 81.9 % is the EMA weights), or None for a
            bare state dict.
        trusted: Read the file with ``weights_only=False`` (see
            [`read_checkpoint`][tokred.mamba.models.checkpoint.read_checkpoint]).
        strict: Require the checkpoint's keys to match the model's exactly. Shapes must match either way.

    Returns:
        A [`LoadedCheckpoint`][tokred.mamba.models.checkpoint.LoadedCheckpoint] describing what was loaded.

    Raises:
        MissingFileError: If the path does not exist (a ``FileNotFoundError``).
        CheckpointError: If the file cannot be read safely, is not a checkpoint, has no such entry, or its keys
            or shapes do not fit the model (the message names the keys and, where it can, why).

    Examples:
        >>> from tokred.mamba import create_model, load_checkpoint
        >>> model = create_model("vim_small")                                   # doctest: +SKIP
        >>> load_checkpoint(model, "vim_s_midclstok_80p5acc.pth")               # doctest: +SKIP
        >>> vim_b = create_model("vim_base", "vim_b_midclstok_81p9acc.pth",
        ...                      checkpoint_key="model_ema")                       # doctest: +SKIP
    """
    raw = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint, trusted=trusted)
    source = "checkpoint" if isinstance(checkpoint, Mapping) else f"checkpoint {os.fspath(checkpoint)!r}"
    state, used = extract_state_dict(raw, key)
    args = raw.get("args") if isinstance(raw, Mapping) else None

    adapt = getattr(model, "adapt_state_dict", None)
    resized = adapt(state) if callable(adapt) else []

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if mismatched:
        shapes = "; ".join(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:3]
        )
        problems.append(f"{_list(mismatched)} keys with other shapes ({shapes})")
    if strict and missing:
        problems.append(f"{_list(missing)} keys missing from the checkpoint")
    if strict and unexpected:
        problems.append(f"{_list(unexpected)} unexpected keys in the checkpoint")
    if problems:
        name = getattr(model, "model_name", None) or type(model).__name__
        entry = f" (entry {used!r})" if used else ""
        hints = _hints(model, state, args, mismatched)
        raise CheckpointError(
            f"{source}{entry} does not fit {name}: "
            + "; ".join(problems)
            + "".join(f". {hint[0].upper()}{hint[1:]}" for hint in hints)
        )
    model.load_state_dict(state, strict=False)
    return LoadedCheckpoint(used, missing, unexpected, resized, args)
