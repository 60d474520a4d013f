"""Optional dependencies: each belongs to an extra of the package (pyproject.toml), and a missing
one is reported with the ``pip install`` that brings it.

The core (daemon, agent, recorder, simulator without plots) installs none of them, so modules
that need one import it through :func:`require` or inside :func:`importing`, never at the top of
a module that the core imports.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

DISTRIBUTION = "balloon-autoscaler"


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` to run."""

    def __init__(self, feature: str, package: str, extra: str, note: str = "") -> None:
        message = f"{feature} needs {package}: pip install '{DISTRIBUTION}[{extra}]'"
        super().__init__(f"{message} ({note})" if note else message)
        self.extra = extra


def require(module: str, extra: str, feature: str) -> None:
    """Import ``module`` or raise :class:`MissingExtra` saying that ``feature`` needs ``extra``."""
    with importing(module, extra, feature):
        importlib.import_module(module)


@contextlib.contextmanager
def importing(package: str, extra: str, feature: str, note: str = "") -> Iterator[None]:
    """Turn an :class:`ImportError` of the imports in the block into :class:`MissingExtra`.

    For module-level ``from package import …`` lines that keep their static types.
    """
    try:
        yield
    except MissingExtra:
        raise
    except ImportError as exc:
        raise MissingExtra(feature, package, extra, note) from exc
