"""fl-sim: how much private data an honest-but-curious FL server can reconstruct.

One subpackage per stage of the data flow::

    scenario ──► federation ──► observation ──► attacks ──► leakage (score vs Secret) ──► store ──► report

``base`` holds what every stage uses; ``data``, ``models`` and ``training`` are the machine learning
the federation runs; ``deploy`` runs it on Flower's Deployment Engine.
"""
