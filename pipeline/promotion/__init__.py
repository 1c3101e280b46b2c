"""Promotion: choose a front trial by policy (choose.py), register it with a model card (publish.py),
load a registered version back (load.py). Reads the study through pipeline.tracking.record."""
