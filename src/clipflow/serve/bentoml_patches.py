"""Everything clipflow takes from BentoML's private modules, for the one BentoML version it was written against.

BentoML's public API cannot choose how batches are dispatched, how requests are parsed, or tell
which store a process already uses, so clipflow reaches into `bentoml._internal` and
`_bentoml_impl` for those, here and nowhere else:

- `CorkDispatcher` and `NonBlockSema`, the bases of `clipflow.serve.dispatch.FillingDispatcher`,
  and the service app module's `CorkDispatcher` name that `install()` points at the dispatcher it is given;
- `JSONSerde` and `MultipartSerde`, the bases of the strict parsers in `clipflow.serve.http`, and
  the `ALL_SERDE` table that `install()` puts them in;
- the BentoML container's `bentoml_home`, the store this process uses (`store_home()`).

Private modules change without notice between releases, so `install()` and `store_home()` refuse
any version but `PINNED_VERSION` (pyproject.toml pins the same), rather than patching something
that is no longer there or no longer means the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path

from clipflow.errors import ClipflowError

# The version whose private modules this file was read against; pyproject.toml pins the same.
PINNED_VERSION = "1.4.40"
DISTRIBUTION = "bentoml"


def installed_version() -> str:
    """The installed BentoML version, as its distribution's metadata records it."""
    return version(DISTRIBUTION)


def check_version() -> None:
    """Raise ClipflowError unless the installed BentoML is the pinned one."""
    installed = installed_version()
    if installed != PINNED_VERSION:
        raise ClipflowError(
            f"clipflow patches BentoML {PINNED_VERSION}'s private modules, but BentoML {installed} is "
            f"installed: install bentoml=={PINNED_VERSION} (pyproject.toml pins it)"
        )


try:
    from _bentoml_impl import serde as _serde
    from _bentoml_impl.server import app as _service_app
    from bentoml._internal.configuration.containers import BentoMLContainer as _Container
    from bentoml._internal.marshal.dispatcher import CorkDispatcher, NonBlockSema
except ImportError as exc:  # another BentoML moved them: say which versions, not only what is missing
    check_version()
    raise ClipflowError(f"BentoML {installed_version()} lacks a private module clipflow uses: {exc}") from None

JSONSerde = _serde.JSONSerde
MultipartSerde = _serde.MultipartSerde

__all__ = ["CorkDispatcher", "JSONSerde", "MultipartSerde", "NonBlockSema", "install", "store_home"]


def install(dispatcher: Callable[..., CorkDispatcher], serdes: Iterable[type[JSONSerde | MultipartSerde]]) -> None:
    """Patch BentoML's service app to build `dispatcher` for every batchable endpoint and parse with `serdes`.

    clipflow passes `clipflow.serve.dispatch.FillingDispatcher` (BentoML's own runs one batch at
    a time) and `clipflow.serve.http`'s strict serdes; this module knows only where they go.
    Calling it again replaces what an earlier call put in place.

    Raises:
        ClipflowError: the installed BentoML is not `PINNED_VERSION`.
    """
    check_version()
    # The service app builds each batchable endpoint's dispatcher by this module-level name.
    _service_app.CorkDispatcher = dispatcher
    # BentoML looks its request parsers up by media type in this table on every request.
    for parser in serdes:
        _serde.ALL_SERDE[parser.media_type] = parser


def store_home() -> Path:
    """The BentoML store this process uses; BentoML fixes it from `$BENTOML_HOME` on first use.

    Raises:
        ClipflowError: the installed BentoML is not `PINNED_VERSION`.
    """
    check_version()
    return Path(_Container.bentoml_home.get()).resolve()
