"""Leakage: where attack output meets the Secret — attack runners on observations and on the global model,
metrics and scoring, nearest neighbours, image grids and the Secret ledger (the only importer of
:mod:`fl_sim.leakage.secret`, an import contract checks it)."""
