"""Random streams: one named table (fl_sim.base.streams), no two draws of a run from the same seed sequence."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

import fl_sim.base.streams as streams
from fl_sim.base.streams import STREAMS, Stream, numpy_global
from fl_sim.store import load_observations
from tests.conftest import ROOT, run_inprocess, tiny


def run_draws(clients: int = 10, rounds: int = 6, restarts: int = 3) -> dict[str, dict[str, object]]:
    """engine → {draw: its seed sequence's state (numpy) or its integer seed}, for every draw a run of
    ``clients`` × ``rounds`` makes, all its seeds 0 (the defaults)."""
    coords = {"client": [*range(clients), -1], "round": list(range(1, rounds + 1)), "restart": list(range(restarts))}
    draws: dict[str, dict[str, object]] = {"numpy": {}, "seed": {}}
    for stream in STREAMS:
        for values in itertools.product(*(coords[c] for c in stream.coordinates)):
            name = f"{stream.name}{values}"
            draws[stream.engine][name] = (tuple(np.random.SeedSequence(stream.key(0, *values)).generate_state(4))
                                          if stream.engine == "numpy" else stream.seed(0, *values))
    return draws


def test_no_two_streams_of_a_run_share_a_seed_sequence():
    draws = run_draws()
    for engine, found in draws.items():
        assert len(set(found.values())) == len(found), engine
    assert len(draws["numpy"]) > 50 and len(draws["seed"]) > 300
    # the collision the table removed: client sampling in round r was keyed [seed, 4, r], and so was client 4's
    # training seed in round r ([seed, client, round])
    sampling = [streams.CLIENT_SAMPLING.rng(0, r).integers(2**32) for r in range(1, 7)]
    training = [streams.CLIENT_TRAINING.seed(0, 4, r) for r in range(1, 7)]
    assert not set(sampling) & set(training)


def test_published_splits_and_models_keep_their_keys():
    assert streams.TEST_SPLIT.rng(3).permutation(50).tolist() == np.random.default_rng(3).permutation(50).tolist()
    assert streams.MODEL_INIT.seed(3) == 3
    assert streams.BATCHES.rng(0, 2, 5).random() == np.random.default_rng([0, 3, 2, 5]).random()


def test_the_table_holds_every_stream_with_its_own_tag():
    defined = [v for v in vars(streams).values() if isinstance(v, Stream)]
    tags = [s.tag for s in STREAMS if s.tag is not None]
    assert set(defined) == set(STREAMS) and len(set(tags)) == len(tags) and 0 not in tags  # [seed] ≡ [seed, 0]
    assert {s.name: s.engine for s in STREAMS if s.tag is None} == {"test split": "numpy", "model init": "seed"}
    with pytest.raises(TypeError, match="keyed by"):
        streams.BATCHES.seed(0, 1)


def test_product_code_draws_randomness_only_through_the_table():
    for package in ("fl_sim", "attacks", "defenses"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "streams.py":
                continue
            text = path.read_text()
            assert not re.search(r"default_rng\(|SeedSequence\(|np\.random\.seed\(", text), path
            for rest in re.findall(r"manual_seed\((.*)", text):  # a stream's seed, or a parameter named seed
                assert ".seed(" in rest or rest.startswith("seed)"), (path, rest)


def test_numpy_global_seeds_the_block_and_restores_the_state():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    with numpy_global(7):
        inside = np.random.rand()
    assert np.random.rand() == expected
    with numpy_global(7):
        assert np.random.rand() == inside


def test_secure_aggregation_runs_reproduce():
    """SecAgg+'s stochastic quantisation draws from NumPy's global RNG: seeded per client and round, a rerun
    gives the same aggregate (it did not before the stream table)."""
    raw = tiny(federation={"num_clients": 4, "clients_per_round": 3, "rounds": 1}, defenses=[{"name": "secagg"}])

    def aggregate(tmp) -> dict[str, torch.Tensor]:
        store, _ = run_inprocess(tmp, raw)
        [obs] = list(load_observations(store.root))
        return obs.update

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        first, second = aggregate(Path(a)), aggregate(Path(b))
    assert all(torch.equal(first[k], second[k]) for k in first)
