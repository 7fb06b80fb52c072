"""State a site keeps across rounds AND across runs, at the site: its DP-SGD accountant today.

Flower's per-run node state (``context.state``) starts empty in every run, and a resumed
run is a new Flower run; state that must outlive an interruption therefore lives in a
directory at the site::

    <root>/<run key>/<site key>/<name>.json

- ``root`` is the node-config key ``site-state-dir`` (a SuperNode's
  ``--node-config "site-state-dir='/var/lib/flower-llm'"``), else ``site-state`` in the
  project's cache, ``$FLOWER_LLM_CACHE`` or ``~/.cache/flower-llm``;
- the run key is ``output.run-name`` (what a resume names; see :func:`run_key`), or
  ``run-<Flower run id>`` for an unnamed run, which cannot be resumed anyway;
- the site key names the site's data (:meth:`flower_llm.client.SiteIdentity.key`), so the
  simulated sites that share one machine never share a file.

Every file is one JSON document with a format tag and version, the run id that wrote it and
the entry's data; it is written to a uniquely named temporary file in the same directory,
flushed to disk and renamed over the old one, so a crash leaves the old or the new file,
never half of one, and two writers never share a temporary file. A file that cannot be read
back raises :class:`SiteStateError` naming it. The store knows nothing about privacy: any
JSON-able mapping can be kept, and :meth:`SiteStateStore.write_bytes` holds other formats
(e.g. an adapter's safetensors) with the same atomic write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flower_llm.embedded import default_cache_root

#: Node-config key of the directory that holds the state of the sites on this machine.
SITE_STATE_DIR_KEY = "site-state-dir"

_FORMAT = "flower-llm/site-state"
_VERSION = 1
_KEYS = frozenset({"format", "version", "run", "site", "name", "run-id", "data"})
# A path component: no separators, no leading dot (hidden and temporary files), no "..".
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


class SiteStateError(RuntimeError):
    """A kept site-state file exists but cannot be used; the message names the file."""


def default_site_state_dir() -> Path:
    """``site-state`` in the project's cache: ``$FLOWER_LLM_CACHE`` or ``~/.cache/flower-llm``."""
    return default_cache_root() / "site-state"


def site_state_dir(node_config: Mapping[str, Any]) -> Path:
    """The root the node-config names (``site-state-dir``), or :func:`default_site_state_dir`."""
    value = node_config.get(SITE_STATE_DIR_KEY)
    if value is None or value == "":
        return default_site_state_dir()
    if not isinstance(value, str):
        raise ValueError(f"node-config '{SITE_STATE_DIR_KEY}' must be a path, got {value!r}")
    return Path(value).expanduser()


def run_key(run_name: str, run_id: int) -> str:
    """The run's directory name: ``output.run-name``, or ``run-<id>`` for an unnamed run.

    A run name that is not a plain file name (``a/b``, spaces) keeps its readable part and
    gains a hash of the whole name, so two different names never share a directory.
    """
    name = run_name.strip()
    if not name:
        return f"run-{int(run_id)}"
    if _SAFE_NAME.match(name) and ".." not in name:
        return name
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80] or "run"
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise ValueError(
            f"site-state {what} {value!r} must be 1-200 letters, digits, '.', '_' or '-', "
            "not starting with '.' (it becomes a file name)"
        )
    return value


@dataclass(frozen=True)
class SiteStateEntry:
    """One kept entry: its data and the Flower run that wrote it."""

    data: dict[str, Any]
    run_id: int


class SiteStateStore:
    """The kept state of one site in one (named) run.

    Parameters
    ----------
    root : path
        The directory of all sites' state on this machine (see :func:`site_state_dir`).
    run : str
        The run key (:func:`run_key`).
    site : str
        The site key.
    """

    def __init__(self, root: str | Path, run: str, site: str) -> None:
        self.run = _check_name("run name", run)
        self.site = _check_name("site key", site)
        self.directory = Path(root) / self.run / self.site

    def path(self, name: str) -> Path:
        """The file of entry ``name``."""
        return self.directory / f"{_check_name('entry name', name)}.json"

    # --- raw bytes ---------------------------------------------------------------------------

    def write_bytes(self, filename: str, payload: bytes) -> Path:
        """Atomically replace ``filename`` in this site's directory with ``payload``."""
        target = self.directory / _check_name("file name", filename)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{filename}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_directory(self.directory)
        return target

    def read_bytes(self, filename: str) -> bytes | None:
        """The content of ``filename``, or None when it was never written."""
        target = self.directory / _check_name("file name", filename)
        try:
            return target.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise SiteStateError(f"cannot read site state {target}: {err}") from err

    # --- JSON entries ------------------------------------------------------------------------

    def save(self, name: str, data: Mapping[str, Any], run_id: int) -> Path:
        """Keep ``data`` (a JSON-able mapping) as entry ``name``, written by run ``run_id``."""
        document = {
            "format": _FORMAT,
            "version": _VERSION,
            "run": self.run,
            "site": self.site,
            "name": name,
            "run-id": int(run_id),
            "data": dict(data),
        }
        payload = json.dumps(document, allow_nan=False, sort_keys=True).encode()
        return self.write_bytes(self.path(name).name, payload)

    def load(self, name: str) -> SiteStateEntry | None:
        """Entry ``name``, or None when none was kept.

        Raises
        ------
        SiteStateError
            If the file exists but is not a site-state document of this version, run, site
            and name; the message names the file, which the user may inspect or delete.
        """
        path = self.path(name)
        payload = self.read_bytes(path.name)
        if payload is None:
            return None
        try:
            document = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SiteStateError(f"site state {path} is not valid JSON (corrupt?): {err}") from err
        problem = _problem(document, self.run, self.site, name)
        if problem:
            raise SiteStateError(f"site state {path} {problem}")
        return SiteStateEntry(data=document["data"], run_id=document["run-id"])


def _problem(document: Any, run: str, site: str, name: str) -> str | None:
    """Why ``document`` is not a usable entry, or None."""
    if not isinstance(document, dict):
        return f"holds a {type(document).__name__}, not a site-state document"
    if document.get("format") != _FORMAT:
        return f"has format {document.get('format')!r}, not {_FORMAT!r}"
    if document.get("version") != _VERSION:
        return f"has version {document.get('version')!r}; this code reads version {_VERSION}"
    if set(document) != _KEYS:
        return f"has keys {sorted(document)}, expected {sorted(_KEYS)}"
    for key, expected in (("run", run), ("site", site), ("name", name)):
        if document[key] != expected:
            return f"belongs to {key} {document[key]!r}, not {expected!r} (copied by hand?)"
    if type(document["run-id"]) is not int or not isinstance(document["data"], dict):
        return "has a malformed 'run-id' or 'data'"
    return None


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
