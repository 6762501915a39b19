"""One-line errors: an exception whose message is one line, a tool's one ``error:`` line."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def raises_one_line(exc: type[Exception], match: str, fn: Callable, *args, **kwargs) -> str:
    """``fn(*args, **kwargs)`` raises ``exc`` matching ``match``, in one line; the message."""
    with pytest.raises(exc, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def error_line(stderr: str, *names: object, alone: bool = False) -> str:
    """The one error line (``error: ...`` or ``prog.py: error: ...``) of a tool's standard error,
    holding each of ``names``; with ``alone``, the tool wrote nothing else there."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ") or ": error: " in line]
    assert len(errors) == 1, stderr
    assert not alone or len(lines) == 1, stderr
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]
