"""vdit_accel.video's quality measures: PSNR and SSIM."""

import numpy as np
import pytest

from vdit_accel.video import psnr, ssim


def _video(seed, shape=(3, 40, 56, 3)):
    rng = np.random.default_rng(seed)
    base = rng.random((shape[0], shape[1] // 8, shape[2] // 8, 3))
    return np.clip(np.kron(base, np.ones((1, 8, 8, 1))) + 0.02 * rng.standard_normal(shape), 0, 1)


def test_ssim_identity_ordering_and_symmetry():
    a = _video(0)
    rng = np.random.default_rng(1)
    slight = np.clip(a + 0.02 * rng.standard_normal(a.shape), 0, 1)
    strong = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert 1.0 > ssim(a, slight) > ssim(a, strong) > 0.0
    assert ssim(a, strong) == pytest.approx(ssim(strong, a), abs=1e-12)
    assert ssim(a, _video(5)) < 0.5  # unrelated videos
    assert psnr(a, a) == float("inf") and psnr(a, slight) > psnr(a, strong)


def test_ssim_matches_the_formula_on_constant_frames():
    """Constant frames: no variance, SSIM is the luminance term (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)."""
    a, b = np.full((2, 16, 16, 3), 0.3), np.full((2, 16, 16, 3), 0.6)
    c1 = 0.01 ** 2
    assert ssim(a, b) == pytest.approx((2 * 0.3 * 0.6 + c1) / (0.3 ** 2 + 0.6 ** 2 + c1), rel=1e-9)


def test_ssim_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        ssim(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 9, 3)))


def test_comparison_frames_and_strip_layout():
    from vdit_accel.video import comparison_frames, difference, frame_strip

    a = _video(0, (5, 32, 40, 3))
    b = np.clip(a + 0.05, 0, 1)
    frames = comparison_frames(a, b, gain=8.0, min_width=80)  # 40 px panels doubled: 80 wide
    assert frames.shape == (5, 14 + 64, 3 * 80 + 2 * 4, 3) and frames.dtype == np.uint8
    assert frames[:, :14].std() > 0  # the labels are drawn in the band
    assert not difference(a, a).any() and difference(a, b).mean() > 50  # 0.05 * 255 * 8 ~ 100 where unclipped
    strip = frame_strip({"dense": a, "accelerated": b}, count=3, min_width=40)
    assert strip.shape == (2 * (14 + 32) + 4, 3 * 40 + 2 * 4, 3)
    with pytest.raises(ValueError, match="one length"):
        frame_strip({"dense": a, "short": a[:2]})
