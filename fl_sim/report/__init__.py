"""The leakage report: ``build_report(run_dirs)`` → report.html (self-contained) and report.md."""

from fl_sim.report.build import build_report, report_after_run
from fl_sim.report.tables import DEFAULT_RULE, RecoveryRule

__all__ = ["DEFAULT_RULE", "RecoveryRule", "build_report", "report_after_run"]
