"""Vim / VideoMamba: official state-dict layout, forward semantics, the mixer against a hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokred.mamba import UnknownModelError, available_models, create_model
from tokred.mamba.layers import BidirectionalMamba, Block, RMSNorm
from tokred.mamba.ops import available_backends, selective_scan_reference

# --------------------------------------------------------------------------------------------------------------
# State-dict layout of the official Vim (and VideoMamba) checkpoints: key names and shapes.


def official_shapes(dim, depth, num_patches, num_classes=1000, frames=None, n=16):
    e, r = 2 * dim, math.ceil(dim / 16)
    shapes = {
        "patch_embed.proj.weight": (dim, 3, 16, 16) if frames is None else (dim, 3, 1, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "cls_token": (1, 1, dim),
        "pos_embed": (1, num_patches + 1, dim),
        "head.weight": (num_classes, dim),
        "head.bias": (num_classes,),
        "norm_f.weight": (dim,),
    }
    if frames is not None:
        shapes["temporal_pos_embedding"] = (1, frames, dim)
    for i in range(depth):
        p = f"layers.{i}."
        shapes[p + "norm.weight"] = (dim,)
        shapes[p + "mixer.in_proj.weight"] = (2 * e, dim)
        shapes[p + "mixer.out_proj.weight"] = (dim, e)
        for s in ("", "_b"):
            shapes[p + f"mixer.conv1d{s}.weight"] = (e, 1, 4)
            shapes[p + f"mixer.conv1d{s}.bias"] = (e,)
            shapes[p + f"mixer.x_proj{s}.weight"] = (r + 2 * n, e)
            shapes[p + f"mixer.dt_proj{s}.weight"] = (e, r)
            shapes[p + f"mixer.dt_proj{s}.bias"] = (e,)
            shapes[p + f"mixer.A{s}_log"] = (e, n)
            shapes[p + f"mixer.D{s}"] = (e,)
    return shapes


SIZES = [
    # name, D, depth, patches per frame, classes, frames, key count, parameters (None: not published exactly)
    ("vim_tiny", 192, 24, 196, 1000, None, 415, 7_148_008),
    ("vim_small", 384, 24, 196, 1000, None, 415, 25_796_584),
    ("vim_base", 768, 24, 196, 1000, None, 415, 97_598_440),
    ("vim_tiny_stride8", 192, 24, 729, 1000, None, 415, None),
    ("vim_small_stride8", 384, 24, 729, 1000, None, 415, None),
    ("videomamba_tiny", 192, 24, 196, 1000, None, 415, 7_148_008),
    ("videomamba_small", 384, 24, 196, 1000, None, 415, 25_796_584),
    ("videomamba_middle", 576, 32, 196, 1000, None, 551, None),
    ("videomamba_base", 768, 24, 196, 1000, None, 415, 97_598_440),
    ("videomamba_tiny_f8", 192, 24, 196, 400, 8, 416, None),
    ("videomamba_small_f16", 384, 24, 196, 400, 16, 416, None),
    ("videomamba_middle_f8", 576, 32, 196, 400, 8, 552, None),
]


@pytest.mark.parametrize(("name", "dim", "depth", "patches", "classes", "frames", "keys", "params"), SIZES)
def test_state_dict_matches_the_official_layout(name, dim, depth, patches, classes, frames, keys, params):
    with torch.device("meta"):
        model = create_model(name)
    state = model.state_dict()
    assert len(state) == keys
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert got == official_shapes(dim, depth, patches, classes, frames)
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params


def test_published_parameter_counts_of_the_videomamba_middle_models():
    with torch.device("meta"):
        middle = create_model("videomamba_middle")
    assert round(sum(p.numel() for p in middle.parameters()) / 1e6) == 74  # MODEL_ZOO: 74M


@pytest.mark.parametrize(
    ("name", "tokens", "cls", "divide", "frames", "stride"),
    [
        ("vim_tiny", 197, 98, True, 1, 16),
        ("vim_small_stride8", 730, 364, True, 1, 8),
        ("videomamba_small", 197, 0, False, 1, 16),
        ("videomamba_tiny_f8", 1569, 0, False, 8, 16),
        ("videomamba_middle_f16", 3137, 0, False, 16, 16),
    ],
)
def test_geometry_attributes(name, tokens, cls, divide, frames, stride):
    with torch.device("meta"):
        model = create_model(name)
    assert (model.num_tokens, model.cls_index, model.divide_out, model.num_frames) == (tokens, cls, divide, frames)
    assert model.num_patches == tokens - 1 and model.stride == stride and model.patch_size == 16
    assert model.img_size == 224 and model.d_inner == 2 * model.embed_dim and model.expand == 2
    assert model.d_state == 16 and model.d_conv == 4 and model.dt_rank == math.ceil(model.embed_dim / 16)
    assert model.token_reduction is None and model.model_name == name
    assert all(layer.mixer.divide_out is divide for layer in model.layers)


# --------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_names_aliases_and_unknown_names():
    names = available_models()
    for expected in ("vim_tiny", "vim_base", "vim_small_stride8", "videomamba_middle_f16", "vim_test"):
        assert expected in names
    assert available_models("vim_*_stride8") == ["vim_small_stride8", "vim_tiny_stride8"]
    long_name = "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2"
    assert long_name not in names and long_name in available_models(include_aliases=True)
    with torch.device("meta"):
        model = create_model(long_name)
        stride8 = create_model(
            "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
        )
    assert (model.model_name, model.embed_dim) == ("vim_base", 768)
    assert (stride8.model_name, stride8.stride) == ("vim_tiny_stride8", 8)
    with pytest.raises(UnknownModelError, match=r"vim_smal'.*Did you mean 'vim_small'.*Known models: .*vim_tiny"):
        create_model("vim_smal")
    with pytest.raises(LookupError):
        create_model("resnet50")
    with pytest.raises(TypeError, match=r"create_model\('vim_test'\).*no_such_option"):
        create_model("vim_test", no_such_option=1)


def test_overrides_replace_registered_defaults():
    model = create_model("vim_test", num_classes=3, img_size=96, scan_backend="reference")
    assert model.num_classes == 3 and model.num_tokens == 37 and model.cls_index == 18
    assert all(layer.mixer.scan_backend == "reference" for layer in model.layers)
    model.scan_backend = "auto"
    assert all(layer.mixer.scan_backend == "auto" for layer in model.layers)


# --------------------------------------------------------------------------------------------------------------
# Forward


def inputs_for(model, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if model.num_frames > 1 or type(model).__name__ == "VideoMamba":
        shape = (batch, 3, model.num_frames, model.img_size, model.img_size)
    else:
        shape = (batch, 3, model.img_size, model.img_size)
    return torch.randn(shape, generator=gen)


TEST_MODELS = ["vim_test", "videomamba_test", "videomamba_video_test"]


@pytest.fixture(scope="module", params=TEST_MODELS)
def tiny(request):
    torch.manual_seed(0)
    return create_model(request.param).eval()


def test_forward_shape_and_finite(tiny):
    with torch.inference_mode():
        logits = tiny(inputs_for(tiny))
    assert logits.shape == (2, tiny.num_classes)
    assert torch.isfinite(logits).all()
    assert logits.std() > 1e-4, "random-weight logits should not collapse to a constant"


def test_forward_is_deterministic_and_batch_independent(tiny):
    x = inputs_for(tiny, batch=3, seed=1)
    with torch.inference_mode():
        first, second = tiny(x), tiny(x)
        alone = torch.cat([tiny(x[i : i + 1]) for i in range(3)])
    assert torch.equal(first, second)
    torch.testing.assert_close(first, alone, rtol=1e-5, atol=1e-6)


class FunctionSlot:
    """A minimal token-reduction slot for tests: ``step`` calls ``fn(index, hidden, residual, cls_pos, delta)``."""

    def __init__(self, fn, wants_delta=lambda index: False):
        self.fn, self._wants_delta = fn, wants_delta
        self.begun = self.ended = 0

    def begin(self, hidden, cls_pos):
        self.begun += 1
        return {"batch": hidden.shape[0]}

    def wants_delta(self, index):
        return self._wants_delta(index)

    def step(self, state, index, hidden, residual, cls_pos, delta):
        return self.fn(index, hidden, residual, cls_pos, delta)

    def end(self, state):
        self.ended += 1


def test_identity_reduction_hook_sees_every_block_and_changes_nothing(tiny):
    x = inputs_for(tiny)
    calls = []

    def hook(index, hidden, residual, cls_pos, delta):
        calls.append((index, hidden.shape, residual.dtype, cls_pos.tolist(), delta))
        return hidden, residual, cls_pos

    slot = FunctionSlot(hook, wants_delta=lambda index: index == 1)
    with torch.inference_mode():
        dense = tiny(x)
        tiny.token_reduction = slot
        try:
            hooked = tiny(x)
        finally:
            tiny.token_reduction = None
    assert torch.equal(dense, hooked), "handing over Δ must not change the block's output"
    assert slot.begun == slot.ended == 1
    assert [c[0] for c in calls] == list(range(tiny.depth))
    assert all(c[1] == (2, tiny.num_tokens, tiny.embed_dim) and c[2] == torch.float32 for c in calls)
    assert all(c[3] == [tiny.cls_index] * 2 for c in calls)
    assert [c[4] is not None for c in calls] == [index == 1 for index in range(tiny.depth)], "Δ only where asked"
    delta = calls[1][4]
    assert delta.forward.shape == delta.backward.shape == (2, tiny.d_inner, tiny.num_tokens)


def test_the_head_reads_the_class_token_where_cls_pos_says():
    model = create_model("vim_test").eval()
    x = inputs_for(model)

    def drop_first_patch(index, hidden, residual, cls_pos, delta):
        if index != 0:
            return hidden, residual, cls_pos
        return hidden[:, 1:], residual[:, 1:], cls_pos - 1

    captured = {}

    def capture(module, args, output):
        captured["features"] = args[0]

    handle = model.head.register_forward_hook(capture)
    with torch.inference_mode():
        model.token_reduction = FunctionSlot(drop_first_patch)
        reduced = model(x)
        model.token_reduction = None
    handle.remove()
    assert reduced.shape == (2, model.num_classes) and torch.isfinite(reduced).all()
    assert captured["features"].shape == (2, model.embed_dim)


def test_wrong_input_sizes_say_how_to_build_the_right_model():
    vim = create_model("vim_test")
    with pytest.raises(ValueError, match=r"built for 64×64 .*got 96×96.*create_model\('vim_test', img_size=96\)"):
        vim(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        vim(torch.randn(3, 64, 64))
    video = create_model("videomamba_video_test")
    with pytest.raises(ValueError, match=r"4-frame clips but got 6 frames.*num_frames=6"):
        video(torch.randn(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match=r"img_size=64"):
        video(torch.randn(1, 3, 4, 64, 64))


def test_half_precision_keeps_the_residual_stream_in_fp32():
    model = create_model("vim_test").eval().to(torch.bfloat16)
    dtypes = []

    def hook(index, hidden, residual, cls_pos, delta):
        dtypes.append((hidden.dtype, residual.dtype))
        return hidden, residual, cls_pos

    model.token_reduction = FunctionSlot(hook)
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert dtypes == [(torch.bfloat16, torch.float32)] * model.depth


# --------------------------------------------------------------------------------------------------------------
# Embedding layouts


def test_vim_puts_the_class_token_in_the_middle_and_positions_after_it():
    model = create_model("vim_test").eval()
    x = inputs_for(model, batch=1)
    with torch.inference_mode():
        hidden = model.embed(x)[0]
        patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=16)
        patches = patches[0].flatten(1).T  # (M, D), row-major
    m, p = model.num_patches, model.cls_index
    assert p == m // 2
    pos = model.pos_embed[0].detach()
    torch.testing.assert_close(hidden[p], model.cls_token[0, 0].detach() + pos[p])
    torch.testing.assert_close(hidden[:p], patches[:p] + pos[:p])
    torch.testing.assert_close(hidden[p + 1 :], patches[p:] + pos[p + 1 :])


def test_videomamba_image_puts_the_class_token_first():
    model = create_model("videomamba_test").eval()
    with torch.inference_mode():
        hidden = model.embed(inputs_for(model, batch=1))[0]
    torch.testing.assert_close(hidden[0], (model.cls_token[0, 0] + model.pos_embed[0, 0]).detach())


def test_video_tokens_are_frame_major_with_shared_spatial_and_per_frame_temporal_positions():
    model = create_model("videomamba_video_test").eval()
    with torch.no_grad():
        model.temporal_pos_embedding.normal_()
    x = inputs_for(model, batch=1)
    with torch.inference_mode():
        hidden = model.embed(x)[0]
    frames, per_frame = model.num_frames, model.grid_size[0] * model.grid_size[1]
    assert hidden.shape[0] == frames * per_frame + 1 == model.num_tokens
    weight = model.patch_embed.proj.weight.detach()[:, :, 0]  # (D, 3, P, P)
    for t in range(frames):
        frame = F.conv2d(x[:, :, t], weight, model.patch_embed.proj.bias.detach(), stride=16)[0].flatten(1).T
        expected = frame + model.pos_embed[0, 1:].detach() + model.temporal_pos_embedding[0, t].detach()
        torch.testing.assert_close(hidden[1 + t * per_frame : 1 + (t + 1) * per_frame], expected)
    torch.testing.assert_close(hidden[0], (model.cls_token[0, 0] + model.pos_embed[0, 0]).detach())


# --------------------------------------------------------------------------------------------------------------
# The mixer, recomputed by hand


def randomized_mixer(divide_out=True, d_model=8, d_state=4, seed=0, backend="reference"):
    torch.manual_seed(seed)
    mixer = BidirectionalMamba(d_model, d_state=d_state, divide_out=divide_out, scan_backend=backend)
    with torch.no_grad():
        for name, param in mixer.named_parameters():
            if name.endswith("A_log") or name.endswith("A_b_log"):
                param.uniform_(-1.0, 1.0)
            elif "dt_proj" in name and name.endswith("bias"):
                param.uniform_(-3.0, 0.0)
            else:
                param.normal_(0.0, 0.4)
    return mixer


def hand_direction(x, z, conv_w, conv_b, x_proj_w, dt_w, dt_b, a_log, skip, reverse, rank, n):
    """One scan direction written out in token order, with no flips: the backward direction is anti-causal."""
    batch, e, length = x.shape
    k = conv_w.shape[-1]
    u = torch.zeros_like(x)
    for t in range(length):
        acc = conv_b.clone().expand(batch, e).clone()
        for j in range(k):
            # causal: taps on t-(k-1)..t; anti-causal (backward scan in token order): taps on t+(k-1)..t
            src = t - (k - 1) + j if not reverse else t + (k - 1) - j
            if 0 <= src < length:
                acc = acc + conv_w[:, 0, j] * x[:, :, src]
        u[:, :, t] = F.silu(acc)
    dbl = torch.einsum("oe,bel->bol", x_proj_w, u)  # (B, R + 2N, L)
    dt, b_in, c_out = dbl[:, :rank], dbl[:, rank : rank + n], dbl[:, rank + n :]
    delta = F.softplus(torch.einsum("er,brl->bel", dt_w, dt) + dt_b[:, None])  # (B, E, L)
    a = -torch.exp(a_log)
    state = torch.zeros(batch, e, n)
    y = torch.zeros_like(x)
    for t in reversed(range(length)) if reverse else range(length):
        state = (
            torch.exp(delta[:, :, t, None] * a) * state + (delta[:, :, t] * u[:, :, t])[..., None] * b_in[:, None, :, t]
        )
        y[:, :, t] = (state * c_out[:, None, :, t]).sum(-1) + skip * u[:, :, t]
    return y * F.silu(z), delta


def hand_mixer(mixer, hidden):
    p = {name: t.detach() for name, t in mixer.named_parameters()}
    xz = torch.einsum("od,bld->bol", p["in_proj.weight"], hidden)
    x, z = xz.chunk(2, dim=1)
    common = {"rank": mixer.dt_rank, "n": mixer.d_state}
    outs, deltas = [], []
    for s, reverse in (("", False), ("_b", True)):
        y, delta = hand_direction(
            x,
            z,
            p[f"conv1d{s}.weight"],
            p[f"conv1d{s}.bias"],
            p[f"x_proj{s}.weight"],
            p[f"dt_proj{s}.weight"],
            p[f"dt_proj{s}.bias"],
            p[f"A{s}_log"],
            p[f"D{s}"],
            reverse,
            **common,
        )
        outs.append(y)
        deltas.append(delta)
    combined = (outs[0] + outs[1]) / (2 if mixer.divide_out else 1)
    return torch.einsum("de,bel->bld", p["out_proj.weight"], combined), deltas


# CPU tensors here: mamba_ssm (listed where CUDA and the kernels exist) is covered by the GPU scan tests.
@pytest.mark.parametrize("backend", ["auto", *(b for b in available_backends() if b != "mamba_ssm")])
@pytest.mark.parametrize("divide_out", [True, False])
def test_bidirectional_mixer_equals_a_hand_computation(divide_out, backend):
    mixer = randomized_mixer(divide_out, backend=backend)
    hidden = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = mixer(hidden)
    expected, _ = hand_mixer(mixer, hidden)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_mixer_matches_the_reference_scan_per_direction():
    mixer = randomized_mixer()
    hidden = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        xz = hidden @ mixer.in_proj.weight.T
        x, z = xz.transpose(1, 2).chunk(2, dim=1)
        ys = []
        for s, flip in (("", False), ("_b", True)):
            xi, zi = (x.flip(-1), z.flip(-1)) if flip else (x, z)
            conv = getattr(mixer, f"conv1d{s}")
            u = F.silu(F.conv1d(xi, conv.weight, conv.bias, padding=3, groups=conv.weight.shape[0])[..., :7])
            dbl = u.transpose(1, 2) @ getattr(mixer, f"x_proj{s}").weight.T
            r, n = mixer.dt_rank, mixer.d_state
            delta = (dbl[..., :r] @ getattr(mixer, f"dt_proj{s}").weight.T).transpose(1, 2)
            y = selective_scan_reference(
                u,
                delta,
                -torch.exp(getattr(mixer, f"A{s}_log")),
                dbl[..., r : r + n].transpose(1, 2),
                dbl[..., r + n :].transpose(1, 2),
                getattr(mixer, f"D{s}"),
                zi,
                getattr(mixer, f"dt_proj{s}").bias,
                delta_softplus=True,
            )
            ys.append(y.flip(-1) if flip else y)
        expected = ((ys[0] + ys[1]) / 2).transpose(1, 2) @ mixer.out_proj.weight.T
        torch.testing.assert_close(mixer(hidden), expected, rtol=1e-5, atol=1e-6)


def test_vim_halves_what_videomamba_sums():
    vim_mixer, video_mixer = randomized_mixer(True), randomized_mixer(False)
    hidden = torch.randn(1, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(video_mixer(hidden), 2 * vim_mixer(hidden))


def test_returned_delta_is_aligned_with_token_order():
    mixer = randomized_mixer()
    hidden = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = mixer(hidden)
        out, delta = mixer(hidden, return_delta=True)
    assert torch.equal(out, plain), "the Δ handed out is the one scanned: the output must not change"
    _, (delta_fwd, delta_bwd) = hand_mixer(mixer, hidden)
    assert delta.forward.shape == delta.backward.shape == (2, mixer.d_inner, 9)
    # Position t of the backward Δ must be computed from token t's (anti-causal) neighbourhood.
    torch.testing.assert_close(delta.forward, delta_fwd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta.backward, delta_bwd, rtol=1e-5, atol=1e-6)
    assert (delta.backward > 0).all() and not delta.backward.requires_grad
    # A change to the last token reaches the forward Δ only at the last position, the backward Δ from
    # position L - d_conv on (its conv window looks right).
    bumped = hidden.clone()
    bumped[:, -1] += 1.0
    with torch.no_grad():
        _, bumped_delta = mixer(bumped, return_delta=True)
    changed_fwd = (bumped_delta.forward - delta.forward).abs().amax(dim=(0, 1)) > 0
    changed_bwd = (bumped_delta.backward - delta.backward).abs().amax(dim=(0, 1)) > 0
    assert changed_fwd.tolist() == [False] * 8 + [True]
    assert changed_bwd.tolist() == [False] * 5 + [True] * 4


def test_returning_delta_keeps_gradients_of_the_output():
    mixer = randomized_mixer()
    hidden = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    plain = mixer(hidden)
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), hidden)
    out, _ = mixer(hidden, return_delta=True)
    (grad_delta,) = torch.autograd.grad(out.square().sum(), hidden)
    torch.testing.assert_close(grad_delta, grad_plain, rtol=1e-5, atol=1e-6)


def test_mixer_initialisation_follows_mamba():
    mixer = BidirectionalMamba(64, d_state=16)
    for s in ("", "_b"):
        a_log = getattr(mixer, f"A{s}_log")
        torch.testing.assert_close(a_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
        assert torch.equal(getattr(mixer, f"D{s}"), torch.ones(128))
        dt = F.softplus(getattr(mixer, f"dt_proj{s}").bias.detach())
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and mixer.conv1d.bias is not None


def test_block_is_add_then_rmsnorm_then_mixer():
    torch.manual_seed(0)
    seen = {}

    def spy(x):
        seen["x"] = x
        return 3 * x

    block = Block(8, spy)
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
    hidden, residual = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    out, new_residual = block(hidden, residual)
    torch.testing.assert_close(new_residual, hidden + residual)
    ms = (hidden + residual).square().mean(-1, keepdim=True)
    expected = (hidden + residual) / torch.sqrt(ms + 1e-5) * block.norm.weight
    torch.testing.assert_close(seen["x"], expected)
    torch.testing.assert_close(out, 3 * expected)
    _, first_residual = block(hidden, None)
    assert torch.equal(first_residual, hidden)
    assert isinstance(block.norm, RMSNorm) and block.norm.bias is None
