"""Typed errors raised by the library.

Library code raises these and never prints; only ``cli.py`` turns them into one line on stderr
and an exit status.  ``exit_code`` follows the CLI's convention: 2 for bad arguments or inputs
(nothing was computed), 1 for failures during the run.
"""

from __future__ import annotations

import contextvars

# Messages name options as the CLI spells them (--style-weight).  The Python API's functions rewrite
# them into their own argument names (style_weight; config.in_api_terms) on the way out, unless the
# CLI, which sets this while it runs a command, is the caller.
CLI_CALLER: contextvars.ContextVar[bool] = contextvars.ContextVar("fastnst_cli_caller", default=False)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none), for one-line
    messages about errors raised by other libraries."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class FastNSTError(Exception):
    """Base class of every error fastnst raises on purpose."""

    exit_code = 1


class UsageError(FastNSTError):
    """Something the caller supplied is wrong; fixing the call fixes it."""

    exit_code = 2


class ConfigError(UsageError):
    """An option is out of range or inconsistent with another option."""


class ImageError(UsageError):
    """An input image cannot be read, or an output path cannot be written."""


class WeightsError(UsageError):
    """VGG19 weights are missing, unreadable, or do not fit the network."""


class DeviceError(UsageError):
    """The requested device does not exist on this machine."""


class RunError(FastNSTError):
    """The optimisation itself failed (non-finite loss, out of memory, write failure)."""


class NonFiniteLossError(RunError):
    """The loss became NaN or infinite; ``last_image`` holds the last image with a finite loss."""

    def __init__(self, message: str, last_image=None, last_iteration: int = 0):
        super().__init__(message)
        self.last_image = last_image
        self.last_iteration = last_iteration
