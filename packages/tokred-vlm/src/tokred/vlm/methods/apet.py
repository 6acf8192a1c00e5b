"""``apet``: ApET, approximation-error guided token compression for vision-language models.

From Ma et al., "ApET: Approximation-Error Guided Token Compression for Efficient VLMs" (CVPR 2026,
arXiv:2602.19870); reference code https://github.com/MaQianKun0/ApET (read at ``70cc01b``). A few tokens
chosen by farthest-point sampling form a basis; every token is approximated by a ridge least-squares
combination of the basis, and the tokens the basis explains worst carry the most information it lacks. Those
are kept, the basis is kept, and every other token is averaged into its most cosine-similar high-error token.

Built entirely on the shared numerics of ``tokred.core.ops``: ``farthest_point_sampling``,
``projection_residual`` (the ridge solve, in fp32), ``assign_to_nearest`` (cosine), ``merge_weights`` and
``scatter_merge``, and ``Reduction.merge_into_nearest``.

Modifications with respect to the reference code:

* The FPS start is a fixed position (``fps_start``, default 0) instead of an unseeded random draw, so
  results are deterministic.
* Ties are broken towards the lower position: in the top-k ranking (``torch.topk`` leaves their order
  unspecified) and in the cosine argmax (the reference code prefers the higher-error target).
* Merging runs in fp32 (the LLaVA stage-1 code merges in fp16) and weighs by token sizes when given.
* Protected tokens, budgets below ``num_basis + 1`` and batches of token sets are handled (the reference code
  has none of them); see `ApET`.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Literal

import torch

from tokred.core import Reducer, Reduction, register_reducer, select_top
from tokred.core.errors import InvalidInputError
from tokred.core.ops import (
    assign_to_nearest,
    compute_dtype,
    farthest_point_sampling,
    gather_tokens,
    make_generator,
    mask_to_indices,
    merge_weights,
    projection_residual,
    rank,
    scatter_merge,
    uniform_noise,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from tokred.core.budget import BudgetKwargs

__all__ = ["ApET"]

_BASES = ("fps", "random")
_VARIANTS = ("paper", "reference")


def _choice(name: str, value: object, valid: tuple[str, ...]) -> str:
    if value not in valid:
        listed = ", ".join(repr(v) for v in valid)
        raise InvalidInputError(f"{name} must be one of {listed}; got {value!r}")
    return str(value)


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise InvalidInputError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


@register_reducer("apet")
class ApET(Reducer):
    """ApET: keep the tokens a farthest-point basis approximates worst, plus the basis; merge the rest.

    For every token set ``X`` of shape ``(N, C)`` and budget ``K``:

    1. **Basis.** ``k = num_basis`` tokens ``S`` chosen by farthest-point sampling (squared L2 distance on the
       raw, unnormalised features) from position ``fps_start``; or ``k`` uniformly random tokens with
       ``basis="random"``.
    2. **Approximation.** Ridge least squares in fp32, ``W = X Sᵀ (S Sᵀ + ridge·I)⁻¹``, ``X̂ = W S``.
    3. **Importance.** The residual ``e_i = ‖x_i − x̂_i‖₂`` (plain L2, not squared). A basis token explains
       itself, so its residual is about 0.
    4. **Selection and merge**, by ``variant``:

       * ``"paper"`` (default): keep the ``K − k`` highest-residual tokens (the *targets*) and the ``k`` basis
         tokens at their own positions. Every other token is merged into its most cosine-similar target:
         ``target ← (target + Σ assigned) / (1 + count)``. Basis tokens stay unmerged and receive nothing.
       * ``"reference"``: the released LLaVA stage-1 code, quirks included. ``idx = topk(e, K)`` in
         descending order; the targets are ``idx[:-k]``; the ``k`` basis features, in FPS order, overwrite
         the slots ``idx[-k:]`` taken in ascending position order (basis token ``j`` lands in the ``j``-th
         smallest of those positions); every token outside ``idx`` — the basis tokens' own positions
         included — is merged into its most cosine-similar target. The original tokens of the overwritten
         slots are neither kept nor merged.

       ``merge=False`` drops the non-selected tokens instead of merging them. Slots come out in ascending
       original position in both variants.

    **The plan of the reference variant.** A `Reduction` gives every original token one slot, but the
    reference code uses each basis token twice: its features fill a borrowed slot *and* are averaged into a
    target. The plan records the first use only: ``assignment`` sends basis token ``j`` to the slot whose
    features it supplies (weight 1), the overwritten originals to ``-1``, and every other token as merged.
    ``tokens`` is exactly what the reference code computes, so ``reduction.apply(tokens)`` reproduces it
    except at the targets that absorbed a basis token (there ``apply`` averages without the basis token),
    and ``sizes`` counts each original token once (the basis tokens in their own slots). In the degenerate
    case where a basis token is itself among the ``K − k`` targets (near-duplicate tokens, or ``K`` close to
    ``N``), the slot its features also fill is attributed in the plan to an overwritten original instead.
    The ``"paper"`` variant has none of this: its plan reproduces ``tokens`` exactly.

    **Small budgets.** With ``K'`` the budget left after protected tokens, the basis holds
    ``min(num_basis, K' − 1)`` tokens, so at least one target remains to merge into; with ``K' = 1`` the
    basis is empty, the residual is the token norm, and the highest-norm token absorbs every other one. This
    also covers ``N <= num_basis``.

    **Protected tokens** (``protected``) are kept unchanged: they are never basis tokens, never targets and
    never receive merges, and they use up budget first. FPS runs over the unprotected tokens only, starting
    from the first unprotected position at or after ``fps_start`` (wrapping around).

    ``stochastic`` is True because ``basis="random"`` draws; those draws come from the reducer's own CPU
    generator when ``seed`` is given (reproducible on every device, advancing with each call), else from
    PyTorch's global generator. With ``basis="fps"`` results are deterministic and ``seed`` is unused.

    Args:
        num_basis: ``k``, the number of basis tokens (the reference code's ``basis_token_num``), ``>= 1``.
        ridge: ``λ >= 0`` added to the diagonal of the ``k x k`` Gram matrix.
        basis: ``"fps"`` (farthest-point sampling) or ``"random"``.
        fps_start: Position of the first FPS pick, ``>= 0`` and ``< N`` (unused with ``basis="random"``).
        merge: Merge the non-selected tokens (default) or drop them.
        variant: ``"paper"`` (clean form) or ``"reference"`` (the released LLaVA code).
        seed: Seed of the generator for ``basis="random"``; None uses PyTorch's global generator.
        **budget: Exactly one of ``num_keep``, ``keep_ratio``, ``num_remove`` (see `Budget`).

    Raises:
        ValueError: On an invalid hyper-parameter, naming the valid values.
        BudgetError: On an invalid budget.

    Examples:
        >>> import torch
        >>> from tokred.vlm import ApET
        >>> tokens = torch.randn(2, 576, 64, generator=torch.Generator().manual_seed(0))  # (B, N, C)
        >>> reduction = ApET(num_keep=64)(tokens)
        >>> reduction.tokens.shape  # (B, K, C)
        torch.Size([2, 64, 64])
        >>> bool((reduction.indices[:, 0] == 0).all())  # the FPS start (a basis token) is always kept
        True
        >>> reduction.sizes.sum(dim=1)  # every token counted once
        tensor([576., 576.])
    """

    stochastic = True

    def __init__(
        self,
        *,
        num_basis: int = 10,
        ridge: float = 1e-5,
        basis: Literal["fps", "random"] = "fps",
        fps_start: int = 0,
        merge: bool = True,
        variant: Literal["paper", "reference"] = "paper",
        seed: int | None = None,
        **budget: Unpack[BudgetKwargs],
    ) -> None:
        super().__init__(**budget)
        self.num_basis = _integer("num_basis", num_basis, 1)
        if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not math.isfinite(ridge) or ridge < 0:
            raise InvalidInputError(f"ridge must be a finite number >= 0; got {ridge!r}")
        self.ridge = float(ridge)
        self.basis = _choice("basis", basis, _BASES)
        self.fps_start = _integer("fps_start", fps_start, 0)
        if not isinstance(merge, bool):
            raise InvalidInputError(f"merge must be True or False; got {merge!r}")
        self.merge = merge
        self.variant = _choice("variant", variant, _VARIANTS)
        if seed is not None:
            seed = _integer("seed", seed, 0)
        self.seed = seed
        self._generator = make_generator(seed)

    def reduce(
        self,
        tokens: torch.Tensor,
        num_keep: int,
        *,
        scores: torch.Tensor | None,
        protected: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> Reduction:
        """Select the basis, score tokens by their approximation error, keep and merge per ``variant``.

        Args:
            tokens: Tokens of shape ``(B, N, C)``.
            num_keep: ``K``, with ``max protected per row <= K < N``.
            scores: Unused (ApET computes its own importance); always None.
            protected: Bool mask ``(B, N)`` of tokens kept unchanged.
            sizes: Optional sizes ``(B, N)``; merges become size-weighted means.

        Returns:
            The `Reduction` with ``K`` tokens per set, slots in ascending original position.
        """
        num_tokens = tokens.shape[1]
        if self.basis == "fps" and self.fps_start >= num_tokens:
            raise InvalidInputError(
                f"fps_start={self.fps_start} is out of range for a token set of N={num_tokens} tokens"
            )
        free = ~protected
        # Budget left after protected tokens, then the basis size of each row: at least one target remains.
        free_budget = num_keep - protected.sum(dim=1)  # (B,)
        num_basis = (free_budget - 1).clamp(min=0, max=self.num_basis)  # (B,)
        picks = self._select_basis(tokens, num_basis, free)  # (B, k) in pick order, -1 beyond a row's count
        residual = self._residual(tokens, picks)  # (B, N)
        if self.variant == "paper":
            return self._reduce_paper(tokens, num_keep, picks, residual, protected, sizes)
        return self._reduce_reference(tokens, num_keep, picks, num_basis, residual, protected, sizes)

    # -- steps ---------------------------------------------------------------------------------------------

    def _select_basis(self, tokens: torch.Tensor, num_basis: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        """Basis positions ``(B, k)`` with ``k = max(num_basis)``, in pick order; ``-1`` past a row's count."""
        batch, num_tokens = free.shape
        device = tokens.device
        num_picks = int(num_basis.max())
        if num_picks == 0:
            return torch.empty((batch, 0), dtype=torch.long, device=device)
        if self.basis == "fps":
            # First unprotected position at or after fps_start, wrapping around.
            offset = (torch.arange(num_tokens, device=device) - self.fps_start) % num_tokens  # (N,)
            start = offset.expand(batch, -1).masked_fill(~free, num_tokens).argmin(dim=1)  # (B,)
            valid = None if bool(free.all()) else free
            picks = farthest_point_sampling(tokens, num_picks, start=start, valid=valid)  # (B, k)
        else:
            # Same scheme as the `random` reducer: draws on the CPU from the reducer's own generator.
            noise = uniform_noise((batch, num_tokens), generator=self._generator, device=device)  # (B, N) in [0, 1)
            noise = noise.masked_fill(~free, -1.0)
            picks = torch.sort(noise, dim=1, descending=True, stable=True).indices[:, :num_picks]
            picks = picks.masked_fill(~free.gather(1, picks), -1)
        wanted = torch.arange(num_picks, device=device) < num_basis.unsqueeze(1)  # (B, k)
        return picks.masked_fill(~wanted, -1)

    def _residual(self, tokens: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
        """Approximation error ``(B, N)`` of every token by the basis at ``picks`` (fp32; fp64 for fp64)."""
        if picks.shape[1] == 0:
            # The projection onto an empty basis is zero: the residual is the token itself.
            return tokens.to(compute_dtype(tokens)).norm(dim=-1)
        # Rows with fewer basis tokens pad with zero vectors: with a ridge their coefficients are exactly 0,
        # without one the solve's pseudo-inverse fallback gives them 0 too, so residuals are unchanged.
        basis = gather_tokens(tokens, picks.clamp_min(0))  # (B, k, C)
        basis = basis.masked_fill((picks < 0).unsqueeze(-1), 0.0)
        return projection_residual(tokens, basis, self.ridge)

    def _reduce_paper(
        self,
        tokens: torch.Tensor,
        num_keep: int,
        picks: torch.Tensor,
        residual: torch.Tensor,
        protected: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> Reduction:
        """Basis and protected tokens first, the highest-residual tokens fill the rest; merge into those."""
        is_basis = _mask_of(picks, tokens.shape[1])  # (B, N)
        fixed = protected | is_basis
        kept = select_top(residual, num_keep, fixed)  # (B, K) ascending
        if not self.merge:
            return Reduction.from_selection(tokens, kept, sizes)
        return Reduction.merge_into_nearest(tokens, kept, allowed=~fixed.gather(1, kept), sizes=sizes)

    def _reduce_reference(
        self,
        tokens: torch.Tensor,
        num_keep: int,
        picks: torch.Tensor,
        num_basis: torch.Tensor,
        residual: torch.Tensor,
        protected: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> Reduction:
        """The released code: basis features overwrite the ``k`` lowest-ranked of the top-``K`` slots."""
        batch, num_tokens = protected.shape
        device = tokens.device
        positions = torch.arange(num_tokens, device=device).expand(batch, -1)  # (B, N)

        # idx = topk(e, K), descending, ties to the lower position; protected tokens rank first of all.
        ranks = rank(residual.masked_fill(protected, float("inf")))  # (B, N), 0 = highest residual
        in_top = ranks < num_keep
        is_target = ranks < (num_keep - num_basis).unsqueeze(1)  # idx[:-k]
        overwritten = in_top & ~is_target  # idx[-k:]
        kept = mask_to_indices(in_top, num_keep)  # (B, K) ascending
        slot_of = torch.full((batch, num_tokens), -1, dtype=torch.long, device=device)
        slot_of.scatter_(1, kept, torch.arange(num_keep, device=device).expand(batch, -1))

        # What the reference code computes: targets absorb every token outside idx (basis positions included).
        merge_assignment = torch.where(is_target, slot_of, -1)  # (B, N)
        if self.merge:
            allowed = (is_target & ~protected).gather(1, kept)  # (B, K): protected targets receive nothing
            can_merge = allowed.any(dim=1, keepdim=True)
            nearest = assign_to_nearest(tokens, gather_tokens(tokens, kept), target_mask=allowed | ~can_merge)
            merge_assignment = torch.where(~in_top & can_merge, nearest, merge_assignment)
        weights, _ = merge_weights(merge_assignment, num_keep, sizes)
        out = scatter_merge(tokens, merge_assignment, num_keep, weights)  # (B, K, C); basis slots still zero

        # Basis token j (FPS order) fills the j-th smallest overwritten position.
        num_picks = picks.shape[1]
        if num_picks:
            wanted = picks >= 0  # (B, k)
            slot_positions = torch.sort(torch.where(overwritten, positions, positions + num_tokens), dim=1).values
            slot_positions = slot_positions[:, :num_picks].masked_fill(~wanted, 0)  # (B, k)
            basis_slots = slot_of.gather(1, slot_positions)  # (B, k)
            b, j = torch.nonzero(wanted, as_tuple=True)
            out = out.index_put((b, basis_slots[b, j]), tokens[b, picks[b, j]])

        # The plan: each basis token belongs to the slot it fills (its merge into a target is left out).
        assignment = merge_assignment.clone()
        if num_picks:
            pick_is_target = is_target.gather(1, picks.clamp_min(0)) & wanted
            takes = wanted & ~pick_is_target
            b, j = torch.nonzero(takes, as_tuple=True)
            assignment[b, picks[b, j]] = basis_slots[b, j]
            # A basis token that is itself a target stays there; its borrowed slot goes to an overwritten
            # original nobody else claims (there are always enough of them).
            unfilled = wanted & pick_is_target
            if bool(unfilled.any()):
                spare = overwritten & (assignment < 0)
                spare_sorted = torch.sort(torch.where(spare, positions, positions + num_tokens), dim=1).values
                nth = (torch.cumsum(unfilled, dim=1) - 1).clamp_min(0)  # (B, k)
                donors = spare_sorted.gather(1, nth)
                b, j = torch.nonzero(unfilled, as_tuple=True)
                assignment[b, donors[b, j]] = basis_slots[b, j]
        plan_weights, plan_sizes = merge_weights(assignment, num_keep, sizes)
        return Reduction(out, kept, plan_sizes.float(), assignment, plan_weights.float())


def _mask_of(picks: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bool ``(B, N)`` mask of the positions in ``picks`` ``(B, k)``, ignoring ``-1`` entries."""
    batch = picks.shape[0]
    mask = torch.zeros((batch, num_tokens + 1), dtype=torch.bool, device=picks.device)
    mask.scatter_(1, torch.where(picks >= 0, picks, num_tokens), True)
    return mask[:, :num_tokens]
