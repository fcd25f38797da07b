"""Metrics against reference implementations, AVD's properties, LPIPS plumbing, pairing, labels."""

import numpy as np
import pytest
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from attacks import Reconstruction
from fl_sim.leakage.metrics import (
    ALEXNET_CHECKPOINT,
    MetricUnavailable,
    avd,
    label_accuracy,
    lpips_distance,
    mse,
    psnr,
    ssim,
)
from fl_sim.leakage.scoring import pair, score
from tests.conftest import ROOT


@pytest.fixture
def images():
    from fl_sim.data.sources import load_dataset
    from fl_sim.scenario import DataConfig

    data = load_dataset(DataConfig(dataset="cifar10-sample", test_fraction=0.05))
    return data.train.batch(np.arange(6))[0]


@pytest.mark.parametrize("channels", [1, 3])
def test_psnr_ssim_mse_equal_scikit_image(images, channels):
    gt = images[:, :channels]
    rec = (gt + 0.08 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for i in range(len(gt)):
        g, r = gt[i].double().numpy(), rec[i].double().numpy()
        assert psnr(rec, gt)[i] == pytest.approx(peak_signal_noise_ratio(g, r, data_range=1.0))
        assert ssim(rec, gt)[i] == pytest.approx(structural_similarity(g, r, data_range=1.0, channel_axis=0))
        assert mse(rec, gt)[i] == pytest.approx(mean_squared_error(g, r))


def test_metrics_refuse_images_outside_unit_range(images):
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        psnr(images * 255, images)
    with pytest.raises(ValueError, match="paired"):
        ssim(images[:2], images[:3])


REFERENCES = ROOT.parent / "shared" / "references"


@pytest.mark.skipif(not (REFERENCES / "avd").is_dir(), reason="../shared/references/avd is not on this machine")
def test_avd_equals_its_authors_code_on_the_golden_cases():
    """64 cases (shipped images × same / noise / blur / shift / gray / uniform noise / ×0.9) with the value the AVD
    authors' own code (fl-eval-kit, AttackEvaluationMetrics().AVD(gt, rec)) returns — not our formula retyped."""
    import json

    from fl_sim.leakage.nearest import pairwise_avd

    golden = json.loads((REFERENCES / "avd" / "avd_golden.json").read_text())
    arrays = np.load(REFERENCES / "avd" / "avd_golden.npz")
    assert len(golden["cases"]) == 64
    for case in golden["cases"]:
        k = case["case"]
        gt, rec = (torch.from_numpy(arrays[f"{name}{k}"])[None] for name in ("gt", "rec"))
        assert float(avd(rec, gt)[0]) == pytest.approx(case["avd"], abs=1e-6), case
        assert float(pairwise_avd(rec, gt)[0, 0]) == pytest.approx(case["avd"], abs=1e-6), case


def test_avd_is_zero_on_identity_and_grows_with_noise_and_blur(images):
    import cv2

    assert np.allclose(avd(images, images), 0)
    gen = torch.Generator().manual_seed(1)
    noisy = [avd((images + s * torch.randn(images.shape, generator=gen)).clamp(0, 1), images).mean()
             for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(a < b for a, b in zip(noisy, noisy[1:]))

    def blur(k):
        out = [cv2.GaussianBlur(img.permute(1, 2, 0).numpy(), (0, 0), k) for img in images]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).clamp(0, 1)

    blurred = [avd(blur(k), images).mean() for k in (0.5, 1.0, 2.0)]
    assert 0 < blurred[0] < blurred[1] < blurred[2]


def test_lpips_reports_unavailable_without_the_alexnet_checkpoint(images, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MetricUnavailable, match=ALEXNET_CHECKPOINT):
        lpips_distance(images, images)
    rows = score(Reconstruction(images, None, "idlg"), images, torch.zeros(6), ["psnr", "lpips"])
    lpips_row = next(r for r in rows if r["metric"] == "lpips")
    assert np.isnan(lpips_row["value"]) and lpips_row["note"].startswith("unavailable: LPIPS needs")


def test_lpips_plumbing_with_a_checkpoint_on_disk(images, tmp_path, monkeypatch):
    """With *some* AlexNet checkpoint where torchvision keeps it, lpips runs (no download). The weights
    here are the test's own, so only the plumbing is checked, never a score."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(),
               tmp_path / "hub" / "checkpoints" / ALEXNET_CHECKPOINT)
    same = lpips_distance(images, images)
    other = lpips_distance(images.flip(0), images)
    assert same.shape == (6,) and np.allclose(same, 0, atol=1e-6) and (other > 0).all()
    assert lpips_distance(images[:, :1], images[:, :1]).shape == (6,)  # grayscale is repeated to 3 channels


def test_pairing_is_one_to_one(images):
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    ri, gi = pair(images[perm], images)
    assert sorted(gi.tolist()) == list(range(6))
    assert all(perm[r] == g for r, g in zip(ri, gi))
    rows = score(Reconstruction(images[perm], None, "idlg"), images, torch.zeros(6), ["psnr"])
    assert next(r for r in rows if r["metric"] == "psnr")["value"] == np.inf  # perfect once paired


def test_label_accuracy_is_a_multiset_overlap():
    assert label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([2, 1, 1])) == 1.0
    assert label_accuracy(torch.tensor([1, 1, 1]), torch.tensor([2, 1, 1])) == pytest.approx(2 / 3)
    assert label_accuracy(torch.tensor([3, 4]), torch.tensor([1, 2])) == 0.0


@pytest.mark.parametrize("side", [4, 5, 6, 7, 8])
def test_ssim_on_small_images_uses_the_largest_odd_window_that_fits(side):
    from fl_sim.leakage.nearest import pairwise_ssim

    gen = torch.Generator().manual_seed(side)
    a, b = torch.rand(2, 3, side, side, generator=gen), torch.rand(2, 3, side, side, generator=gen)
    window = min(7, side) - (1 - min(7, side) % 2)
    want = [structural_similarity(x.double().numpy(), y.double().numpy(), data_range=1.0, channel_axis=0,
                                  win_size=window) for x, y in zip(b, a, strict=True)]
    np.testing.assert_allclose(ssim(a, b), want)
    np.testing.assert_allclose(pairwise_ssim(a, b).diagonal().numpy(), want, rtol=1e-10)
