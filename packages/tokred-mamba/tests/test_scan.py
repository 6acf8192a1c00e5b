"""Selective-scan backends: the reference against a hand computation, every backend against the reference."""

import logging
import math
import subprocess
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from tokred.core.errors import InvalidInputError, InvalidTypeError, MissingDependencyError, TokredError
from tokred.mamba.ops import (
    BACKENDS,
    _mamba_ssm,
    available_backends,
    prepare_delta,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)
from tokred.mamba.ops import chunked as chunked_module
from tokred.mamba.ops import dispatch as dispatch_module

CPU_BACKENDS = ["reference", "chunked", "auto"]


def make_inputs(batch, channels, length, state, *, dtype=torch.float32, seed=0, device="cpu", a_scale=1.0):
    """Random inputs shaped like a Vim mixer's: A = -exp(A_log) < 0, raw delta around softplus's knee."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    tensors = {
        "u": rand(batch, channels, length),
        "delta": rand(batch, channels, length) - 1.0,
        "A": -a_scale * torch.exp(rand(channels, state)),
        "B": rand(batch, state, length),
        "C": rand(batch, state, length),
        "D": rand(channels),
        "z": rand(batch, channels, length),
        "delta_bias": 0.5 * rand(channels),
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}


def loop64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence written out once more, in float64: an oracle finer than the fp32 reference."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64, device=u.device)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[..., t, None] * A) * h + (delta[..., t] * u[..., t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y


def assert_close_scaled(actual, expected, tol):
    """Max abs error at most ``tol`` times the largest |expected|: the right measure for a sum of decays."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"max error {err:.3e} > {tol:.1e} x scale {scale:.3e}"


# --------------------------------------------------------------------------------------------------------------
# The reference itself, on inputs small enough to compute by hand.


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_cpu_backend_matches_the_recurrence_computed_by_hand(backend):
    # D = 1 channel, N = 1 state, L = 3: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = (C_t h_t + D u_t) silu(z_t).
    u, dt, b, c, z = [1.0, 2.0, -1.0], [0.5, 1.0, 0.25], [1.0, 0.5, 2.0], [1.0, -1.0, 0.5], [1.0, 2.0, -1.0]
    a, d = -2.0, 0.3
    h1 = dt[0] * b[0] * u[0]  # 0.5
    h2 = math.exp(dt[1] * a) * h1 + dt[1] * b[1] * u[1]  # e^-2 / 2 + 1
    h3 = math.exp(dt[2] * a) * h2 + dt[2] * b[2] * u[2]  # e^-0.5 h2 - 0.5
    silu = [v / (1 + math.exp(-v)) for v in z]
    expected = [(c[t] * h + d * u[t]) * silu[t] for t, h in enumerate((h1, h2, h3))]

    def row(values):
        return torch.tensor([[values]], dtype=torch.float32)

    y = selective_scan(row(u), row(dt), torch.tensor([[a]]), row(b), row(c), torch.tensor([d]), row(z), backend=backend)
    assert y.shape == (1, 1, 3)
    torch.testing.assert_close(y[0, 0], torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_delta_bias_and_softplus_by_hand(backend):
    # Δ_t = softplus(delta_t + bias); N = 2 states with different decays, no D, no z.
    delta, bias, a = [0.2, -0.7], 0.4, [-1.0, -3.0]
    u, b, c = [2.0, -1.0], [[1.0, 0.5], [-1.0, 2.0]], [[0.5, 1.0], [1.0, -2.0]]  # b[n][t], c[n][t]
    dt = [math.log1p(math.exp(v + bias)) for v in delta]
    h = [0.0, 0.0]
    expected = []
    for t in range(2):
        h = [math.exp(dt[t] * a[n]) * h[n] + dt[t] * b[n][t] * u[t] for n in range(2)]
        expected.append(sum(c[n][t] * h[n] for n in range(2)))
    y = selective_scan(
        torch.tensor([[u]]),
        torch.tensor([[delta]]),
        torch.tensor([a]),
        torch.tensor([b]),
        torch.tensor([c]),
        delta_bias=torch.tensor([bias]),
        delta_softplus=True,
        backend=backend,
    )
    torch.testing.assert_close(y[0, 0], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_reference_agrees_with_a_float64_loop():
    x = make_inputs(2, 5, 23, 4)
    y = selective_scan_reference(**x, delta_softplus=True)
    assert y.dtype == torch.float32
    assert_close_scaled(y, loop64(**x, delta_softplus=True), 1e-6)


# --------------------------------------------------------------------------------------------------------------
# The chunked backend against the reference.

SHAPES = [  # (B, D, L, N)
    (1, 1, 1, 1),
    (2, 3, 1, 4),
    (1, 4, 2, 3),
    (2, 6, 17, 5),
    (3, 5, 50, 8),
    (2, 8, 197, 16),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("use_d", "use_z", "use_bias", "softplus"),
    [(True, True, True, True), (False, False, False, False), (True, False, True, False), (False, True, False, True)],
)
def test_chunked_matches_reference(shape, use_d, use_z, use_bias, softplus):
    x = make_inputs(*shape, seed=sum(shape))
    if not softplus:
        x["delta"] = x["delta"].abs()  # raw Δ ≥ 0, as a softplus would give
    kwargs = {"D": x["D"] if use_d else None, "z": x["z"] if use_z else None}
    kwargs["delta_bias"] = x["delta_bias"].abs() if use_bias else None
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    expected = selective_scan_reference(*args, **kwargs, delta_softplus=softplus)
    y = selective_scan(*args, **kwargs, delta_softplus=softplus, backend="chunked")
    assert y.dtype == torch.float32 and y.is_contiguous()
    assert_close_scaled(y, expected, 2e-6)


@pytest.mark.parametrize("length", [1, 5, 19, 20, 21, 64, 100])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 20, 128])
def test_chunked_in_float64_equals_the_recurrence_for_any_chunking(length, chunk_size):
    # fp64 leaves only the algebra: lengths that are and are not multiples of the chunk, chunks longer than L.
    x = make_inputs(2, 3, length, 4, dtype=torch.float64, seed=length)
    y = selective_scan_chunked(**x, delta_softplus=True, chunk_size=chunk_size)
    assert y.dtype == torch.float64
    assert_close_scaled(y, loop64(**x, delta_softplus=True), 1e-12)


@pytest.mark.parametrize("block_elements", [1, 100, 2000, 10**9])
def test_chunked_blocks_carry_state_between_them(block_elements):
    # Tiny blocks split L into runs of chunks that hand their final state on, and the batch into rows.
    x = make_inputs(3, 4, 45, 3, dtype=torch.float64, seed=7)
    y = selective_scan_chunked(**x, delta_softplus=True, chunk_size=4, block_elements=block_elements)
    assert_close_scaled(y, loop64(**x, delta_softplus=True), 1e-12)


def test_chunked_survives_decays_that_underflow():
    # Δ·A down to about -500: exp underflows in fp32. The chunked scan raises such decays to the smallest
    # normal float (to stay off the denormal path); the outputs must not notice.
    x = make_inputs(2, 6, 40, 5, a_scale=60.0, seed=3)
    assert (F.softplus(x["delta"] + x["delta_bias"][:, None]).amax() * x["A"].amin()).item() < -200
    expected = selective_scan_reference(**x, delta_softplus=True)
    y = selective_scan_chunked(**x, delta_softplus=True)
    assert torch.isfinite(y).all()
    assert_close_scaled(y, expected, 2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_low_precision_returns_the_input_dtype_close_to_fp32(dtype):
    x = make_inputs(2, 8, 33, 4, dtype=dtype, seed=11)
    x["A"], x["D"], x["delta_bias"] = x["A"].float(), x["D"].float(), x["delta_bias"].float()
    y = selective_scan(**x, delta_softplus=True, backend="chunked")
    assert y.dtype == dtype
    # Math runs in fp32 on the same (exactly representable) values, so only the output rounding differs.
    expected = selective_scan_reference(**{k: v.float() for k, v in x.items()}, delta_softplus=True)
    assert_close_scaled(y, expected, 2.0 * torch.finfo(dtype).eps)
    assert selective_scan_reference(**x, delta_softplus=True).dtype == dtype


def test_chunked_accepts_strided_inputs_and_leaves_them_unchanged():
    x = make_inputs(2, 6, 30, 4, seed=5)
    xz = torch.randn(2, 12, 30)  # x and z as halves of one projection, as the Vim mixer makes them
    u, z = xz.chunk(2, dim=1)
    u = u.flip(-1)
    b = x["B"].transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, L) view with stride 1 along N
    before = [t.clone() for t in (u, z, b)]
    y = selective_scan_chunked(u, x["delta"], x["A"], b, x["C"], x["D"], z, x["delta_bias"], True)
    expected = selective_scan_reference(u, x["delta"], x["A"], b, x["C"], x["D"], z, x["delta_bias"], True)
    assert_close_scaled(y, expected, 2e-6)
    assert all(torch.equal(t, t0) for t, t0 in zip((u, z, b), before, strict=True))


def test_chunked_gradients_match_the_reference():
    x = make_inputs(2, 3, 13, 4, dtype=torch.float64, seed=2)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    other = {k: v.clone().requires_grad_() for k, v in x.items()}
    weights = torch.randn(2, 3, 13, dtype=torch.float64)
    (selective_scan_chunked(**leaves, delta_softplus=True, chunk_size=4) * weights).sum().backward()
    (loop64(**other, delta_softplus=True) * weights).sum().backward()
    for name in x:
        assert_close_scaled(leaves[name].grad, other[name].grad, 1e-10)


def test_chunked_is_the_same_with_and_without_autograd():
    x = make_inputs(2, 5, 40, 4, seed=9)
    with torch.inference_mode():
        buffered = selective_scan_chunked(**x, delta_softplus=True, chunk_size=6)
    u = x.pop("u").requires_grad_()
    functional = selective_scan_chunked(u, **x, delta_softplus=True, chunk_size=6)
    assert functional.requires_grad
    assert_close_scaled(functional.detach(), buffered, 1e-6)


@pytest.mark.parametrize("shape", [(0, 3, 5, 2), (2, 0, 5, 2)])
def test_chunked_handles_empty_batches_and_channels(shape):
    x = make_inputs(*shape)
    y = selective_scan_chunked(**x, delta_softplus=True)
    assert y.shape == shape[:3]
    assert torch.equal(y, selective_scan_reference(**x, delta_softplus=True))


def test_chunked_workspace_works_across_inference_mode_and_threads(monkeypatch):
    # The CPU scratch memory is kept per thread: a first call in inference mode must not leave an inference
    # tensor behind that a later no-grad call would have to update in place, and threads must not share it.
    monkeypatch.setattr(chunked_module, "_workspaces", threading.local())
    x = make_inputs(2, 6, 50, 4, seed=13)
    expected = selective_scan_reference(**x, delta_softplus=True)
    with torch.inference_mode():
        assert_close_scaled(selective_scan_chunked(**x, delta_softplus=True), expected, 2e-6)
    with torch.no_grad():
        assert_close_scaled(selective_scan_chunked(**x, delta_softplus=True), expected, 2e-6)

    def run(seed):
        inputs = make_inputs(3, 8, 60 + seed, 4, seed=seed)
        outs = [selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=5) for _ in range(5)]
        return outs, selective_scan_reference(**inputs, delta_softplus=True)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for outs, ref in pool.map(run, range(8)):
            for out in outs:
                assert_close_scaled(out, ref, 2e-6)


def test_chunked_rejects_nonpositive_settings():
    x = make_inputs(1, 2, 4, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(**x, chunk_size=0)
    with pytest.raises(ValueError, match="block_elements"):
        selective_scan_chunked(**x, block_elements=0)


# --------------------------------------------------------------------------------------------------------------
# The chunked backend under autograd: which path runs, and the hand-written backward against the reference.

GRAD_SHAPES = [  # (B, D, L, N): L = 1, L shorter than, equal to and not a multiple of the default chunk (20)
    (1, 1, 1, 1),
    (2, 3, 1, 4),
    (1, 4, 2, 3),
    (2, 5, 20, 4),
    (3, 4, 23, 5),
    (2, 6, 45, 8),
]


def grad_fn_names(tensor):
    """The class names of every node in the autograd graph that produced ``tensor``."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def gradients(scan, x, weights, **kwargs):
    leaves = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
    others = {k: None for k, v in x.items() if v is None}
    (scan(**leaves, **others, **kwargs) * weights).sum().backward()
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("shape", GRAD_SHAPES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 5e-6)])
@pytest.mark.parametrize(("use_d_z_bias", "softplus"), [(True, True), (False, False)])
def test_chunked_autograd_path_gradients_equal_those_of_the_reference(shape, dtype, tol, use_d_z_bias, softplus):
    x = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    if not softplus:
        x["delta"] = x["delta"].abs()
    if not use_d_z_bias:
        x["D"] = x["z"] = x["delta_bias"] = None
    weights = torch.randn(*shape[:3], generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    ours = gradients(selective_scan_chunked, x, weights, delta_softplus=softplus)
    expected = gradients(selective_scan_reference, x, weights, delta_softplus=softplus)
    assert set(ours) == set(expected) == {k for k, v in x.items() if v is not None}
    for name in expected:
        assert ours[name].dtype == dtype and ours[name].shape == x[name].shape, name
        assert_close_scaled(ours[name], expected[name], tol)


@pytest.mark.parametrize("name", ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"])
def test_chunked_autograd_path_with_a_single_input_requiring_grad(name):
    # The backward skips the adjoints nobody asked for; each one alone must still be right.
    x = make_inputs(2, 3, 11, 4, dtype=torch.float64, seed=5)
    weights = torch.randn(2, 3, 11, dtype=torch.float64)
    grads = []
    for scan in (selective_scan_chunked, selective_scan_reference):
        leaf = x[name].clone().requires_grad_()
        (scan(**{**x, name: leaf}, delta_softplus=True) * weights).sum().backward()
        grads.append(leaf.grad)
    assert_close_scaled(grads[0], grads[1], 1e-12)


def test_chunked_autograd_path_passes_gradcheck():
    x = make_inputs(2, 3, 7, 2, dtype=torch.float64, seed=4)
    leaves = tuple(x[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    assert torch.autograd.gradcheck(lambda *t: selective_scan_chunked(*t, delta_softplus=True), leaves)


def test_chunked_autograd_path_works_under_torch_func_grad():
    x = make_inputs(2, 3, 9, 4, dtype=torch.float64, seed=10)
    weights = torch.randn(2, 3, 9, dtype=torch.float64)

    def loss(scan):
        def f(u, A, delta_bias):
            y = scan(u, x["delta"], A, x["B"], x["C"], x["D"], x["z"], delta_bias, delta_softplus=True)
            return (y * weights).sum()

        return torch.func.grad(f, argnums=(0, 1, 2))(x["u"], x["A"], x["delta_bias"])

    for ours, expected in zip(loss(selective_scan_chunked), loss(selective_scan_reference), strict=True):
        assert_close_scaled(ours, expected, 1e-12)


@pytest.mark.parametrize(
    ("shape", "chunk_size", "block"),
    [
        ((5, 3, 23, 4), 3, 1),  # one row per backward block, 8 chunks, the last one shorter (2 steps)
        ((5, 4, 23, 3), 5, 2 * 5 * 3 * 4),  # uneven row blocks (2, 2, 1), 5 chunks of 5, 4, 5, 5, 4 steps
        ((3, 2, 7, 2), 20, 1),  # L < T: a single chunk
        ((1, 3, 1, 2), 4, 1),  # L = 1
        ((2, 3, 12, 2), 1, 1),  # T = 1: every step its own chunk
    ],
)
@pytest.mark.parametrize("present", [True, False])
def test_chunked_backward_blocks_and_chunks_carry_the_adjoint_state(monkeypatch, shape, chunk_size, block, present):
    # The backward walks chunks last to first and rows in blocks: every boundary must carry the adjoint.
    monkeypatch.setattr(chunked_module, "_BACKWARD_BLOCK_ELEMENTS", block)
    x = make_inputs(*shape, dtype=torch.float64, seed=sum(shape) + chunk_size)
    if not present:
        x["D"] = x["z"] = x["delta_bias"] = None
    weights = torch.randn(*shape[:3], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours = gradients(selective_scan_chunked, x, weights, delta_softplus=present, chunk_size=chunk_size)
    expected = gradients(selective_scan_reference, x, weights, delta_softplus=present)
    assert set(ours) == set(expected)
    for name in expected:
        assert ours[name].shape == x[name].shape, name
        assert_close_scaled(ours[name], expected[name], 1e-12)


def test_chunked_backward_in_float32_at_vim_length():
    # Vim's L = 197 with the default chunking (10 chunks, the last of 17 steps), fp32 against the reference.
    x = make_inputs(3, 16, 197, 16, seed=21)
    weights = torch.randn(3, 16, 197, generator=torch.Generator().manual_seed(4))
    ours = gradients(selective_scan_chunked, x, weights, delta_softplus=True)
    expected = gradients(selective_scan_reference, x, weights, delta_softplus=True)
    for name in expected:
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-5 * expected[name].abs().max())


@pytest.mark.parametrize("names", [("B", "C"), ("u", "z"), ("A", "D"), ("delta", "delta_bias")])
def test_chunked_backward_with_some_inputs_requiring_grad(names):
    x = make_inputs(2, 3, 25, 4, dtype=torch.float64, seed=12)
    weights = torch.randn(2, 3, 25, dtype=torch.float64)
    grads = []
    for scan in (selective_scan_chunked, selective_scan_reference):
        leaves = {k: x[k].clone().requires_grad_() for k in names}
        (
            scan(
                **{**x, **leaves}, delta_softplus=True, **({"chunk_size": 4} if scan is selective_scan_chunked else {})
            )
            * weights
        ).sum().backward()
        grads.append([leaves[k].grad for k in names])
    for ours, expected in zip(*grads, strict=True):
        assert_close_scaled(ours, expected, 1e-12)


def test_chunked_backward_survives_decays_that_underflow():
    # Large |A| Δ: the decays are floored at the smallest normal float, and the gradients stay those of the
    # reference (which takes the denormals) to fp32 resolution.
    x = make_inputs(2, 4, 30, 8, seed=14, a_scale=300.0)
    weights = torch.randn(2, 4, 30, generator=torch.Generator().manual_seed(5))
    ours = gradients(selective_scan_chunked, x, weights, delta_softplus=True, chunk_size=7)
    expected = gradients(selective_scan_reference, x, weights, delta_softplus=True)
    for name in expected:
        assert torch.isfinite(ours[name]).all(), name
        assert_close_scaled(ours[name], expected[name], 1e-5)


def test_chunked_backward_is_deterministic_and_independent_of_later_calls():
    # Scratch memory is reused between calls: a backward must not see what a later forward left there.
    first, second = make_inputs(3, 5, 40, 4, seed=15), make_inputs(2, 7, 33, 6, seed=16)
    leaves = [{k: v.clone().requires_grad_() for k, v in inputs.items()} for inputs in (first, second, first)]
    outs = [selective_scan_chunked(**leaf, delta_softplus=True) for leaf in leaves]
    for out in reversed(outs):
        out.square().sum().backward()
    expected = gradients(selective_scan_reference, first, 2 * outs[0].detach(), delta_softplus=True)
    for name in first:
        assert torch.equal(leaves[0][name].grad, leaves[2][name].grad), name
        assert_close_scaled(leaves[0][name].grad, expected[name], 2e-6)


def test_chunked_on_cpu_with_grad_runs_the_hand_written_backward():
    x = make_inputs(2, 4, 30, 3, seed=8)
    u = x.pop("u").requires_grad_()
    y = selective_scan_chunked(u, **x, delta_softplus=True)
    assert "_StatefulScanBackward" in grad_fn_names(y)
    # Through the dispatcher too, and without skip and gate the Function's node is the output's own.
    bare = selective_scan(u, x["delta"], x["A"], x["B"], x["C"], backend="chunked")
    assert type(bare.grad_fn).__name__ == "_StatefulScanBackward"
    assert "_StatefulScanBackward" in grad_fn_names(selective_scan(u, **x, delta_softplus=True))


def test_chunked_without_grad_runs_the_buffered_scan(monkeypatch):
    x = make_inputs(2, 4, 30, 3, seed=8)
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    calls = []
    real = chunked_module._scan_buffered
    monkeypatch.setattr(chunked_module, "_scan_buffered", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        y = selective_scan_chunked(**leaves, delta_softplus=True)
    assert y.grad_fn is None and not y.requires_grad and len(calls) == 1
    # Inputs that need no gradient, with grad mode on, are the same case.
    y = selective_scan_chunked(**make_inputs(2, 4, 30, 3, seed=8), delta_softplus=True)
    assert y.grad_fn is None and len(calls) == 2


def test_chunked_picks_the_functional_variant_on_cuda_and_while_compiling(monkeypatch):
    leaf, plain = torch.ones(1, requires_grad=True), torch.ones(1)
    assert chunked_module._pick_path(CPU, plain, None) == "buffered"
    assert chunked_module._pick_path(CPU, plain, leaf) == "autograd"
    assert chunked_module._pick_path(CUDA, plain, leaf) == "functional"
    assert chunked_module._pick_path(CUDA, plain) == "buffered"
    with torch.no_grad():
        assert chunked_module._pick_path(CPU, leaf) == "buffered"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert chunked_module._pick_path(CPU, leaf) == "functional"
    assert chunked_module._pick_path(CPU, plain) == "functional"


def test_chunked_functional_variant_gradients_equal_those_of_the_reference(monkeypatch):
    # The CUDA and torch.compile path, forced on CPU.
    monkeypatch.setattr(chunked_module, "_pick_path", lambda *a: "functional")
    x = make_inputs(2, 3, 23, 4, dtype=torch.float64, seed=6)
    weights = torch.randn(2, 3, 23, dtype=torch.float64)
    u = x["u"].clone().requires_grad_()
    assert "_StatefulScanBackward" not in grad_fn_names(selective_scan_chunked(**{**x, "u": u}))
    ours = gradients(selective_scan_chunked, x, weights, delta_softplus=True, chunk_size=5)
    expected = gradients(selective_scan_reference, x, weights, delta_softplus=True)
    for name in expected:
        assert_close_scaled(ours[name], expected[name], 1e-12)


def test_reference_keeps_float64_inputs_in_float64():
    x = make_inputs(2, 3, 17, 4, dtype=torch.float64, seed=12)
    y = selective_scan_reference(**x, delta_softplus=True)
    assert y.dtype == torch.float64
    assert_close_scaled(y, loop64(**x, delta_softplus=True), 1e-13)


# --------------------------------------------------------------------------------------------------------------
# The discretised timescale.


def test_prepare_delta_matches_the_formula_written_out():
    delta = [[[0.3, -1.2, 4.0], [-0.5, 0.0, 2.5]]]  # (B=1, D=2, L=3)
    bias = [0.7, -2.0]

    def softplus(v):
        return math.log1p(math.exp(v))

    with_softplus = [[[softplus(v + bias[d]) for v in row] for d, row in enumerate(delta[0])]]
    summed = [[[v + bias[d] for v in row] for d, row in enumerate(delta[0])]]
    d, b = torch.tensor(delta), torch.tensor(bias)
    torch.testing.assert_close(prepare_delta(d, b, delta_softplus=True), torch.tensor(with_softplus))
    torch.testing.assert_close(prepare_delta(d, b), torch.tensor(summed))
    torch.testing.assert_close(prepare_delta(d, delta_softplus=True), torch.tensor(delta).apply_(softplus))
    assert torch.equal(prepare_delta(d), d)


def test_prepare_delta_dtypes_and_inputs_left_alone():
    d16 = torch.randn(2, 3, 4).half()
    assert prepare_delta(d16, delta_softplus=True).dtype == torch.float32
    assert prepare_delta(d16.double(), torch.zeros(3), delta_softplus=True).dtype == torch.float64
    assert prepare_delta(d16.float(), torch.zeros(3, dtype=torch.float64)).dtype == torch.float64
    assert prepare_delta(d16, torch.zeros(3), dtype=torch.float64).dtype == torch.float64
    before = d16.clone()
    prepare_delta(d16, torch.ones(3), delta_softplus=True)
    assert torch.equal(d16, before)


def test_prepared_delta_given_to_a_scan_is_what_the_scan_computes_itself():
    # The mixer discretises once and scans that Δ without bias or softplus; it must be the same scan.
    x = make_inputs(2, 4, 25, 3, seed=14)
    dt = prepare_delta(x["delta"], x["delta_bias"], delta_softplus=True)
    for backend in CPU_BACKENDS:
        direct = selective_scan(**x, delta_softplus=True, backend=backend)
        prepared = selective_scan(**{**x, "delta": dt, "delta_bias": None}, backend=backend)
        assert torch.equal(prepared, direct), backend


# --------------------------------------------------------------------------------------------------------------
# Input validation, shared by all backends.


def _bad_inputs():
    good = make_inputs(2, 3, 5, 4)
    cases = {
        "u rank": ({"u": good["u"][0]}, "u must have shape"),
        "empty L": ({k: good[k][..., :0] for k in ("u", "delta", "B", "C", "z")}, "L >= 1"),
        "delta": ({"delta": good["delta"][:, :2]}, r"delta must have shape \(B, D, L\)"),
        "A channels": ({"A": good["A"][:2]}, r"A must have shape \(D, N\) with D = 3"),
        "A rank": ({"A": good["A"][0]}, "A must have shape"),
        "B state": ({"B": good["B"][:, :3]}, r"B must have shape \(B, N, L\) = \(2, 4, 5\)"),
        "C length": ({"C": good["C"][..., :4]}, r"C must have shape \(B, N, L\)"),
        "C batch": ({"C": good["C"][:1]}, r"C must have shape \(B, N, L\)"),
        "D": ({"D": good["D"][:2]}, r"D must have shape \(D,\)"),
        "z": ({"z": good["z"][..., :3]}, r"z must have shape \(B, D, L\)"),
        "delta_bias": ({"delta_bias": torch.zeros(3, 1)}, r"delta_bias must have shape \(D,\)"),
        "integer": ({"u": good["u"].long()}, "floating-point"),
        "device": ({"B": good["B"].to("meta")}, "one device"),
    }
    return good, cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_bad_inputs()[1]))
def test_every_backend_rejects_inconsistent_inputs_with_a_clear_message(backend, case):
    good, cases = _bad_inputs()
    change, message = cases[case]
    with pytest.raises(InvalidInputError, match=message):
        selective_scan(**{**good, **change}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_rejects_a_non_tensor_with_a_type_error(backend):
    x = make_inputs(2, 3, 5, 4)
    with pytest.raises(InvalidTypeError, match=r"D must be a torch\.Tensor, got list") as info:
        selective_scan(**{**x, "D": [1.0, 2.0, 3.0]}, backend=backend)
    assert isinstance(info.value, TypeError)


# --------------------------------------------------------------------------------------------------------------
# Backend selection.


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(dispatch_module.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch_module, "_logged_fallbacks", set())


@pytest.fixture
def kernel_present(monkeypatch):
    """Pretend that mamba-ssm imports; the fake kernel records its arguments."""
    calls = []

    def fake_kernel(*args, **kwargs):
        calls.append((args, kwargs))
        return args[0].clone()

    monkeypatch.setattr(_mamba_ssm, "_probe", (fake_kernel, None))
    return calls


@pytest.fixture
def kernel_absent(monkeypatch):
    monkeypatch.setattr(_mamba_ssm, "_probe", (None, "ModuleNotFoundError: No module named 'mamba_ssm'"))


CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def test_auto_picks_the_kernel_for_cuda_tensors_when_it_imports(no_env, kernel_present):
    assert dispatch_module._resolve_backend("auto", CUDA, torch.float16, 16) == "mamba_ssm"
    assert dispatch_module._resolve_backend("auto", CPU, torch.float32, 16) == "chunked"


def test_auto_avoids_the_kernel_while_torch_compile_traces(no_env, kernel_present, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch_module._resolve_backend("auto", CUDA, torch.float32, 16) == "chunked"


@pytest.mark.parametrize(("dtype", "state"), [(torch.float64, 16), (torch.float32, 257)])
def test_auto_avoids_the_kernel_for_inputs_it_cannot_take(no_env, kernel_present, dtype, state):
    assert dispatch_module._resolve_backend("auto", CUDA, dtype, state) == "chunked"


def test_auto_falls_back_on_cuda_without_mamba_ssm_and_logs_it_once(no_env, kernel_absent, caplog):
    with caplog.at_level(logging.WARNING, logger=dispatch_module.__name__):
        for _ in range(3):
            assert dispatch_module._resolve_backend("auto", CUDA, torch.float32, 16) == "chunked"
        assert dispatch_module._resolve_backend("auto", CPU, torch.float32, 16) == "chunked"
    records = [r for r in caplog.records if r.name == dispatch_module.__name__]
    assert len(records) == 1
    assert "mamba-ssm does not import" in records[0].getMessage()
    assert "--no-build-isolation" in records[0].getMessage()


def test_auto_on_cpu_runs_the_chunked_backend(no_env, kernel_present, monkeypatch):
    seen = []
    real = chunked_module._chunked
    monkeypatch.setattr(chunked_module, "_chunked", lambda *a, **k: seen.append(True) or real(*a, **k))
    x = make_inputs(1, 2, 6, 3)
    torch.testing.assert_close(selective_scan(**x), selective_scan_chunked(**x))
    assert seen and not kernel_present


@pytest.mark.parametrize("name", ["reference", "chunked"])
def test_environment_variable_overrides_auto_only(no_env, monkeypatch, name):
    monkeypatch.setenv(dispatch_module.ENV_VAR, name)
    assert dispatch_module._resolve_backend("auto", CPU, torch.float32, 16) == name
    assert dispatch_module._resolve_backend("reference", CPU, torch.float32, 16) == "reference"
    x = make_inputs(1, 2, 6, 3)
    assert torch.equal(selective_scan(**x), selective_scan(**x, backend=name))


def test_environment_variable_auto_or_empty_means_unset(no_env, monkeypatch):
    for value in ("auto", "", "  "):
        monkeypatch.setenv(dispatch_module.ENV_VAR, value)
        assert dispatch_module._resolve_backend("auto", CPU, torch.float32, 16) == "chunked"


def test_unknown_environment_value_is_an_error(no_env, monkeypatch):
    monkeypatch.setenv(dispatch_module.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"TOKRED_SCAN_BACKEND='fastest'.*'chunked'"):
        selective_scan(**make_inputs(1, 2, 3, 2))


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(
        InvalidInputError, match=r"unknown scan backend 'cuda'; valid: 'auto', 'reference', 'chunked', 'mamba_ssm'$"
    ) as info:
        selective_scan(**make_inputs(1, 2, 3, 2), backend="cuda")
    assert isinstance(info.value, ValueError) and isinstance(info.value, TokredError)


def test_explicit_reference_and_chunked_are_the_public_functions(no_env):
    x = make_inputs(2, 3, 9, 2)
    assert torch.equal(selective_scan(**x, backend="reference"), selective_scan_reference(**x))
    assert torch.equal(selective_scan(**x, backend="chunked"), selective_scan_chunked(**x))


def test_explicit_mamba_ssm_without_it_says_how_to_install(no_env, kernel_absent):
    with pytest.raises(MissingDependencyError) as info:
        selective_scan(**make_inputs(1, 2, 3, 2), backend="mamba_ssm")
    assert isinstance(info.value, ImportError)
    message = str(info.value)
    assert 'pip install --no-build-isolation "tokred-mamba[kernels]"' in message
    assert "CUDA" in message and "No module named 'mamba_ssm'" in message


def test_explicit_mamba_ssm_with_cpu_tensors_is_a_value_error(no_env, kernel_present):
    with pytest.raises(ValueError, match=r"CUDA tensors only.*got cpu"):
        selective_scan(**make_inputs(1, 2, 3, 2), backend="mamba_ssm")
    assert not kernel_present


def test_kernel_adapter_passes_the_dtypes_mamba_ssm_checks(kernel_present):
    x = make_inputs(1, 2, 3, 2, dtype=torch.float64)
    u = x["u"].half()
    _mamba_ssm.selective_scan(u, x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
    ((args, kwargs),) = kernel_present
    assert [t.dtype for t in args] == [torch.float16, torch.float16, torch.float32, torch.float16, torch.float16]
    assert kwargs["D"].dtype == kwargs["delta_bias"].dtype == torch.float32
    assert kwargs["z"].dtype == torch.float16
    assert kwargs["delta_softplus"] is True and kwargs["return_last_state"] is False


def test_available_backends(monkeypatch, kernel_absent):
    assert available_backends() == ["reference", "chunked"]
    monkeypatch.setattr(_mamba_ssm, "_probe", (lambda *a, **k: None, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert available_backends() == ["reference", "chunked", "mamba_ssm"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert available_backends() == ["reference", "chunked"]


def test_the_import_probe_runs_once(monkeypatch):
    fake = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    fake.selective_scan_fn = lambda *a, **k: None
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(_mamba_ssm, "_probe", None)
    assert _mamba_ssm.is_available() and _mamba_ssm.import_error() is None
    monkeypatch.setitem(sys.modules, fake.__name__, None)  # a later import would now fail
    assert _mamba_ssm.is_available()


def test_a_broken_install_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # makes `import mamba_ssm` raise ImportError
    monkeypatch.setattr(_mamba_ssm, "_probe", None)
    assert not _mamba_ssm.is_available()
    assert _mamba_ssm.import_error().startswith(("ModuleNotFoundError", "ImportError"))


def test_importing_tokred_mamba_imports_neither_mamba_ssm_nor_triton():
    code = (
        "import sys, tokred.mamba, tokred.mamba.ops; "
        "from tokred.mamba.ops import selective_scan; "
        "bad = [m for m in ('mamba_ssm', 'triton', 'causal_conv1d') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------------------
# CUDA: every backend against the reference on the device. Skipped, with the reason, where impossible.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
needs_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and _mamba_ssm.is_available()),
    reason="no CUDA device" if not torch.cuda.is_available() else "mamba-ssm not installed",
)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(1, 4, 1, 4), (2, 64, 197, 16), (2, 32, 1000, 16)])
def test_chunked_on_cuda_matches_reference(shape):
    x = make_inputs(*shape, device="cuda", seed=1)
    expected = selective_scan_reference(**x, delta_softplus=True)
    y = selective_scan_chunked(**x, delta_softplus=True)
    assert y.device.type == "cuda" and y.dtype == torch.float32
    assert_close_scaled(y, expected, 1e-5)
    assert_close_scaled(
        y.cpu(), selective_scan_chunked(**{k: v.cpu() for k, v in x.items()}, delta_softplus=True), 1e-5
    )


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mamba_ssm_backend_matches_reference(no_env, dtype):
    x = make_inputs(2, 64, 197, 16, device="cuda", seed=4, dtype=dtype)
    x["A"], x["D"], x["delta_bias"] = x["A"].float(), x["D"].float(), x["delta_bias"].float()
    expected = selective_scan_reference(**x, delta_softplus=True).float()
    y = selective_scan(**x, delta_softplus=True, backend="mamba_ssm")
    assert y.dtype == dtype and y.device.type == "cuda"
    assert_close_scaled(y, expected, 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps)
    assert dispatch_module._resolve_backend("auto", y.device, dtype, 16) == "mamba_ssm"
    assert "mamba_ssm" in available_backends()
