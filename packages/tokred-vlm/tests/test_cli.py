"""`tokred vlm generate` and `tokred vlm models`, end to end on tiny checkpoints and images the tests write."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from transformers.utils import is_torchvision_available

from tokred.core.cli import main
from tokred.vlm import ApET, attach, supported_model_names
from tokred.vlm.testing import FAMILIES, tiny_config, tiny_processor

REDUCED = re.compile(r"visual tokens kept (\d+)/(\d+), prefill (\d+) -> (\d+) tokens, (\d+) new tokens? in [\d.]+ s")
DENSE = re.compile(r"dense: (\d+) visual tokens, prefill (\d+) tokens, (\d+) new tokens? in [\d.]+ s")
VIDEO_CLASSES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "video_llava")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A 112 x 84 PNG of seeded noise (12 visual tokens for the tiny Qwen models, 16 for LLaVA)."""
    path = tmp_path_factory.mktemp("images") / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def generate_argv(folder, image, *extra):
    return ["vlm", "generate", "--model", str(folder), "--image", str(image), "--prompt", "describe", *extra]


def run_cli(argv, capsys):
    assert main(argv) == 0
    return capsys.readouterr()


def direct_generate(folder, family, image_file, reducer=None, max_new_tokens=5, layers=None):
    """What a user writes in Python: processor, chat template, `attach` and `generate`; the new tokens' text."""
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = tiny_processor(family)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(image_file) as image:
        inputs = processor(text=[text], images=[[image.convert("RGB")]], return_tensors="pt")
    with torch.inference_mode():
        if reducer is None:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        else:
            with attach(model, reducer, layers=layers):
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :]
    return processor.decode(new, skip_special_tokens=True).strip()


# -- tiny_processor: the checkpoints these tests load ------------------------------------------------------------


def test_tiny_tokenizer_has_a_word_for_every_id():
    tokenizer = tiny_processor("llava").tokenizer
    ids = list(range(3, 995))
    words = [tokenizer.decode([i]) for i in ids]
    assert all(word and not word.isspace() and " " not in word for word in words)
    assert tokenizer(" ".join(words), add_special_tokens=False).input_ids == ids
    encoded = tokenizer("Describe the image.").input_ids
    assert encoded[0] == 1 and tokenizer.decode(encoded, skip_special_tokens=True) == "describe the image ."
    assert tokenizer("zyzzyva").input_ids == [1, 995]  # <unk>
    assert tokenizer.decode([999, 998, 0, 1, 2, 5], skip_special_tokens=True) == words[2]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_processor_round_trips_through_save_pretrained(checkpoint, image_file, family):
    from tokred.vlm.processors import load_processor

    original = tiny_processor(family)
    # The tiny processors are PIL-backed; a saved one loads back as such. Folders without a video processor
    # load images-only (AutoProcessor alone needs one for the video classes).
    loaded = load_processor(str(checkpoint(family)), backend="pil")
    assert type(loaded).__name__ == type(original).__name__
    assert loaded.chat_template == original.chat_template
    assert loaded.tokenizer.get_vocab() == original.tokenizer.get_vocab()
    assert loaded.image_processor.to_dict() == original.image_processor.to_dict()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
    text = loaded.apply_chat_template(messages, add_generation_prompt=True)
    assert text == original.apply_chat_template(messages, add_generation_prompt=True)
    assert text.startswith("user: ") and text.endswith("what is this?\nassistant:")
    with Image.open(image_file) as image:
        image = image.convert("RGB")
    options = {"return_legacy_image_output": False} if family == "video_llava" else {}
    a = loaded(text=[text], images=[[image]], return_tensors="pt", **options)
    b = original(text=[text], images=[[image]], return_tensors="pt", **options)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- generate --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_prints_the_answer_and_a_reduced_prefill(checkpoint, image_file, capsys, family):
    argv = generate_argv(
        checkpoint(family), image_file, "--reducer", "apet", "--num-keep", "4", "--max-new-tokens", "5"
    )
    captured = run_cli(argv, capsys)
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2, captured.out
    words = lines[0].split()
    assert 1 <= len(words) <= 5 and all(w.isprintable() for w in words), lines[0]
    assert lines[1].startswith("apet (num_keep=4; ")
    kept, total, original, reduced, new = map(int, REDUCED.search(lines[1]).groups())
    assert 0 < kept < total
    assert reduced < original and original - reduced == total - kept
    assert new == 5
    if family in VIDEO_CLASSES and not is_torchvision_available():
        assert "without its video processor" in captured.err


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_cli_answer_equals_attach_and_generate_in_python(checkpoint, image_file, capsys, family):
    folder = checkpoint(family)
    reduced = run_cli(generate_argv(folder, image_file, "--num-keep", "4", "--max-new-tokens", "6"), capsys)
    dense = run_cli(generate_argv(folder, image_file, "--reducer", "none", "--max-new-tokens", "6"), capsys)
    expected_reduced = direct_generate(folder, family, image_file, ApET(num_keep=4, seed=0), max_new_tokens=6)
    expected_dense = direct_generate(folder, family, image_file, max_new_tokens=6)
    assert reduced.out.splitlines()[0] == expected_reduced
    assert dense.out.splitlines()[0] == expected_dense
    assert expected_reduced != expected_dense, "the reduced run must be distinguishable from the dense one"


def test_compare_prints_both_answers_and_both_timings(checkpoint, image_file, capsys):
    folder = checkpoint("qwen2_vl")
    argv = generate_argv(folder, image_file, "--keep-ratio", "0.25", "--max-new-tokens", "4", "--compare")
    out = run_cli(argv, capsys).out
    blocks = out.split("--- ")
    assert blocks[1].startswith("dense\n")
    assert blocks[2].startswith("apet (keep_ratio=0.25; llm space, original positions)\n")
    dense_text = blocks[1].splitlines()[1]
    assert DENSE.search(out) and REDUCED.search(out)
    kept, total, *_ = map(int, REDUCED.search(out).groups())
    assert (kept, total) == (3, 12)
    assert re.search(r"\(\d+\.\d+x the dense speed\)", out)
    plain = run_cli(generate_argv(folder, image_file, "--reducer", "none", "--max-new-tokens", "4"), capsys).out
    assert plain.splitlines()[0] == dense_text


def test_answer_length_defaults_to_the_checkpoints_generation_config(checkpoint, image_file, tmp_path, capsys):
    folder = tmp_path / "short-answers"
    shutil.copytree(checkpoint("llava"), folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    model.generation_config.max_new_tokens = 2
    model.generation_config.eos_token_id = None  # so the count is the limit, not an early stop
    model.generation_config.save_pretrained(folder)
    short = DENSE.search(run_cli(generate_argv(folder, image_file, "--reducer", "none"), capsys).out)
    assert int(short.group(3)) == 2
    longer = DENSE.search(
        run_cli(generate_argv(folder, image_file, "--reducer", "none", "--max-new-tokens", "5"), capsys).out
    )
    assert int(longer.group(3)) == 5


def test_dense_run_reports_the_full_prefill(checkpoint, image_file, capsys):
    out = run_cli(
        generate_argv(checkpoint("llava"), image_file, "--reducer", "none", "--max-new-tokens", "3"), capsys
    ).out
    visual, length, new = map(int, DENSE.search(out).groups())
    assert visual == 16 and length > visual and new == 3
    assert "kept" not in out


def test_several_images_space_positions_and_reducer_arguments(checkpoint, image_file, capsys):
    argv = [
        *generate_argv(checkpoint("video_llava"), image_file, "--image", str(image_file)),
        *("--num-keep", "5", "--space", "vision", "--positions", "original", "--max-new-tokens", "2"),
        *("--reducer-arg", "variant=reference", "--reducer-arg", "num_basis=2", "--attn-implementation", "sdpa"),
        *("--dtype", "float32"),
    ]
    out = run_cli(argv, capsys).out
    assert "apet (num_keep=5, variant='reference', num_basis=2; vision space, original positions)" in out
    kept, total, original, reduced, _ = map(int, REDUCED.search(out).groups())
    assert (kept, total) == (10, 32) and original - reduced == 22


def test_without_a_chat_template_the_prompt_is_placeholders_then_text(checkpoint, image_file, tmp_path, capsys):
    folder = tmp_path / "no-template"
    shutil.copytree(checkpoint("qwen2_vl"), folder)
    (folder / "chat_template.jinja").unlink()
    out = run_cli(generate_argv(folder, image_file, "--num-keep", "2", "--max-new-tokens", "2"), capsys).out
    kept, total, original, reduced, _ = map(int, REDUCED.search(out).groups())
    assert (kept, total) == (2, 12)
    assert original == 1 + 1 + 12 + 1 + 1  # BOS, vision_start, 12 image tokens, vision_end, "describe"
    assert reduced == original - 10


def test_random_reducer_is_seeded(checkpoint, image_file, capsys):
    argv = generate_argv(checkpoint("llava"), image_file, "--reducer", "random", "--num-keep", "3", "--seed", "7")
    first = run_cli([*argv, "--max-new-tokens", "4"], capsys).out.splitlines()[0]
    second = run_cli([*argv, "--max-new-tokens", "4"], capsys).out.splitlines()[0]
    assert first == second


# -- models ----------------------------------------------------------------------------------------------------


def test_models_lists_every_supported_class_with_its_defaults(capsys):
    out = run_cli(["vlm", "models"], capsys).out
    for name in supported_model_names():
        assert name in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip() and "  " in line}
    assert rows["llava"][-2:] == ["vision|llm", "compact"]
    assert rows["qwen2_vl"][-2:] == ["llm", "original"]
    assert rows["video_llava"][-2:] == ["llm|vision", "compact"]


def test_console_script_has_the_vlm_command():
    exe = shutil.which("tokred", path=os.path.dirname(sys.executable))
    result = subprocess.run([exe, "vlm", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and "generate" in result.stdout and "models" in result.stdout


# -- errors ----------------------------------------------------------------------------------------------------


def one_line_error(argv, capsys):
    """Run the command; it must fail with status 2 and exactly one line on stderr, which is returned."""
    code = main(argv)
    # transformers' own loading bars (and the test's save_pretrained) may come first; they are not tokred's
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and "%|" not in line]
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("tokred vlm generate: "), err
    return err[0]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ((), r"--reducer apet needs --num-keep, --keep-ratio or --average \(or --reducer none"),
        (("--reducer", "none", "--layers", "1:3"), "need a reducer"),
        (("--average", "64", "--layers", "1:3"), "either --average or --layers"),
        (("--average", "64", "--num-keep", "4"), "not allowed with argument"),
        (("--average", "1"), "argument --average: expected a number of tokens of at least 2"),
        (("--average", "0.9"), "argument --average"),
        (("--num-keep", "4", "--layers", "1"), "argument --layers: expected LAYER:TOKENS"),
        (("--num-keep", "4", "--layers", "0:3"), "argument --layers"),
        (("--num-keep", "4", "--layers", "1:1.5"), "argument --layers"),
        (("--reducer", "none", "--num-keep", "4"), "need a reducer"),
        (("--reducer", "none", "--compare"), "--compare needs a reducer"),
        (("--reducer", "nope", "--num-keep", "4"), "unknown reducer 'nope'"),
        (("--num-keep", "4", "--reducer-arg", "bogus=1"), "unexpected keyword argument 'bogus'"),
        (("--num-keep", "4", "--reducer-arg", "keep_ratio=0.5"), "not --reducer-arg keep_ratio"),
        (("--keep-ratio", "1.5"), r"argument --keep-ratio: expected a fraction in \(0, 1\]"),
        (("--num-keep", "4", "--num-keep", "0"), "argument --num-keep: expected a positive integer"),
        (("--num-keep", "4", "--keep-ratio", "0.5"), "not allowed with argument --num-keep"),
        (("--num-keep", "4", "--max-new-tokens=-1"), "argument --max-new-tokens"),
        (("--num-keep", "4", "--reducer-arg=novalue"), "argument --reducer-arg: expected KEY=VALUE"),
        (("--num-keep", "4", "--device", "cuda:3"), "argument --device"),
        (("--reducer", "topk", "--num-keep", "4"), "'caller' scores, which tokred.vlm does not supply"),
    ],
)
def test_argument_errors_are_one_line_and_come_before_any_loading(tmp_path, image_file, capsys, extra, match):
    # No model folder exists: were any of these found only after loading, the error would be about the model.
    assert re.search(match, one_line_error(generate_argv(tmp_path / "never-loaded", image_file, *extra), capsys))


def test_inner_stages_answer_as_attach_with_layers_in_python(checkpoint, image_file, capsys):
    folder = checkpoint("llava")
    argv = generate_argv(folder, image_file, "--num-keep", "8", "--layers", "1:3", "--max-new-tokens", "6")
    lines = run_cli(argv, capsys).out.splitlines()
    expected = direct_generate(folder, "llava", image_file, ApET(num_keep=8), 6, layers={1: ApET(num_keep=3)})
    assert lines[0] == expected
    assert lines[1].startswith("apet (num_keep=8, then num_keep=3 after layer 1; vision space, compact positions)")
    assert "prefill 22 -> 14 tokens, 6 new tokens in" in lines[1]
    assert "; 9 tokens from layer 1; 5.5 visual tokens per group averaged over the layers" in lines[1]
    average = run_cli(generate_argv(folder, image_file, "--average", "6", "--max-new-tokens", "6"), capsys)
    # The paper schedule of an average of 6: 9 tokens, then 3 after layer 1 of 2.
    explicit = generate_argv(folder, image_file, "--num-keep", "9", "--layers", "1:3", "--max-new-tokens", "6")
    assert average.out.splitlines()[0] == run_cli(explicit, capsys).out.splitlines()[0]
    assert lines[0] != direct_generate(folder, "llava", image_file, ApET(num_keep=8), 6)


def test_an_inner_stage_beyond_the_decoder_is_refused_before_loading(checkpoint, image_file, capsys):
    error = one_line_error(generate_argv(checkpoint("llava"), image_file, "--num-keep", "8", "--layers", "2:3"), capsys)
    assert "the model has 2 decoder layers, so an inner stage follows layer 1 to 1" in error


def test_missing_and_unreadable_images(checkpoint, tmp_path, capsys):
    line = one_line_error(generate_argv(checkpoint("llava"), tmp_path / "missing.png", "--num-keep", "4"), capsys)
    assert re.search(r"image file not found: .*missing\.png", line)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert re.search(
        r"cannot read image .*notes\.png",
        one_line_error(generate_argv(checkpoint("llava"), text, "--num-keep", "4"), capsys),
    )
    folder_line = one_line_error(generate_argv(checkpoint("llava"), tmp_path, "--num-keep", "4"), capsys)
    assert "is a folder, not an image file" in folder_line
    no_images = ["vlm", "generate", "--model", str(checkpoint("llava")), "--prompt", "x", "--num-keep", "4"]
    assert "give at least one image file" in one_line_error(no_images, capsys)


def test_missing_model_folder(image_file, tmp_path, capsys):
    line = one_line_error(generate_argv(tmp_path / "no-such-model", image_file, "--num-keep", "4"), capsys)
    assert "model folder not found" in line
    (tmp_path / "empty").mkdir()
    line = one_line_error(generate_argv(tmp_path / "empty", image_file, "--num-keep", "4"), capsys)
    assert "cannot read the config of" in line and "config.json" in line
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    assert "is a file; give a checkpoint folder" in one_line_error(
        generate_argv(a_file, image_file, "--num-keep", "4"), capsys
    )


def test_vision_space_refused_for_qwen(checkpoint, image_file, capsys):
    line = one_line_error(
        generate_argv(checkpoint("qwen2_vl"), image_file, "--num-keep", "4", "--space", "vision"), capsys
    )
    assert "space='vision' is not possible for Qwen2-VL" in line


def test_debug_shows_the_traceback(checkpoint, image_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found"):
        main([*generate_argv(checkpoint("llava"), tmp_path / "missing.png", "--num-keep", "4"), "--debug"])


def test_unsupported_model_class_lists_the_supported_ones(image_file, tmp_path, capsys):
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    base = tiny_config("llava_next")
    config = LlavaNextVideoConfig(
        vision_config=base.vision_config.to_dict(),
        text_config=base.text_config.to_dict(),
        image_token_index=base.image_token_id,
        video_token_index=998,
        image_grid_pinpoints=base.image_grid_pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    LlavaNextVideoForConditionalGeneration(config).save_pretrained(tmp_path)
    tiny_processor("llava_next").save_pretrained(tmp_path)
    line = one_line_error(generate_argv(tmp_path, image_file, "--num-keep", "4"), capsys)
    assert "does not support LlavaNextVideoForConditionalGeneration; supported" in line
    out = run_cli(generate_argv(tmp_path, image_file, "--reducer", "none", "--max-new-tokens", "2"), capsys).out
    assert DENSE.search(out), "a dense run needs no supported class"
