"""What the witness keeps on disk: its lease table, and the per-pair keys it reads.

The state file (``[witness] state_file``) is one JSON object::

    {"version": 1,
     "pairs": {"web": {"owner": "node-a", "generation": 7, "solo": true,
                       "solo_owner": "node-a"}}}

``owner`` is the holder (null: free), ``generation`` the fencing token of the last grant
of a new era (claim, takeover, going solo), ``solo`` whether ``solo_owner`` ran without a
secondary (every other copy is stale since). Expiry times are not kept: they are
monotonic and mean nothing after a restart; a restarted witness gives every holder one
lease period from its start. The file is replaced atomically and durably (temporary
file, fsync, rename, directory fsync) before the reply that reports the change, so a
crash never loses a grant it announced. A file that cannot be read as such is an error
at start: starting from an empty table could grant a stale standby's takeover.

Keys: ``<keys_dir>/<pair>.key``, the pair being the VM name the requests carry. A key
file readable by group or others, or shorter than :data:`MIN_KEY_BYTES`, is refused.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from kemari_suite.errors import ConfigError
from kemari_suite.protocol.files import write_owner_only

STATE_VERSION = 1
#: Shortest key accepted (HMAC-SHA256 wants at least its output size).
MIN_KEY_BYTES = 32
#: Pair names that may become a file name under ``keys_dir``.
_PAIR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def read_key_file(path: str | os.PathLike[str], *, what: str) -> bytes:
    """The key in ``path`` (surrounding whitespace stripped).

    Raises:
        ConfigError: (key ``what``) the file cannot be read, is readable by group or
            others, or holds fewer than :data:`MIN_KEY_BYTES` bytes.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read().strip()
    except OSError as err:
        raise ConfigError(f"cannot read key file {p}: {err.strerror}", key=what) from err
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"key file {p} is readable by group or others (mode {stat.S_IMODE(mode):o}): "
            f"chmod 600 {p}",
            key=what,
        )
    if len(data) < MIN_KEY_BYTES:
        raise ConfigError(
            f"key in {p} is {len(data)} bytes; keys must be at least {MIN_KEY_BYTES} bytes",
            key=what,
        )
    return data


class PairKeys:
    """The witness's key for each pair: ``<keys_dir>/<pair>.key``, else ``fallback``
    (the old single shared key; None: refuse pairs without a key file)."""

    def __init__(self, keys_dir: Path | None, fallback: bytes | None) -> None:
        self.keys_dir = keys_dir
        self.fallback = fallback

    def key_for(self, pair: str) -> bytes:
        """Raises:
        ValueError: a pair name that is not a plain file name, no key for the pair, or
            a key file that is unsafe or too short (the message says which).
        """
        if not _PAIR_NAME.fullmatch(pair):
            raise ValueError(f"bad pair name {pair!r}")
        if self.keys_dir is not None:
            path = self.keys_dir / f"{pair}.key"
            if path.exists():
                try:
                    return read_key_file(path, what="witness.keys_dir")
                except ConfigError as err:
                    raise ValueError(err.reason) from err
        if self.fallback is not None:
            return self.fallback
        raise ValueError(f"no key for pair {pair!r} (expected {self.keys_dir}/{pair}.key)")

    def any_key(self) -> bytes | None:
        """The key to sign a refusal with when the pair is unknown."""
        return self.fallback


# ---- the lease table on disk --------------------------------------------------------


def save_state(path: Path, pairs: dict[str, dict[str, Any]]) -> None:
    """Replace the state file: temporary file (mode 0600), fsync, rename, directory
    fsync. The directory is created (mode 0700) when missing.

    Raises:
        OSError: any step failed (the old file, if any, is still in place).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = json.dumps({"version": STATE_VERSION, "pairs": pairs}, sort_keys=True)
    write_owner_only(path, data, durable=True)


def _pair(name: str, raw: Any, where: str) -> dict[str, Any]:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"pair {name!r}: {why}", path=where, key="witness.state_file")

    if not isinstance(raw, dict):
        raise bad("not an object")
    owner, solo_owner = raw.get("owner"), raw.get("solo_owner")
    gen, solo = raw.get("generation", 0), raw.get("solo", False)
    if owner is not None and not isinstance(owner, str):
        raise bad(f"owner {owner!r} is not a name")
    if solo_owner is not None and not isinstance(solo_owner, str):
        raise bad(f"solo_owner {solo_owner!r} is not a name")
    if isinstance(gen, bool) or not isinstance(gen, int) or gen < 0:
        raise bad(f"generation {gen!r} is not a count")
    if not isinstance(solo, bool):
        raise bad(f"solo {solo!r} is not true or false")
    return {"owner": owner, "generation": gen, "solo": solo, "solo_owner": solo_owner}


def load_state(path: Path) -> dict[str, dict[str, Any]]:
    """The pairs recorded in ``path`` ({} when it does not exist).

    Raises:
        ConfigError: the file cannot be read, is not JSON, has another version, or holds
            a bad value (naming the file and the pair): fix it or move it away knowingly.
    """
    where = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", path=where) from err
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise ConfigError(f"not JSON ({err})", path=where, key="witness.state_file") from err
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise ConfigError(
            f"state version {version!r}, expected {STATE_VERSION}",
            path=where,
            key="witness.state_file",
        )
    pairs = data.get("pairs", {})
    if not isinstance(pairs, dict):
        raise ConfigError("pairs is not an object", path=where, key="witness.state_file")
    return {str(k): _pair(str(k), v, where) for k, v in pairs.items()}


__all__ = ["MIN_KEY_BYTES", "PairKeys", "load_state", "read_key_file", "save_state"]
