"""Analyses that are not sweeps of runs.

``dataset_level``: the MMA paper's dataset-level recognition accuracy of CLIP's text and
image features layer by layer (its Figure 1), as ``python run.py analyze dataset-level``;
``layers`` extracts the per-layer features, ``report`` writes the CSV, table and figure.
"""
