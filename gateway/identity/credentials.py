"""Where ``keygate login`` keeps a person's keys: ``$XDG_CONFIG_HOME/keygate/credentials.toml``.

One entry per gateway and org. The file holds secrets: it is created with
mode 0600 in a folder of mode 0700, replaced whole (written beside it, then
renamed) so a reader never sees half of it, changed under a lock (two logins
at once keep both entries), and refused when someone else may read it. ``KEYGATE_TOKEN`` in the environment wins over the file, for
containers and scripts that are handed a key.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ENV_TOKEN = "KEYGATE_TOKEN"
HEADER = "# Keys of `keygate login`, one per gateway and org. Secret: keep this file mode 0600.\n"


class CredentialsError(Exception):
    """The credentials file cannot be used; the message is one line for the person."""


@dataclass(frozen=True, slots=True)
class Credential:
    gateway: str
    org: str
    user: str
    key_id: str
    key: str


def normal_gateway(url: str) -> str:
    """A gateway URL as entries are keyed: without a trailing slash."""
    return url.rstrip("/")


def credentials_path(environ: Mapping[str, str] = os.environ) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(base) / "keygate" / "credentials.toml"


def load(path: Path) -> list[Credential]:
    """Every entry of the file; none when it does not exist."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read it: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # SECURITY: like ssh with a private key, refuse keys that others could have read (or written).
        raise CredentialsError(f"{path}: others may read it (mode {stat.S_IMODE(info.st_mode):o}); "
                               f"run `chmod 600 {path}`")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError, TOMLDecodeError, int()'s digit limit
        raise CredentialsError(f"{path}: not a credentials file ({exc})") from None
    entries = document.get("credentials", [])
    found: list[Credential] = []
    for place, entry in enumerate(entries if isinstance(entries, list) else [None]):
        try:
            found.append(Credential(**{name: str(entry[name]) for name in Credential.__slots__}))
        except (KeyError, TypeError):
            raise CredentialsError(f"{path}: entry {place + 1} is not a credential "
                                   "(gateway, org, user, key_id, key)") from None
    return found


def save(path: Path, entries: Sequence[Credential]) -> None:
    """Replace the file with ``entries``, mode 0600, atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = HEADER + "".join(
        "\n[[credentials]]\n" + "".join(f"{name} = {_toml_string(getattr(entry, name))}\n"
                                        for name in Credential.__slots__)
        for entry in entries
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    # SECURITY: a new file, never one found there (a leftover, or a link someone planted to aim the keys elsewhere).
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, and whatever a leftover file had
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def update(path: Path, change: Callable[[list[Credential]], list[Credential]]) -> None:
    """Apply ``change`` to the entries as they are now, with the file locked against another keygate's update.

    A login waits minutes for the person: what it read before then may be stale (another terminal signed in to
    another org meanwhile), so the file is read again here, not earlier.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        save(path, change(load(path)))
    finally:
        os.close(fd)  # and with it the lock


def _toml_string(value: str) -> str:
    # A JSON string with only ASCII is a valid TOML basic string (same escapes, \\uXXXX included).
    return json.dumps(value, ensure_ascii=True)


def find(entries: Sequence[Credential], gateway: str | None, org: str | None) -> Credential:
    """The one entry for ``gateway`` and ``org`` (either may be left out when only one entry fits)."""
    fits = [e for e in entries if (gateway is None or e.gateway == normal_gateway(gateway))
            and (org is None or e.org == org)]
    if len(fits) == 1:
        return fits[0]
    wanted = " ".join(part for part in (f"--gateway {gateway}" if gateway else "", f"--org {org}" if org else "")
                      if part)
    if not fits:
        raise CredentialsError("not signed in" + (f" for {wanted}" if wanted else "")
                               + ": run `keygate login --gateway URL`")
    choices = ", ".join(f"{e.gateway} --org {e.org}" for e in fits)
    raise CredentialsError(f"signed in to several gateways or orgs ({choices}): name one with --gateway/--org")


def put(entries: Sequence[Credential], new: Credential) -> list[Credential]:
    """``entries`` with ``new`` in place of any entry for the same gateway and org."""
    return [e for e in entries if (e.gateway, e.org) != (new.gateway, new.org)] + [new]


def without(entries: Sequence[Credential], gone: Credential) -> list[Credential]:
    return [e for e in entries if (e.gateway, e.org) != (gone.gateway, gone.org)]


__all__ = ["ENV_TOKEN", "Credential", "CredentialsError", "credentials_path", "find", "load", "normal_gateway",
           "put", "save", "update", "without"]
