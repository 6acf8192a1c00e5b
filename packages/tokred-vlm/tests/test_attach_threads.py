"""Several threads calling generate() on one attached model (a web server does this) get their own answers."""

from __future__ import annotations

import threading

import pytest
import torch

from tokred.vlm import ApET, attach
from tokred.vlm.testing import Image, Video, tiny_inputs, tiny_model

THREADS = 4
CALLS = 3

# Each thread asks different questions: other image counts, sizes and lengths, so a mix-up shows.
CASES = {
    "llava": [
        [[3, Image(), 4]],
        [[2, Image(), 3, Image(), 2]],
        [[5, Image(), 1], [1, Image(), 2]],
        [[2, Image(), 2, Image(), 2, Image(), 2]],
    ],
    "llava_next": [
        [[3, Image(28, 56), 4]],
        [[2, Image(56, 56), 3]],
        [[1, Image(56, 28), 2], [3, Image(28, 56), 1]],
        [[2, Image(40, 60), 2]],
    ],
    "qwen2_vl": [
        [[3, Image(56, 84), 4]],
        [[2, Image(56, 56), 3, Video(4, 56, 56), 2]],
        [[1, Video(2, 56, 56), 2]],
        [[4, Image(28, 56), 1], [2, Image(56, 28), 2]],
    ],
}


def _generate(model, inputs):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize(
    ("family", "space"), [("llava", "vision"), ("llava", "llm"), ("llava_next", "vision"), ("qwen2_vl", "llm")]
)
def test_threads_on_one_attached_model_equal_their_solo_runs(family, space):
    model = tiny_model(family, attn_implementation="sdpa")
    inputs = [tiny_inputs(model, rows, seed=i) for i, rows in enumerate(CASES[family])]
    with attach(model, ApET(num_keep=5, num_basis=2), space=space):
        solo = [_generate(model, x) for x in inputs]
        results: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(THREADS)

        def work(worker: int) -> None:
            try:
                start.wait()
                for call in range(CALLS):
                    results[worker, call] = _generate(model, inputs[(worker + call) % len(inputs)])
            except BaseException as error:  # reported below, with the thread's own traceback chained
                errors.append(error)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]
    for (worker, call), (sequences, logits) in results.items():
        expected_sequences, expected_logits = solo[(worker + call) % len(inputs)]
        assert torch.equal(sequences, expected_sequences), (worker, call)
        assert torch.equal(logits, expected_logits), (worker, call)
