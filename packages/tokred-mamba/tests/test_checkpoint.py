"""Checkpoint loading on files in the official formats that the tests write themselves."""

import argparse
import datetime

import pytest
import torch

from tokred.mamba import CheckpointError, create_model, load_checkpoint
from tokred.mamba.models.checkpoint import resize_pos_embed


def images(model, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if type(model).__name__ == "VideoMamba":
        return torch.randn(batch, 3, model.num_frames, model.img_size, model.img_size, generator=gen)
    return torch.randn(batch, 3, model.img_size, model.img_size, generator=gen)


def randomized(name, seed=0, **overrides):
    torch.manual_seed(seed)
    model = create_model(name, **overrides).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def official_container(model, ema_model):
    """The layout vim/main.py saves: weights, EMA weights, optimizer state and the argparse arguments."""
    return {
        "model": model.state_dict(),
        "model_ema": ema_model.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "lr_scheduler": {"last_epoch": 299},
        "epoch": 299,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "args": argparse.Namespace(
            model="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
            lr=5e-4,
            input_size=224,
            model_ema=True,
            output_dir="./output",
        ),
    }


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    source, ema = randomized("vim_test", seed=0), randomized("vim_test", seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "vim_test_official.pth"
    torch.save(official_container(source, ema), path)
    return path, source, ema


def test_official_container_round_trip(official_file):
    path, source, ema = official_file
    loaded = create_model("vim_test", checkpoint=path).eval()
    x = images(loaded)
    with torch.inference_mode():
        assert torch.equal(loaded(x), source(x))
        assert not torch.equal(loaded(x), ema(x))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_model_ema_entry_is_picked_on_request(official_file):
    path, _, ema = official_file
    model = create_model("vim_test", checkpoint=path, checkpoint_key="model_ema").eval()
    x = images(model)
    with torch.inference_mode():
        assert torch.equal(model(x), ema(x))
    report = load_checkpoint(create_model("vim_test"), path, key="model_ema")
    assert report.key == "model_ema" and report.missing_keys == [] and report.unexpected_keys == []
    assert report.args.model.startswith("vim_tiny_patch16_224")


def test_bare_state_dict_and_dataparallel_prefix(tmp_path):
    source = randomized("videomamba_video_test")
    bare = tmp_path / "bare.pth"
    torch.save(source.state_dict(), bare)
    prefixed = tmp_path / "prefixed.pth"
    torch.save({"module": {f"module.{k}": v for k, v in source.state_dict().items()}}, prefixed)
    x = images(source)
    for path, key in ((bare, None), (prefixed, "module")):
        model = create_model("videomamba_video_test").eval()
        report = load_checkpoint(model, path)
        assert report.key == key
        with torch.inference_mode():
            assert torch.equal(model(x), source(x))
    with pytest.raises(CheckpointError, match=r"no 'model_ema' entry"):
        load_checkpoint(create_model("videomamba_video_test"), prefixed, key="model_ema")


def test_an_already_loaded_dict_is_accepted():
    source = randomized("videomamba_test")
    model = create_model("videomamba_test", checkpoint={"model": source.state_dict()}).eval()
    x = images(model)
    with torch.inference_mode():
        assert torch.equal(model(x), source(x))


def test_corrupted_empty_and_foreign_files_are_named(tmp_path, official_file):
    path, _, _ = official_file
    truncated = tmp_path / "truncated.pth"
    data = path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.pth.*corrupted or truncated"):
        create_model("vim_test", checkpoint=truncated)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty"):
        create_model("vim_test", checkpoint=empty)
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint"):
        create_model("vim_test", checkpoint=text)
    foreign = tmp_path / "foreign.pth"
    torch.save({"epoch": 3, "best_acc": 81.2, "notes": "hello"}, foreign)
    with pytest.raises(CheckpointError, match=r"not a state dict of tensors.*'epoch', 'best_acc', 'notes'"):
        create_model("vim_test", checkpoint=foreign)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        create_model("vim_test", checkpoint=tmp_path / "missing.pth")
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(CheckpointError, match=r"holds a list"):
        create_model("vim_test", checkpoint=a_list)


def test_shape_mismatches_name_the_keys_and_the_fix(tmp_path):
    path = tmp_path / "ten_classes.pth"
    torch.save({"model": create_model("vim_test").state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"'head.weight'.*\(10, 32\) vs model \(5, 32\).*num_classes=10"):
        create_model("vim_test", checkpoint=path, num_classes=5)
    with pytest.raises(CheckpointError, match=r"D=32, 4-block model but this one is D=48, 4 blocks"):
        create_model("vim_test", checkpoint=path, embed_dim=48)
    with pytest.raises(CheckpointError, match=r"'layers.3.*unexpected keys.*D=32, 4-block model"):
        create_model("vim_test", checkpoint=path, depth=3)
    video = tmp_path / "video.pth"
    torch.save(create_model("videomamba_video_test", img_size=64).state_dict(), video)
    with pytest.raises(CheckpointError, match=r"video model \(Conv3d"):
        create_model("vim_test", checkpoint=video)


def test_missing_and_unexpected_keys_are_named_and_strict_false_reports_them(tmp_path):
    state = create_model("vim_test").state_dict()
    del state["norm_f.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save({"model": state, "args": argparse.Namespace(model="vim_tiny")}, path)
    with pytest.raises(CheckpointError) as info:
        create_model("vim_test", checkpoint=path)
    message = str(info.value)
    assert "1 ('norm_f.weight') keys missing" in message and "1 ('extra.weight') unexpected" in message
    assert "odd.pth" in message and "'vim_tiny'" in message
    report = load_checkpoint(create_model("vim_test"), path, strict=False)
    assert report.missing_keys == ["norm_f.weight"] and report.unexpected_keys == ["extra.weight"]


def test_one_directional_mamba_checkpoint_is_recognised():
    backward = ("A_b_log", "D_b", "conv1d_b.", "x_proj_b.", "dt_proj_b.")
    state = {k: v for k, v in create_model("vim_test").state_dict().items() if not any(s in k for s in backward)}
    with pytest.raises(CheckpointError, match=r"no backward-scan parameters"):
        create_model("vim_test", checkpoint=state)


def test_untrusted_objects_are_refused_and_trusted_true_loads_them(tmp_path):
    source = randomized("vim_test")
    path = tmp_path / "with_object.pth"
    torch.save({"model": source.state_dict(), "saved_on": datetime.date(2024, 1, 1)}, path)
    with pytest.raises(CheckpointError, match=r"datetime.date.*trusted=True"):
        create_model("vim_test", checkpoint=path)
    model = create_model("vim_test", checkpoint=path, trusted=True).eval()
    x = images(model)
    with torch.inference_mode():
        assert torch.equal(model(x), source(x))


def test_pos_embed_is_interpolated_for_another_image_size_and_stride(official_file):
    path, source, _ = official_file
    for overrides in ({"img_size": 96}, {"stride": 8}, {"img_size": 48}):
        model = create_model("vim_test", checkpoint=path, **overrides).eval()
        x = images(model)
        with torch.inference_mode():
            logits = model(x)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        # The class entry moves with the class token, from the old middle to the new one.
        torch.testing.assert_close(model.pos_embed[0, model.cls_index], source.pos_embed[0, source.cls_index])
        torch.testing.assert_close(model.layers[2].mixer.A_b_log, source.layers[2].mixer.A_b_log)
    report = load_checkpoint(create_model("vim_test", img_size=96), path)
    assert report.resized_keys == ["pos_embed"]


def test_resize_pos_embed_keeps_the_class_entry_and_is_identity_at_the_same_size():
    pos = torch.randn(1, 17, 8)
    same = resize_pos_embed(pos, src_cls_index=8, dst_grid=(4, 4), dst_cls_index=8)
    torch.testing.assert_close(same, pos)
    grid = torch.arange(16.0).reshape(1, 16, 1).expand(1, 16, 8)  # constant along D
    flat = torch.cat((grid[:, :8], torch.full((1, 1, 8), -7.0), grid[:, 8:]), dim=1)
    bigger = resize_pos_embed(flat, src_cls_index=8, dst_grid=(6, 6), dst_cls_index=18)
    assert bigger.shape == (1, 37, 8)
    assert torch.equal(bigger[0, 18], torch.full((8,), -7.0))
    assert (bigger[0, torch.arange(37) != 18] >= -1.0).all(), "the class entry must not leak into the grid"
    with pytest.raises(CheckpointError, match="not a square grid"):
        resize_pos_embed(torch.randn(1, 16, 8), src_cls_index=0, dst_grid=(4, 4), dst_cls_index=0)


def test_temporal_pos_embedding_is_interpolated_for_another_frame_count(tmp_path):
    source = randomized("videomamba_video_test")
    with torch.no_grad():
        source.temporal_pos_embedding.copy_(torch.linspace(0, 1, 4)[None, :, None].expand(1, 4, 32))
    path = tmp_path / "video.pth"
    torch.save(source.state_dict(), path)
    model = create_model("videomamba_video_test", checkpoint=path, num_frames=8).eval()
    with torch.inference_mode():
        logits = model(images(model))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    temporal = model.temporal_pos_embedding[0, :, 0]
    assert temporal.shape == (8,) and (temporal.diff() >= 0).all()
    torch.testing.assert_close(temporal[[0, -1]], torch.tensor([0.0, 1.0]))


def test_image_weights_initialise_a_video_model_with_strict_false(tmp_path):
    image = randomized("videomamba_test", img_size=32)
    path = tmp_path / "image.pth"
    torch.save({"model": image.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"'temporal_pos_embedding'\) keys missing"):
        create_model("videomamba_video_test", checkpoint=path)
    video = create_model("videomamba_video_test")
    report = load_checkpoint(video, path, strict=False)
    assert report.missing_keys == ["temporal_pos_embedding"]
    assert "patch_embed.proj.weight" in report.resized_keys
    torch.testing.assert_close(video.patch_embed.proj.weight[:, :, 0], image.patch_embed.proj.weight)
