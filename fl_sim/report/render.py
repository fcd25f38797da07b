"""Jinja2 rendering of the report context into HTML (autoescaped, images inline) and Markdown."""

from __future__ import annotations

from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined


def _rows(frame: pd.DataFrame) -> dict[str, Any]:
    """{'columns': [...], 'rows': [[...], ...]} for the HTML table macro."""
    return {"columns": list(frame.columns), "rows": frame.astype(object).where(frame.notna(), "–").values.tolist()}


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True) if not frame.empty else "(none)"


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("fl_sim.report", "templates"), undefined=StrictUndefined,
                      autoescape=lambda name: bool(name) and ".html" in name, trim_blocks=True, lstrip_blocks=True,
                      keep_trailing_newline=True)
    env.filters["rows"] = _rows
    env.filters["markdown"] = _markdown
    return env


def render_html(context: dict[str, Any], template: str = "report.html.j2") -> str:
    return _environment().get_template(template).render(**context)


def render_markdown(context: dict[str, Any], template: str = "report.md.j2") -> str:
    return _environment().get_template(template).render(**context)
