"""Linear probes of the model cards: the features they read and the classifier they fit."""

import pytest
import torch

from tokred.bench.training.probes import linear_probe_accuracy, vim_block_features
from tokred.core.errors import InvalidInputError
from tokred.mamba import attach, create_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("vim_scenes", img_size=32, embed_dim=16, depth=3, d_state=4).eval()


def test_the_last_block_features_are_the_models_own(model):
    images = torch.rand(5, 3, 32, 32)
    features = vim_block_features(model, images, batch_size=2)
    assert features.shape == (3, 5, 16)
    torch.testing.assert_close(features[-1], model.forward_features(images), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(features[0], features[-1])


def test_a_model_with_a_reduction_is_refused(model):
    with attach(model, "mtr", r=4), pytest.raises(InvalidInputError, match="detach the token reduction"):
        vim_block_features(model, torch.rand(1, 3, 32, 32))


def test_the_probe_reads_a_linear_label_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 10, generator=generator)
    linear = (x[:, :3] @ torch.randn(3, 4, generator=generator)).argmax(-1)
    assert linear_probe_accuracy(x[:400], linear[:400], x[400:], linear[400:], classes=4) > 0.9
    noise = torch.randint(4, (600,), generator=generator)
    assert linear_probe_accuracy(x[:400], noise[:400], x[400:], noise[400:], classes=4) < 0.4


def test_mismatched_shapes_are_refused():
    with pytest.raises(InvalidInputError, match="one label per feature row"):
        linear_probe_accuracy(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), torch.zeros(2, 2),
                              torch.zeros(2, dtype=torch.long), classes=2)  # fmt: skip
