"""The scenario schema: one experiment as validated sections; everything downstream trusts it."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fl_sim.base.errors import UserInputError
from fl_sim.base.registry import Registry, UnknownNameError


def _registry(kind: str) -> Registry[Any]:
    """The registry whose names are the valid values of ``kind`` (imported when a scenario is validated)."""
    from attacks import ATTACKS
    from defenses import DEFENSES
    from fl_sim.data.partition import PARTITIONS
    from fl_sim.data.sources import DATASETS
    from fl_sim.engines import ENGINES
    from fl_sim.leakage.metrics import METRICS
    from fl_sim.models import MODELS
    from fl_sim.observation.capabilities import CAPABILITIES

    return {"attack": ATTACKS, "capability": CAPABILITIES, "defense": DEFENSES, "partition": PARTITIONS,
            "dataset": DATASETS, "engine": ENGINES, "metric": METRICS, "model": MODELS}[kind]


def registered(kind: str) -> AfterValidator:
    """A field validator: the value must be a name in ``kind``'s registry."""
    return AfterValidator(lambda name: _known_name(_registry(kind), name))


def _known_name(registry: Registry[Any], name: str) -> str:
    try:
        registry.get(name)
    except UnknownNameError as err:
        raise ValueError(str(err)) from None
    return name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FederationConfig(Section):
    num_clients: int = Field(4, ge=1, le=100_000, description="clients in the federation (one shard each)")
    clients_per_round: int = Field(2, ge=1, description="clients sampled each round")
    rounds: int = Field(3, ge=1, le=100_000)
    client_evaluation: bool = Field(
        True, description="each round, an evaluate message to the sampled clients: Flower's federated evaluation of "
                          "the new global model on their held-out data (metrics.csv eval_loss / eval_acc; needs "
                          "data.holdout_fraction > 0); false skips it, one ClientApp call per client and round fewer "
                          "(a process each in a deployment); the server's test-set evaluation runs either way, and "
                          "SecAgg+ runs never evaluate on clients")

    @model_validator(mode="after")
    def _fits(self) -> FederationConfig:
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"federation.clients_per_round = {self.clients_per_round} exceeds "
                             f"federation.num_clients = {self.num_clients}; allowed: 1..{self.num_clients}")
        return self


class TrainingConfig(Section):
    protocol: Literal["fedsgd", "fedavg"] = Field(
        "fedsgd", description="fedsgd: one step, the client sends its gradient; fedavg: local steps, sends weights")
    batch_size: int = Field(1, ge=1)
    lr: float = Field(0.1, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    local_steps: int = Field(1, ge=1, description="fedavg: local optimizer steps per round")
    local_epochs: int = Field(0, ge=0, description="fedavg: if > 0, epochs over the shard instead of local_steps")
    batchnorm: Literal["train", "eval"] = Field(
        "train", description="BatchNorm during local training: batch statistics (train) or running statistics (eval)")

    @model_validator(mode="after")
    def _protocol(self) -> TrainingConfig:
        if self.protocol == "fedsgd" and (self.local_steps != 1 or self.local_epochs != 0):
            raise ValueError("training.protocol = 'fedsgd' takes exactly one step: set training.local_steps = 1 and "
                             "training.local_epochs = 0, or use training.protocol = 'fedavg'")
        if self.protocol == "fedsgd" and (self.optimizer != "sgd" or self.momentum or self.weight_decay):
            raise ValueError("training.protocol = 'fedsgd' sends the plain gradient: training.optimizer must be 'sgd' "
                             "without momentum or weight_decay")
        return self


class DataConfig(Section):
    dataset: Annotated[str, registered("dataset")] = "mnist5k"
    partition: Annotated[str, registered("partition")] = Field("iid", description="how shards are drawn")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition = 'dirichlet')")
    seed: int = Field(0, ge=0, description="partition / split seed")
    root: str | None = Field(None, description="folder of torchvision / scikit-learn datasets")
    path: str | None = Field(None, description="image folder for dataset = 'folder'")
    download: bool = False
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out test share for datasets without a test split")
    holdout_fraction: float = Field(0.2, ge=0, lt=1, description="share of each client's shard kept for evaluation")
    image_size: int | None = Field(None, ge=8, le=1024)
    channels: Literal[1, 3] | None = None
    max_samples: int | None = Field(None, ge=1, description="use a seeded subset of the training pool")
    min_faces_per_person: int = Field(20, ge=1, description="dataset = 'lfw'")
    normalize: bool = Field(True, description="feed the model (x - mean) / std; scores always use [0, 1] images")

class ModelConfig(Section):
    name: Annotated[str, registered("model")] = "lenet"
    pretrained: bool = Field(False, description="torchvision ImageNet weights (must be on disk)")
    weights: str | None = Field(None, description="state-dict file (.pt / .safetensors) to start from")
    stem: Literal["auto", "cifar", "imagenet"] = "auto"

    @field_validator("weights")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(os.path.expanduser(v)).is_file():
            raise ValueError(f"file '{v}' does not exist")
        return v


class FeaturesConfig(Section):
    """Clients that also share their batch's penultimate-layer features (inference offload, split training)."""

    share: bool = Field(False, description="each client sends the pruned features of its (first) batch")
    prune: float = Field(0.0, ge=0, le=0.9, description="fraction of neurons with the lowest activation removed")


class ThreatModelConfig(Section):
    record: Literal["attacked", "all"] = Field(
        "attacked", description="which clients' observations the run folder keeps: the attacked ones, or all")
    rounds: list[int] | Literal["all"] = "all"
    clients: list[int] | Literal["all"] = "all"
    baseline: bool = Field(True, description="also run every observation attack on an uninformative observation "
                           "(an unrelated batch's update) and score it against the real batch: what the priors alone "
                           "reach (doubles the attack time)")
    knows: list[str] | None = Field(
        None, description="capabilities the server has (fl_sim.observation.capabilities); default: what a Flower "
                          "server receives — update, global_model, protocol, num_examples, bn_buffers, and "
                          "shared_features when clients share them")

    @field_validator("knows")
    @classmethod
    def _capabilities(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            _known_name(_registry("capability"), name)
        return v


class ComponentSpec(BaseModel):
    """An attack or defense by registered name, plus preset overrides checked by the component."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    name: str
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._()+=-]*$", max_length=80,
                              description="what results and reports call it (default: name); tells two settings of "
                                          "one attack apart (letters, digits, spaces and ._()+=-)")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def shown(self) -> str:
        """The name results and reports use."""
        return self.label or self.name


class SimulationConfig(Section):
    """Flower's Simulation Engine (``engine = "simulation"``): the Ray cluster and each ClientApp actor's share."""

    ray_address: str = Field("", description="a running Ray cluster to join ('auto', 'HOST:6379' or "
                                             "'ray://HOST:10001'); empty: start a local one with every CPU")
    client_cpus: float = Field(1.0, gt=0, description="CPUs each ClientApp actor reserves")
    client_gpus: float = Field(0.0, ge=0, description="GPUs each ClientApp actor reserves (0: Ray hides every GPU "
                                                      "from the clients; e.g. 0.25 puts four clients on one GPU)")


class OutputConfig(Section):
    dir: str = "runs"


class CompareConfig(Section):
    """``fl-sim compare``: the same federation and attacks under each defense setting."""

    baseline: bool = Field(True, description="also run without any defense (the utility and leakage reference)")
    defenses: list[ComponentSpec] = Field(
        [], description="defenses to compare; a list-valued parameter is a grid, e.g. {name = 'dp', sigma = [0, 0.1]}")
    metric: Annotated[str, registered("metric")] = Field(
        "ssim", description="the leakage axis of the privacy–utility plot (any score)")
    grid: dict[str, list[Any]] = Field(
        {}, description="scenario keys to sweep, crossed with each other and the defense settings, e.g. "
                        "{'training.batch_size' = [1, 4, 16]}")

    @field_validator("grid")
    @classmethod
    def _grid_keys(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if key.split(".")[0] in GRID_EXCLUDED:
                raise ValueError(f"scenario key 'compare.grid.\"{key}\"': cannot be swept; allowed: keys of "
                                 f"{', '.join(SWEEPABLE)} (defenses: "
                                 "compare.defenses)")
            if not values:
                raise ValueError(f"scenario key 'compare.grid.\"{key}\"': give at least one value")
            _sweepable_key(key)
        return v

class Scenario(Section):
    name: str = "scenario"
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Annotated[str, registered("engine")] = "inprocess"
    simulation: SimulationConfig = SimulationConfig()
    federation: FederationConfig = FederationConfig()
    training: TrainingConfig = TrainingConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    features: FeaturesConfig = FeaturesConfig()
    threat_model: ThreatModelConfig = ThreatModelConfig()
    attacks: list[ComponentSpec] = []
    defenses: list[ComponentSpec] = []
    metrics: list[str] = Field(default_factory=lambda: list(_image_metrics()), description="image metrics to score")
    output: OutputConfig = OutputConfig()
    compare: CompareConfig = CompareConfig()

    @field_validator("attacks", "defenses")
    @classmethod
    def _registered(cls, v: list[ComponentSpec], info: ValidationInfo) -> list[ComponentSpec]:
        for item in v:
            _known_name(_registry(info.field_name.removesuffix("s")), item.name)
        return v

    @field_validator("metrics")
    @classmethod
    def _image_metric(cls, v: list[str]) -> list[str]:
        allowed = list(_image_metrics())  # label accuracy is always scored
        for name in v:
            if name not in allowed:
                raise ValueError(str(UnknownNameError("metric", name, allowed)))
        return v

    @model_validator(mode="after")
    def _threat_model(self) -> Scenario:
        tm, fed = self.threat_model, self.federation
        limits = (("rounds", tm.rounds, 1, fed.rounds), ("clients", tm.clients, 0, fed.num_clients - 1))
        for key, values, lo, hi in limits:
            bad = [x for x in values if not lo <= x <= hi] if values != "all" else []
            if bad:
                raise ValueError(f"threat_model.{key} has {bad[0]}; allowed: 'all' or values in {lo}..{hi}")
        return self

    @model_validator(mode="after")
    def _attack_params(self) -> Scenario:
        """Preset overrides are checked by the attack; incompatibilities are stated up front."""
        from attacks import build_attack

        shown = [spec.shown for spec in self.attacks]
        for i, spec in enumerate(self.attacks):
            if shown.index(spec.shown) != i:
                raise ValueError(f"scenario key 'attacks.{i}' ({spec.name}): '{spec.shown}' names attacks."
                                 f"{shown.index(spec.shown)} too; give one of them a distinct label")
            try:
                attack = build_attack(spec.name, spec.params)
            except ValidationError as err:
                raise ValueError(one_line(err, prefix=f"attacks.{i}.")) from None
            why = self.refusal(attack)
            if why:
                raise ValueError(f"scenario key 'attacks.{i}' ({spec.name}): {why}")
        return self

    @property
    def setting(self) -> Any:
        """What of the scenario decides an attack's capabilities (attacks.base.Setting)."""
        from attacks.base import Setting

        t = self.training
        return Setting(t.protocol, self.features.share, t.optimizer, t.batchnorm, t.local_steps, t.local_epochs,
                       self.device)

    @property
    def granted(self) -> frozenset[Any]:
        """The capabilities the server has: ``threat_model.knows``, or what a Flower server receives."""
        from fl_sim.observation.capabilities import Capability, flower_server

        knows = self.threat_model.knows
        return flower_server(self.features.share) if knows is None else frozenset(map(Capability, knows))

    @model_validator(mode="after")
    def _defense_params(self) -> Scenario:
        for i, spec in enumerate(self.defenses):
            _check_defense(spec, f"defenses.{i}", self.training.protocol)
            if why := _unmet_requirement(spec.name, self):
                raise ValueError(f"scenario key 'defenses.{i}' ({spec.name}): {why}")
        for i, spec in enumerate(self.compare.defenses):
            try:
                _known_name(_registry("defense"), spec.name)
            except ValueError as err:
                raise ValueError(f"scenario key 'compare.defenses.{i}.name': {err}") from None
            if why := _unmet_requirement(spec.name, self):
                raise ValueError(f"scenario key 'compare.defenses.{i}' ({spec.name}): {why}")
            for setting in expand_grid(spec):
                _check_defense(setting, f"compare.defenses.{i}", self.training.protocol)
        return self

    def refusal(self, attack: Any) -> str | None:
        """Why ``attack`` cannot run in this scenario: a capability the threat model does not grant, or what it
        cannot work with (it is asked about the model's structure); None if it can."""
        from attacks import ObservationAttack
        from fl_sim.models import structure

        missing = sorted(attack.capabilities(self.setting) - self.granted)
        if missing:
            grant = "threat_model.knows" if self.threat_model.knows is not None else "the default threat model"
            return (f"needs capabilit{'ies' if len(missing) > 1 else 'y'} {', '.join(repr(str(m)) for m in missing)}, "
                    f"which {grant} does not grant; granted: {', '.join(sorted(self.granted))}")
        if not isinstance(attack, ObservationAttack):
            return None
        return attack.incompatibility(structure(self.model.name), self.setting)

    def attacked_round(self, server_round: int) -> bool:
        return self.threat_model.rounds == "all" or server_round in self.threat_model.rounds

    def attacked(self, server_round: int, client: int) -> bool:
        """Client -1 is a secure aggregate of the whole round: attacked in every attacked round."""
        tm = self.threat_model
        return self.attacked_round(server_round) and (tm.clients == "all" or client in tm.clients or client == -1)

    def to_toml_dict(self) -> dict[str, Any]:
        """The resolved scenario as plain data (None values dropped: TOML has no null)."""
        return _drop_none(self.model_dump(mode="json"))


SWEEPABLE = ("seed", "device", "engine", "simulation", "federation", "training", "data", "model", "features",
             "threat_model")
GRID_EXCLUDED = ("name", "output", "compare", "attacks", "defenses", "metrics")


def _sweepable_key(key: str) -> None:
    """A dotted scenario key that names one value (ValueError naming the closest key otherwise)."""
    from fl_sim.scenario.loading import check_keys

    parts = key.split(".")
    nested: dict[str, Any] = {}
    node = nested
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = None
    try:
        check_keys(nested, Scenario, "")  # unknown names, with the closest one, exactly as in a scenario file
    except UserInputError as err:
        raise ValueError(f"scenario key 'compare.grid.\"{key}\"': {err}") from None
    model: type[BaseModel] = Scenario
    for i, part in enumerate(parts):
        annotation = model.model_fields[part].annotation
        section = annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None
        where = ".".join(parts[: i + 1])
        if i < len(parts) - 1 and section is None:
            raise ValueError(f"scenario key 'compare.grid.\"{key}\"': '{where}' is a value, not a section")
        if i == len(parts) - 1 and section is not None:
            raise ValueError(f"scenario key 'compare.grid.\"{key}\"': '{where}' is a section; name a key in it")
        model = section or model


def _image_metrics() -> tuple[str, ...]:
    from fl_sim.leakage.metrics import IMAGE_METRICS

    return IMAGE_METRICS


def _unmet_requirement(defense: str, scenario: Scenario) -> str | None:
    """What the defense needs of the scenario and does not get (its registry entry says), or None."""
    requires = _registry("defense").get(defense).requires
    return requires(scenario) if requires is not None else None


def _check_defense(spec: ComponentSpec, where: str, protocol: str) -> None:
    """Unknown parameters (with the closest one), bad values and an unsupported protocol, as one line."""
    from defenses import build_defense

    kind = _registry("defense").get(spec.name)
    if protocol not in kind.protocols:
        raise ValueError(f"scenario key '{where}' ({spec.name}): defends only training.protocol = "
                         f"{' or '.join(repr(p) for p in kind.protocols)}, the scenario uses '{protocol}'")
    allowed = kind.params.model_fields
    for key in spec.params:
        if key not in allowed:
            hint = difflib.get_close_matches(key, list(allowed), n=1)
            raise ValueError(f"scenario key '{where}.{key}': unknown parameter of defense '{spec.name}'"
                             + (f" (did you mean '{hint[0]}'?)" if hint else "") + f"; allowed: {', '.join(allowed)}")
    try:
        build_defense(spec.name, spec.params)
    except ValidationError as err:
        raise ValueError(one_line(err, prefix=f"{where}.")) from None


def expand_grid(spec: ComponentSpec) -> list[ComponentSpec]:
    """``{name = "dp", sigma = [0, 0.1], clip = 1}`` → one spec per combination of the list-valued parameters."""
    import itertools

    keys = [k for k, v in spec.params.items() if isinstance(v, list)]
    if not keys:
        return [spec]
    combos = itertools.product(*(spec.params[k] for k in keys))
    return [ComponentSpec(name=spec.name, **(spec.params | dict(zip(keys, values, strict=True)))) for values in combos]


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def one_line(err: ValidationError, prefix: str = "") -> str:
    e = err.errors(include_url=False)[0]
    loc = prefix + ".".join(str(p) for p in e["loc"] if not str(p).startswith(("literal[", "list[", "function-")))
    msg = e["msg"].removeprefix("Value error, ")
    if msg.startswith("scenario key "):
        return msg
    if e["type"] == "literal_error":
        msg = f"got {e['input']!r}; allowed: {e['ctx']['expected']}"
    elif "input" in e and e["type"] not in ("value_error", "assertion_error", "missing"):
        msg = f"{msg} (got {e['input']!r})"
    return f"scenario key '{loc}': {msg}" if loc else f"scenario: {msg}"
