import pytest
import torch
from torch import nn

from fl_sim.base.errors import DataUnavailableError
from fl_sim.models import MODELS, build_model
from fl_sim.scenario import ModelConfig


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_models_map_images_to_logits(name, shape):
    model = build_model(ModelConfig(name=name), 10, shape, seed=0).eval()
    assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_lenet_is_dlgs():
    model = build_model(ModelConfig(name="lenet"), 10, (3, 32, 32), seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(12, (5, 5), (2, 2)), (12, (5, 5), (2, 2)),
                                                                        (12, (5, 5), (1, 1))]
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 3
    assert model.fc[0].in_features == 768  # 12 × 8 × 8 for 32 px, as in DLG
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float(weights.abs().max()) <= 0.5  # DLG's U(-0.5, 0.5) initialisation


def test_seeded_init_is_reproducible():
    a = build_model(ModelConfig(name="resnet18"), 10, (3, 32, 32), seed=1).state_dict()
    b = build_model(ModelConfig(name="resnet18"), 10, (3, 32, 32), seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resnet_cifar_stem_for_small_inputs():
    small = build_model(ModelConfig(name="resnet18"), 10, (3, 32, 32), seed=0)
    large = build_model(ModelConfig(name="resnet18"), 10, (3, 224, 224), seed=0)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)


def test_pretrained_weights_absent_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(DataUnavailableError, match="resnet18-f37072fd.pth"):
        build_model(ModelConfig(name="resnet18", pretrained=True), 10, (3, 224, 224), seed=0)


def test_pretrained_weights_on_disk_are_loaded(tmp_path, monkeypatch):
    """Plumbing check with a checkpoint the test writes where torchvision keeps its hub files."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_model(ModelConfig(name="resnet18", pretrained=True), 10, (3, 224, 224), seed=0)
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert model.fc.out_features == 10  # the 1000-class head is not forced onto a 10-class task


def test_weights_file(tmp_path):
    source = build_model(ModelConfig(name="lenet"), 10, (1, 28, 28), seed=5)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_model(ModelConfig(name="lenet", weights=str(tmp_path / "w.pt")), 10, (1, 28, 28), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    with pytest.raises(Exception, match="does not exist"):
        ModelConfig(name="lenet", weights=str(tmp_path / "missing.pt"))
