"""Printed hints run verbatim from a fresh shell whose PATH does not have the project's virtualenv."""

import os
import subprocess

from pipeline.hints import command


def test_a_printed_command_runs_in_a_fresh_shell_without_the_venv_on_path(tmp_path):
    hint = command("front", "--help")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # what `bash -l` in a new terminal has, roughly
    done = subprocess.run(["bash", "-c", hint], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--study" in done.stdout and "--config" in done.stdout


def test_arguments_are_quoted_for_the_shell(tmp_path):
    odd = tmp_path / "my configs" / "it's.yaml"
    hint = command("front", "--config", odd)
    done = subprocess.run(["bash", "-c", f"printf '%s\\n' {hint.split(' ', 1)[1]}"], capture_output=True, text=True)
    assert done.stdout.splitlines() == ["front", "--config", str(odd)]
    assert os.path.isabs(hint.split(" ")[0]) or hint.startswith(("'", '"'))
