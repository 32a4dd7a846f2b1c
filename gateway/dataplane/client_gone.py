"""The error a handler sees when its client's connection closes under it.

Its own module, outside the modules the compiled build turns into C
(``[tool.hatch.build.targets.wheel.hooks.mypyc]`` in pyproject.toml): it is a
``ConnectionError``, so that code catching ``OSError`` or
``ConnectionError`` around a write catches it too, and mypyc cannot compile a
subclass of that built-in type. A plain Python class here serves the
compiled and the pure-Python build alike.
"""

from __future__ import annotations


class ClientGone(ConnectionError):
    """The client's connection closed while its request was read or its response written."""
