"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse

from rich.console import Console

console = Console(stderr=False)


def add_config_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config`` and ``--set KEY=VALUE`` overrides: every subcommand reads the config the same way."""
    p.add_argument("--config", "-c", required=required, help="search_spaces/<preset>.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set measure.backend=ort-cpu (repeatable; VALUE is YAML)")


def parse_overrides(items: list[str]) -> dict:
    """``["measure.runs=10", "search.formats=[int8, int4]"]`` -> ``{"measure.runs": 10, ...}`` (values are YAML)."""
    import yaml

    from pipeline.config import ConfigError

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: expected KEY=VALUE (e.g. measure.runs=10), got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load(args):
    from pipeline.config import load_config

    return load_config(args.config, overrides=parse_overrides(getattr(args, "set", [])))
