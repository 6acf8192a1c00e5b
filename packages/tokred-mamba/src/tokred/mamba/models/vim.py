"""Vim (Vision Mamba, hustvl/Vim) in pure PyTorch, with the module names of the official checkpoints.

Shapes: ``B`` batch, ``M`` patches, ``L`` tokens (``M + 1`` with the class token), ``D`` model width,
``C`` classes.

The architecture: a strided ``Conv2d`` patch embedding, a class token inserted in the
*middle* of the patch sequence (position ``M // 2``), a learned absolute position embedding added after the
insertion, 24 residual blocks of RMSNorm + bidirectional Mamba (``(y_fwd + y_bwd) / 2``), a final RMSNorm and
a linear head on the class token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import torch
from torch import nn

from tokred.core.errors import InvalidInputError
from tokred.mamba.layers import BidirectionalMamba, Block, RMSNorm, ScanDelta
from tokred.mamba.layers.mixer import default_dt_rank
from tokred.mamba.models.checkpoint import resize_pos_embed
from tokred.mamba.models.registry import register_model

__all__ = [
    "MambaClassifier",
    "PatchEmbed",
    "ReductionSlot",
    "VisionMamba",
    "vim_base",
    "vim_small",
    "vim_small_stride8",
    "vim_test",
    "vim_tiny",
    "vim_tiny_stride8",
]

ClsPosition = Literal["middle", "first"]


class ReductionSlot(Protocol):
    """What a model calls around and after its blocks when token reduction is attached (``model.token_reduction``).

    [`tokred.mamba.attach`][tokred.mamba.attach] installs one; any object with these four methods works. The
    per-forward state lives in the object ``begin`` returns, never on the slot, so concurrent forwards through
    one model do not interfere.
    """

    def begin(self, hidden: torch.Tensor, cls_pos: torch.Tensor) -> Any:
        """Start a forward pass on the embedded tokens ``hidden`` ``(B, L, D)``; returns its state."""

    def wants_delta(self, index: int) -> bool:
        """Whether block ``index`` must return its Δ (the reducer after it ranks by Δ)."""

    def step(
        self,
        state: Any,
        index: int,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        cls_pos: torch.Tensor,
        delta: ScanDelta | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """After block ``index``: reduce ``hidden`` and ``residual`` ``(B, L, D)`` if scheduled.

        Returns ``(hidden, residual, cls_pos)``, possibly shorter, with the class token's new position ``(B,)``.
        """

    def end(self, state: Any) -> None:
        """Finish the forward pass (record what it kept)."""


class MambaClassifier(nn.Module):
    """What Vim and VideoMamba share: the block stack, the final norm, the head and the reduction slot.

    Subclasses build ``patch_embed``, ``cls_token`` and ``pos_embed``, set the geometry attributes
    (``img_size``, ``patch_size``, ``stride``, ``num_frames``, ``num_patches``, ``cls_index``) and implement
    [`embed`][tokred.mamba.models.vim.MambaClassifier.embed].

    Token reduction: ``token_reduction`` is None (the dense model) or a
    [`ReductionSlot`][tokred.mamba.models.vim.ReductionSlot] whose ``step`` runs after every block on
    ``hidden`` and ``residual`` ``(B, L, D)`` and ``cls_pos`` ``(B,)``, the class token's position in each row.
    It may shorten ``L``; the head reads the class token wherever ``cls_pos`` says it is. A block the slot asks
    for returns its Δ, which is handed to ``step`` explicitly. [`tokred.mamba.attach`][tokred.mamba.attach]
    sets it.

    Args:
        embed_dim: ``D``.
        depth: Number of blocks.
        num_classes: ``C``; 0 gives an identity head (features only).
        d_state: SSM state size ``N``.
        d_conv: Width of the causal depthwise convolution.
        expand: ``d_inner = expand · D``.
        dt_rank: Rank of the Δ projection; ``ceil(D / 16)`` when None.
        divide_out: Halve the sum of the two scan directions (Vim: True; VideoMamba: False).
        drop_rate: Dropout after the position embedding (training only; 0 in every released model).
        drop_path_rate: Stochastic depth, rising linearly over the blocks (training only).
        norm_eps: RMSNorm epsilon.
        scan_backend: Selective-scan backend of every mixer (see
            [`tokred.mamba.ops.selective_scan`][tokred.mamba.ops.dispatch.selective_scan]).

    Attributes:
        token_reduction: The reduction hook, or None.
        embed_dim, depth, d_state, d_conv, expand, d_inner, dt_rank, num_classes, divide_out: Sizes.
        img_size, patch_size, stride, num_frames, num_patches, cls_index, num_tokens: Input geometry;
            ``num_tokens = num_patches + 1`` is ``L`` entering the first block and ``cls_index`` the class
            token's position in it.
        model_name: The registry name when built by [`create_model`][tokred.mamba.models.registry.create_model], else
            None.
    """

    img_size: int
    patch_size: int
    stride: int
    num_frames: int
    num_patches: int
    cls_index: int
    cls_position: ClsPosition
    grid_size: tuple[int, int]

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_classes: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        divide_out: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_classes = num_classes
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * embed_dim
        self.dt_rank = default_dt_rank(embed_dim) if dt_rank is None else dt_rank
        self.divide_out = divide_out
        self.token_reduction: ReductionSlot | None = None
        self.model_name: str | None = None
        self.preprocess_config: Any = None
        self.class_names: tuple[str, ...] | None = None

        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        self.layers = nn.ModuleList(
            Block(
                embed_dim,
                BidirectionalMamba(
                    embed_dim,
                    d_state=d_state,
                    d_conv=d_conv,
                    expand=expand,
                    dt_rank=self.dt_rank,
                    divide_out=divide_out,
                    scan_backend=scan_backend,
                ),
                norm_eps=norm_eps,
                drop_path=rate,
            )
            for rate in rates
        )
        self._scan_backend = scan_backend
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def num_tokens(self) -> int:
        """``L`` entering the first block: the patches of every frame plus the class token."""
        return self.num_patches + 1

    @property
    def scan_backend(self) -> str:
        """The selective-scan backend of every mixer; assigning it changes all of them."""
        return self._scan_backend

    @scan_backend.setter
    def scan_backend(self, name: str) -> None:
        self._scan_backend = name
        for layer in self.layers:
            layer.mixer.scan_backend = name

    def _init_weights(self) -> None:
        """Initialise like the official models, so random-weight models behave like trained ones in scale."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            # GPT-2 scheme: nn.Linear's default uniform init shrunk by 1/sqrt(depth), so each block's write into
            # the residual stream does not make the stream's scale grow with depth. (Drawn directly rather than
            # rescaled in place: arithmetic on the meta device imports torch._dynamo, which takes seconds.)
            weight = layer.mixer.out_proj.weight
            bound = 1.0 / math.sqrt(weight.shape[1] * max(self.depth, 1))
            nn.init.uniform_(weight, -bound, bound)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Patch-embed ``inputs``, insert the class token, add positions: ``(B, L, D)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement embed()")

    def forward_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the blocks (and the token reduction, if any) and return the normalised class token ``(B, D)``."""
        hidden = self.embed(inputs)
        batch = hidden.shape[0]
        residual = None
        cls_pos = torch.full((batch,), self.cls_index, dtype=torch.long, device=hidden.device)
        reduction = self.token_reduction
        state = None if reduction is None else reduction.begin(hidden, cls_pos)
        for index, layer in enumerate(self.layers):
            delta = None
            if reduction is not None and reduction.wants_delta(index):
                hidden, residual, delta = layer(hidden, residual, return_delta=True)
            else:
                hidden, residual = layer(hidden, residual)
            if reduction is not None:
                hidden, residual, cls_pos = reduction.step(state, index, hidden, residual, cls_pos, delta)
        if reduction is not None:
            reduction.end(state)
        if residual is None:  # depth 0: nothing ran, the stream is the embedding itself
            residual, hidden = hidden, torch.zeros_like(hidden)
        # The final add happens in the residual's precision (fp32), like the official fused add + norm.
        hidden = self.norm_f(residual + hidden.to(residual.dtype)).to(self.norm_f.weight.dtype)
        return hidden[torch.arange(batch, device=hidden.device), cls_pos]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, C)`` from class-token features ``(B, D)``."""
        return self.head(self.head_drop(features))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, C)`` for a batch of images ``(B, 3, H, W)`` (video models: ``(B, 3, T, H, W)``)."""
        return self.forward_head(self.forward_features(inputs))

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Resize a checkpoint's position embeddings to this model's geometry, in place.

        ``pos_embed`` is interpolated bicubically over the patch grid with its class-token entry kept apart
        (taken from, and put back at, the class position of each layout), as the official fine-tuning code does.

        Args:
            state_dict: A state dict for this architecture, possibly for another image size or stride.

        Returns:
            The keys that were resized.
        """
        resized = []
        source = state_dict.get("pos_embed")
        # Only a different token count is adapted; another width is left for the shape check to report.
        if (
            isinstance(source, torch.Tensor)
            and source.ndim == 3
            and source.shape != self.pos_embed.shape
            and source.shape[-1] == self.pos_embed.shape[-1]
        ):
            src_patches = source.shape[1] - 1
            state_dict["pos_embed"] = resize_pos_embed(
                source,
                src_cls_index=src_patches // 2 if self.cls_position == "middle" else 0,
                dst_grid=self.grid_size,
                dst_cls_index=self.pos_embed_cls_index,
            )
            resized.append("pos_embed")
        return resized

    @property
    def pos_embed_cls_index(self) -> int:
        """Index of the class token's entry in ``pos_embed``."""
        return self.cls_index

    def _model_hint(self) -> str:
        return repr(self.model_name) if self.model_name else "name"


class PatchEmbed(nn.Module):
    """Strided ``Conv2d`` patch embedding: ``(B, 3, H, W)`` → ``(B, M, D)``, patches in row-major order.

    Args:
        patch_size: Kernel side in pixels.
        stride: Step between patches (16 = non-overlapping; 8 for the overlapping "+" models).
        in_chans: Input channels.
        embed_dim: ``D``.
    """

    def __init__(self, patch_size: int = 16, stride: int = 16, in_chans: int = 3, embed_dim: int = 192) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed ``images`` ``(B, 3, H, W)``; returns ``(B, M, D)``."""
        return self.proj(images).flatten(2).transpose(1, 2)


def _grid_side(img_size: int, patch_size: int, stride: int) -> int:
    side = (img_size - patch_size) // stride + 1
    if img_size < patch_size or side <= 0:
        raise InvalidInputError(f"img_size {img_size} is smaller than the patch size {patch_size}")
    return side


class VisionMamba(MambaClassifier):
    """Vim image classifier (hustvl/Vim ``VisionMamba`` with ``bimamba_type="v2"``, middle class token).

    State-dict keys are those of the released ``.pth`` files (415 keys for 24 blocks): ``patch_embed.proj.*``,
    ``cls_token``, ``pos_embed``, ``layers.{i}.norm.weight``, ``layers.{i}.mixer.*``, ``norm_f.weight``,
    ``head.*``.

    Args:
        img_size: Input side in pixels (square images).
        patch_size: Patch side in pixels.
        stride: Patch stride; ``patch_size`` when None. The patch grid is ``(img_size - patch_size) // stride + 1``
            per side (27 × 27 = 729 patches for stride 8 at 224 px).
        in_chans: Input channels.
        num_classes: ``C``.
        embed_dim: ``D``.
        depth: Number of blocks.
        cls_position: ``"middle"`` (Vim: position ``M // 2``) or ``"first"`` (VideoMamba: position 0).
        divide_out: Halve the sum of the two scan directions (Vim: True).
        **kwargs: Passed to [`MambaClassifier`][tokred.mamba.models.vim.MambaClassifier] (``d_state``, ``d_conv``,
            ``expand``, ``dt_rank``, ``drop_rate``, ``drop_path_rate``, ``norm_eps``, ``scan_backend``).

    Shapes:
        Input ``(B, 3, img_size, img_size)``, output ``(B, C)``.

    Examples:
        >>> import torch
        >>> from tokred.mamba import create_model
        >>> model = create_model("vim_test").eval()
        >>> model(torch.randn(2, 3, model.img_size, model.img_size)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        cls_position: ClsPosition = "middle",
        divide_out: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, depth=depth, num_classes=num_classes, divide_out=divide_out, **kwargs)
        if cls_position not in ("middle", "first"):
            raise InvalidInputError(f"cls_position must be 'middle' or 'first'; got {cls_position!r}")
        stride = patch_size if stride is None else stride
        side = _grid_side(img_size, patch_size, stride)
        self.img_size = img_size
        self.patch_size = patch_size
        self.stride = stride
        self.in_chans = in_chans
        self.num_frames = 1
        self.grid_size = (side, side)
        self.num_patches = side * side
        self.cls_position = cls_position
        self.cls_index = self.num_patches // 2 if cls_position == "middle" else 0
        self.patch_embed = PatchEmbed(patch_size, stride, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self._init_weights()

    def _check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise InvalidInputError(
                f"{type(self).__name__} expects images of shape (B, {self.in_chans}, {self.img_size}, "
                f"{self.img_size}); got {tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if (height, width) != (self.img_size, self.img_size):
            raise InvalidInputError(
                f"this model was built for {self.img_size}×{self.img_size} images but got {height}×{width}. "
                f"Resize and center-crop to {self.img_size} (tokred.mamba.preprocess_image does), or build a "
                f"model for another size with create_model({self._model_hint()}, img_size={max(height, width)}) "
                "(square inputs); a checkpoint loaded into it has its position embedding interpolated"
            )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch-embed ``images`` ``(B, 3, H, W)``, insert the class token, add positions: ``(B, L, D)``."""
        self._check_input(images)
        patches = self.patch_embed(images)  # (B, M, D)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        split = self.cls_index
        hidden = torch.cat((patches[:, :split], cls, patches[:, split:]), dim=1)  # (B, L, D)
        return self.pos_drop(hidden + self.pos_embed)


def build(cls: type[MambaClassifier], defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
    """Instantiate ``cls`` with registry defaults updated by the user's overrides."""
    return cls(**{**defaults, **overrides})


_VIM_LONG = "_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
_VIM_STRIDE8_LONG = "_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"


@register_model("vim_tiny", aliases=(f"vim_tiny{_VIM_LONG}",))
def vim_tiny(**overrides: Any) -> VisionMamba:
    """Vim-T: D = 192, 24 blocks, 7.15 M parameters, 197 tokens at 224 px.

    Checkpoint: HF ``hustvl/Vim-tiny-midclstok``, ``vim_t_midclstok_76p1acc.pth`` (76.1 % ImageNet top-1).
    """
    return build(VisionMamba, {"embed_dim": 192, "depth": 24}, overrides)


@register_model("vim_small", aliases=(f"vim_small{_VIM_LONG}",))
def vim_small(**overrides: Any) -> VisionMamba:
    """Vim-S: D = 384, 24 blocks, 25.8 M parameters, 197 tokens at 224 px.

    Checkpoint: HF ``hustvl/Vim-small-midclstok``, ``vim_s_midclstok_80p5acc.pth`` (80.5 %).
    """
    return build(VisionMamba, {"embed_dim": 384, "depth": 24}, overrides)


@register_model(
    "vim_base", aliases=("vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",)
)
def vim_base(**overrides: Any) -> VisionMamba:
    """Vim-B: D = 768, 24 blocks, 97.6 M parameters, 197 tokens at 224 px.

    Checkpoint: HF ``hustvl/Vim-base-midclstok``, ``vim_b_midclstok_81p9acc.pth``. The published 81.9 % is
    the EMA weights: load with ``checkpoint_key="model_ema"``.
    """
    return build(VisionMamba, {"embed_dim": 768, "depth": 24}, overrides)


@register_model("vim_tiny_stride8", aliases=(f"vim_tiny{_VIM_STRIDE8_LONG}",))
def vim_tiny_stride8(**overrides: Any) -> VisionMamba:
    """Vim-T+ (fine-tuned at stride 8): 729 patches + cls = 730 tokens at 224 px.

    Checkpoint: ``hustvl/Vim-tiny-midclstok``, ``vim_t_midclstok_ft_78p3acc.pth`` (78.3 %).
    """
    return build(VisionMamba, {"embed_dim": 192, "depth": 24, "stride": 8}, overrides)


@register_model("vim_small_stride8", aliases=(f"vim_small{_VIM_STRIDE8_LONG}",))
def vim_small_stride8(**overrides: Any) -> VisionMamba:
    """Vim-S+ (fine-tuned at stride 8): 730 tokens at 224 px.

    Checkpoint: ``hustvl/Vim-small-midclstok``, ``vim_s_midclstok_ft_81p6acc.pth`` (81.6 %).
    """
    return build(VisionMamba, {"embed_dim": 384, "depth": 24, "stride": 8}, overrides)


@register_model("vim_test")
def vim_test(**overrides: Any) -> VisionMamba:
    """A tiny Vim for tests and examples: 64 px, 16 patches + cls, D = 32, 4 blocks, 10 classes."""
    return build(VisionMamba, {"img_size": 64, "embed_dim": 32, "depth": 4, "num_classes": 10}, overrides)
