"""The base every stage builds on: registries, user errors, atomic writes, logging, CPU tuning, random streams.

Nothing here imports another part of fl-sim (an import contract checks it).
"""
