"""Typed errors. Every message names the culprit (node, module or group) and says what to do."""

from __future__ import annotations


class GraphPruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class TraceError(GraphPruneError):
    """The model could not be traced into a graph, or its example inputs do not fit it."""


class InputError(GraphPruneError, ValueError):
    """An argument given by the user is invalid (wrong type, shape, dtype, device or range)."""


class UnsupportedOpError(GraphPruneError):
    """An operation cannot be handled where it was asked to be."""


class PlanError(GraphPruneError, ValueError):
    """A pruning plan does not fit the dependency graph it is applied to."""


class PlanMismatchError(PlanError):
    """Processes that must apply the same plan (``graphprune.distributed``) hold different ones."""


class RewriteError(GraphPruneError):
    """The slimmed graph could not be built."""


class SerializationError(GraphPruneError):
    """A slim model could not be saved or loaded."""


class LossError(GraphPruneError):
    """The loss is NaN or infinite, so no data-driven score can be computed."""


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside graphprune (and torch), so the
    warning names the user's line however deep in the pipeline it was raised."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.abspath(sys.modules["torch"].__file__)) if "torch" in sys.modules else None
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(package)
                                 or (torch_dir and frame.f_code.co_filename.startswith(torch_dir))
                                 or frame.f_code.co_filename.startswith("<")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
