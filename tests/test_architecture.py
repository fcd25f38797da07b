"""The boundaries are import contracts (pyproject.toml, [tool.importlinter]) checked by import-linter; these tests
run it on the repository and prove, on a copy with a deliberate violation, that each contract catches one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages under ``root`` (they shadow the installed ones)."""
    env = os.environ | {"PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_repository_keeps_every_contract():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture
def copy(tmp_path):
    for package in ("fl_sim", "attacks", "defenses"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def add_import(root: Path, module: str, imported: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\nimport {imported}  # noqa: E402, F401 - a deliberate violation\n")


@pytest.mark.parametrize("module, imported, contract, chain", [
    # the threat surface starts to import a module of the leakage stage: every attack now reaches the Secret
    ("fl_sim.observation.normalization", "fl_sim.leakage.single_client", "Attacks never reach the Secret",
     ["fl_sim.observation.normalization -> fl_sim.leakage.single_client", "-> fl_sim.leakage.secret"]),
    ("attacks.labels", "fl_sim.store", "Attacks import only the threat surface", ["attacks.labels -> fl_sim.store"]),
    ("fl_sim.federation.protocol", "fl_sim.leakage.secret", "Only the leakage package imports the Secret",
     ["fl_sim.federation.protocol -> fl_sim.leakage.secret"]),
    # the report reaches the federation through a module it uses, not by importing it itself
    ("fl_sim.leakage.grids", "fl_sim.federation.setup", "The report never imports the federation runtime",
     ["fl_sim.leakage.grids -> fl_sim.federation.setup"]),
    ("defenses.update", "fl_sim.store", "Defenses never import the store", ["defenses.update -> fl_sim.store"]),
    ("fl_sim.base.cpu", "fl_sim.observation", "The base imports nothing else",
     ["fl_sim.base.cpu -> fl_sim.observation"]),
    ("fl_sim.observation.features", "fl_sim.data.images", "The threat surface imports only the base",
     ["fl_sim.observation.features -> fl_sim.data.images"]),
])
def test_a_deliberate_violation_breaks_its_contract(copy, module, imported, contract, chain):
    result = lint(copy)
    assert result.returncode == 0, result.stdout  # the copy is clean before the change
    add_import(copy, module, imported)
    result = lint(copy)
    assert result.returncode != 0
    broken = [line for line in result.stdout.replace("\n(", " (").splitlines() if line.endswith("BROKEN")
              or "BROKEN (" in line]
    assert any(line.startswith(contract) for line in broken), result.stdout
    for link in chain:
        assert link in result.stdout, result.stdout


def test_the_lower_layers_contracts_name_every_part_of_fl_sim():
    """The base and the threat surface list what they may not import; a new part of fl-sim must be listed."""
    import tomllib

    contracts = {c["name"]: c for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
                 ["contracts"]}
    parts = {f"fl_sim.{p.stem if p.is_file() else p.name}" for p in (ROOT / "fl_sim").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    for name, allowed in (("The base imports nothing else of fl-sim", {"fl_sim.base"}),
                          ("The threat surface imports only the base", {"fl_sim.base", "fl_sim.observation"})):
        assert set(contracts[name]["forbidden_modules"]) == (parts - allowed) | {"attacks", "defenses"}, name


CLIENT_NEVER_IMPORTS = ("scipy", "skimage", "cv2", "matplotlib", "lpips", "fl_sim.report", "fl_sim.leakage.scoring",
                        "fl_sim.store")


def test_a_clientapp_process_imports_no_scoring_plotting_or_report_module():
    """A deployment starts one ClientApp process per message: importing the app and validating the scenario it is
    sent (every attack, metric and defense name checked) must not pull in what only the server uses."""
    code = f"""
import sys
import fl_sim.federation.client
from fl_sim.scenario import load_scenario
for name in ("quickstart", "afgi_vs_ggi_resnet", "tldr_mnist", "feature_prune_sweep", "dp_reconstruction_bound"):
    load_scenario(__import__("pathlib").Path("scenarios") / (name + ".toml"))
never = {CLIENT_NEVER_IMPORTS!r}
loaded = [m for m in sys.modules if m.split(".")[0] in never or m.startswith(never)]
print(sorted({{m.split(".")[0] if not m.startswith("fl_sim") else m for m in loaded}}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
