"""Loading a scenario: TOML text or file, ``--set section.key=value`` overrides, unknown keys with the closest match."""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fl_sim.base.errors import ScenarioError
from fl_sim.scenario.schema import Scenario, Section, one_line


def load_scenario(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Read, override (``section.key=value``) and validate a scenario; ScenarioError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"scenario file '{path}' does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ScenarioError(f"scenario file '{path}' is not UTF-8 text") from None
    return scenario_from_toml(text, overrides, name=path.stem, source=f"scenario file '{path}'")


def scenario_from_toml(text: str, overrides: list[str] | tuple[str, ...] = (), name: str = "scenario",
                       source: str = "the scenario") -> Scenario:
    """A scenario from TOML text (``name`` when it sets none); ScenarioError on any problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{source} is not valid TOML: {err}") from None
    raw.setdefault("name", name)
    return scenario_from_dict(raw, overrides)


def scenario_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    raw = dict(raw)
    for item in overrides:
        apply_override(raw, item)
    check_keys(raw, Scenario, "")
    try:
        return Scenario.model_validate(raw)
    except ValidationError as err:
        raise ScenarioError(one_line(err)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``a.b.c=value`` with value parsed as a TOML value (bare words are strings)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ScenarioError(f"--set expects section.key=value, got '{item}'")
    value = parse_value(text)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(parts[: i + 1]))
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise ScenarioError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
    if isinstance(node, list):
        raise ScenarioError(f"--set {key}: name a key inside a list entry, e.g. attacks.0.iterations")
    node[parts[-1]] = value


def parse_value(text: str) -> Any:
    """A command-line value as TOML reads it (``3``, ``0.1``, ``true``, ``[1, 2]``); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def _list_item(node: list[Any], part: str, where: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ScenarioError(f"--set: '{where}' needs an index in 0..{len(node) - 1}")
    return node[int(part)]


def check_keys(raw: dict[str, Any], model: type[BaseModel], prefix: str) -> None:
    """Unknown keys → ScenarioError naming the key, the closest match and the allowed keys."""
    fields = model.model_fields
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in fields:
            if model.model_config.get("extra") == "allow":
                continue
            allowed = sorted(fields)
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ScenarioError(f"unknown key '{where}'{suggestion}; allowed in "
                                f"{prefix.rstrip('.') or 'the top level'}: {', '.join(allowed)}")
        sub = _section_type(fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            check_keys(value, sub, f"{where}.")


def _section_type(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None
