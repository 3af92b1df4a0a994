"""Hyperparameter sweeps (`fedsim tune SWEEP.yaml`): `sweep` parses, validates and expands a sweep
file (`tuning/*.yaml`) into trial configs before Ray starts; `tune` runs the trials as whole
simulations under Ray Tune, each in its own placement group, with MLflow parent and nested runs and
`--resume`; `report` turns the finished trials into the results table, CSV and plots."""
