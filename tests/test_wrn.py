"""Wide ResNet shapes, parameter count, in-model normalisation, safe checkpoints, augmentation."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from leo.backbone.augment import augment, random_crop
from leo.backbone.wrn import (
    WideResNet,
    WRNConfig,
    backbone_checkpoint,
    channel_stats,
    count_parameters,
    load_backbone,
    to_input,
)
from leo.utils.errors import LeoInputError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run best on one thread; two spin-wait badly on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_wrn_28_10_paper_config_shapes_and_parameter_count():
    model = WideResNet(WRNConfig(depth=28, width=10, strides=(2, 2, 2), num_classes=64)).eval()
    # WRN-28-10 as in Zagoruyko & Komodakis: 36,479,194 parameters with a 10-class head.
    ten = WideResNet(WRNConfig(depth=28, width=10, num_classes=10))
    assert count_parameters(ten) == 36_479_194
    assert count_parameters(model) == 36_479_194 + 54 * 641  # 64-class head: 54 more rows
    maps = []
    model.bn.register_forward_hook(lambda m, i, o: maps.append(o.shape))
    with torch.inference_mode():
        feats = model.features(torch.rand(1, 3, 80, 80))
        logits = model(torch.rand(2, 3, 32, 32))
    assert feats.shape == (1, 640)
    assert maps[0] == (1, 640, 10, 10)  # three down-sampling steps: 80 -> 40 -> 20 -> 10
    assert logits.shape == (2, 64)


def test_small_omniglot_config_shapes():
    cfg = WRNConfig(depth=10, width=2, strides=(2, 2, 2), in_channels=1, num_classes=5)
    model = WideResNet(cfg).eval()
    assert cfg.feature_dim == 128
    assert len(model.blocks) == 3  # (10 - 4) / 6 = 1 block per group
    with torch.inference_mode():
        assert model.features(torch.rand(4, 1, 28, 28)).shape == (4, 128)
        assert model(torch.rand(4, 1, 28, 28)).shape == (4, 5)


@pytest.mark.parametrize(
    "depth,width,strides", [(12, 2, (1, 2, 2)), (10, 0, (1, 2, 2)), (10, 1, (1, 2))]
)
def test_bad_architecture_is_refused(depth, width, strides):
    with pytest.raises(ValueError):
        WRNConfig(depth=depth, width=width, strides=strides)


def test_input_normalisation_lives_in_the_model():
    torch.manual_seed(0)
    cfg = WRNConfig(depth=10, width=1, in_channels=3, num_classes=3)
    mean, std = torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0.1, 0.2, 0.3])
    normed = WideResNet(cfg, mean, std).eval()
    plain = WideResNet(cfg).eval()
    plain.load_state_dict({**normed.state_dict(), "mean": torch.zeros(3), "std": torch.ones(3)})
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        expected = plain.features((x - mean[:, None, None]) / std[:, None, None])
        torch.testing.assert_close(normed.features(x), expected)
    assert torch.equal(normed.state_dict()["std"], std)


def test_channel_stats_and_to_input():
    images = np.zeros((2, 4, 4, 2), np.uint8)
    images[..., 0] = 255
    images[1, ..., 1] = 51
    mean, std = channel_stats(images)
    torch.testing.assert_close(mean, torch.tensor([1.0, 0.1]))
    torch.testing.assert_close(std, torch.tensor([1e-3, 0.1]))  # constant channel: floor
    x = to_input(images)
    assert x.shape == (2, 2, 4, 4) and x.dtype == torch.float32
    assert x[1, 1, 0, 0].item() == pytest.approx(0.2)


def test_backbone_checkpoint_roundtrip(tmp_path):
    model = WideResNet(
        WRNConfig(depth=10, width=1, in_channels=1, num_classes=4),
        *channel_stats(np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)),
    )
    torch.save(backbone_checkpoint(model, classes=["a", "b", "c", "d"]), tmp_path / "b.pt")
    loaded, ckpt = load_backbone(tmp_path / "b.pt")
    assert not loaded.training and ckpt["classes"] == ["a", "b", "c", "d"]
    x = torch.rand(2, 1, 12, 12)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.features(x), model.eval().features(x), rtol=0, atol=0)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_load_backbone_never_executes_a_pickle(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "leo-wrn-v1", "x": _Exploit(str(marker))}, f, protocol=2)
    with pytest.raises(LeoInputError, match="evil.pt"):
        load_backbone(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(LeoInputError, match="pretrain stage"):
        load_backbone(tmp_path / "missing.pt")


def test_shift_is_a_bounded_translation_and_seeded():
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the centre of each image
    out = augment(x, "shift", 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 9, pos % 9
    assert out.flatten(1).sum(1).eq(1).all()  # a pure shift keeps the pixel
    assert (rows - 4).abs().max() <= 2 and (cols - 4).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # shifts do vary
    again = augment(x, "shift", 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_crop_flip_flips_some_and_pads_with_zeros():
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4).repeat(200, 1, 1, 1)
    assert torch.equal(random_crop(x, 0, "constant", torch.Generator()), x)
    out = augment(x, "crop_flip", 1, torch.Generator().manual_seed(1))
    flipped = (out[:, 0, 1:3, 1:3] == x.flip(3)[:, 0, 1:3, 1:3]).all(dim=(1, 2))
    same = (out[:, 0, 1:3, 1:3] == x[:, 0, 1:3, 1:3]).all(dim=(1, 2))
    assert flipped.any() and same.any()
    assert (out == 0).any()  # zero padding shows up on shifted crops
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment(x, "rotate", 1, torch.Generator())
