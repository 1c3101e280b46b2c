"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse

from rich.console import Console

console = Console(stderr=False)


def add_config_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, help="search_spaces/<preset>.yaml")


def load(args) :
    from pipeline.config import load_config

    return load_config(args.config)
