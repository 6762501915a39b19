"""The ``tools/*.py`` scripts under test: in this process (no interpreter or torch start-up, seconds
per call) or in a subprocess of their own (the exit status and the streams a user sees)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO, TOOLS


def tool_path(name: str) -> Path:
    """``tools/<name>.py``."""
    return TOOLS / f"{name}.py"


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a fresh module (``<name>_tool``), so its ``main()`` runs in the test
    process."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", tool_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, *args: object, timeout: float = 120, env: dict[str, str] | None = None,
             cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python tools/<name>.py ARGS`` in a process of its own, from the repository root, its output
    captured as text; ``env`` is added to this process's environment."""
    return subprocess.run([sys.executable, str(tool_path(name)), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def exit_status(main: Callable[[list[str]], int], argv: Iterable[object]) -> int:
    """``main(argv)``'s exit status, whether it returns one or argparse refuses the arguments at parse
    time (``SystemExit``)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def tool_help(name: str, capsys: pytest.CaptureFixture) -> str:
    """``tools/<name>.py --help`` in this process: it exits with status 0; the help it printed."""
    with pytest.raises(SystemExit) as exit_:
        load_tool(name).main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out
