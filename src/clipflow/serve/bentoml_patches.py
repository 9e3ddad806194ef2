"""Everything clipflow takes from BentoML's private modules, for the one BentoML version it was written against.

BentoML's public API cannot choose how batches are dispatched, how requests are parsed, or tell
which store a process already uses, so clipflow reaches into `bentoml._internal` and
`_bentoml_impl` for those, here and nowhere else:

- `CorkDispatcher` and `NonBlockSema`, the bases of `clipflow.serve.dispatch.FillingDispatcher`,
  and the service app module's `CorkDispatcher` name that `install()` points at it;
- `JSONSerde` and `MultipartSerde`, the bases of the strict parsers in `clipflow.serve.http`, and
  the `ALL_SERDE` table that `install()` puts them in;
- the BentoML container's `bentoml_home`, the store this process uses (`store_home()`).

Private modules change without notice between releases, so `install()` and `store_home()` refuse
any version but `PINNED_VERSION` (pyproject.toml pins the same), rather than patching something
that is no longer there or no longer means the same.
"""

from __future__ import annotations

import functools
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


def install(lanes: int) -> None:
    """Patch BentoML for the clipflow service: the filling batch dispatcher and the strict request parsers.

    Makes the service app build a `FillingDispatcher` with `lanes` lanes for every batchable
    endpoint (BentoML's own runs one batch at a time, see `clipflow.serve.dispatch`), and parse
    JSON and multipart requests with `clipflow.serve.http`'s strict serdes. Calling it again
    replaces the dispatcher's lane count and is otherwise harmless.

    Raises:
        ClipflowError: the installed BentoML is not `PINNED_VERSION`.
    """
    check_version()
    from clipflow.serve.dispatch import FillingDispatcher
    from clipflow.serve.http import StrictJSONSerde, StrictMultipartSerde

    # The service app builds each batchable endpoint's dispatcher by this module-level name.
    _service_app.CorkDispatcher = functools.partial(FillingDispatcher, lanes=lanes)
    # BentoML looks its request parsers up by media type in this table on every request.
    _serde.ALL_SERDE[StrictJSONSerde.media_type] = StrictJSONSerde
    _serde.ALL_SERDE[StrictMultipartSerde.media_type] = StrictMultipartSerde


def store_home() -> Path:
    """The BentoML store this process uses; BentoML fixes it from `$BENTOML_HOME` on first use.

    Raises:
        ClipflowError: the installed BentoML is not `PINNED_VERSION`.
    """
    check_version()
    return Path(_Container.bentoml_home.get()).resolve()
