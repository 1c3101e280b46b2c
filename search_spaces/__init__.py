"""Search-space definitions (how a config's ``search:`` section becomes Optuna
suggestions) and the bundled YAML presets (``search_spaces/*.yaml``)."""
