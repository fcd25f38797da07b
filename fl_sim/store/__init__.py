"""The run folder: RunLayout owns its names, RunStore writes it round by round, observations load back from it."""

from fl_sim.store.layout import LAYOUT_VERSION, ComparisonLayout, ReportFiles, RunLayout
from fl_sim.store.observations import load_observations
from fl_sim.store.run_store import INVERSION_COLUMNS, METRIC_COLUMNS, PRIVACY_COLUMNS, RESULT_COLUMNS, RunStore

__all__ = ["INVERSION_COLUMNS", "LAYOUT_VERSION", "METRIC_COLUMNS", "PRIVACY_COLUMNS", "RESULT_COLUMNS",
           "ComparisonLayout", "ReportFiles", "RunLayout", "RunStore", "load_observations"]
