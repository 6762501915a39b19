"""The one base of the errors a user can fix.

A :class:`UserError` is raised for bad input (a config key, a file, a flag, a device, data that
does not fit): its message is one line that names the thing and what is wrong with it. Tools turn
it into that line and exit status 2. Anything else is a bug and keeps its traceback.

Each concrete error also derives from the builtin it always was (``ValueError`` or
``RuntimeError``), so code that catches those keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix; the message is one line naming it."""
