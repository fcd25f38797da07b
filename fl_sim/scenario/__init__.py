"""Scenario: one experiment loaded from TOML, validated once at load; everything downstream trusts it."""

from fl_sim.scenario.loading import (
    apply_override,
    check_keys,
    load_scenario,
    parse_value,
    scenario_from_dict,
    scenario_from_toml,
)
from fl_sim.scenario.schema import (
    CompareConfig,
    ComponentSpec,
    DataConfig,
    FeaturesConfig,
    FederationConfig,
    ModelConfig,
    OutputConfig,
    Scenario,
    ThreatModelConfig,
    TrainingConfig,
    expand_grid,
    one_line,
)
from fl_sim.scenario.threat import Assumptions, assumptions

__all__ = ["Assumptions", "CompareConfig", "ComponentSpec", "DataConfig", "FeaturesConfig", "FederationConfig",
           "ModelConfig", "OutputConfig", "Scenario", "ThreatModelConfig", "TrainingConfig", "apply_override",
           "assumptions", "check_keys", "expand_grid", "load_scenario", "one_line", "parse_value", "scenario_from_dict",
           "scenario_from_toml"]
