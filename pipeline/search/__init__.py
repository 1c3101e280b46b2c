"""The search, split as Optuna splits study/trial/storages: records, storage (and resume), plans
(identity, duplicates), the runner (ask/tell), Ray execution and the worker. Imports nothing from
tracking, the review or promotion: recorders are handed to the runner (see observers.py)."""
