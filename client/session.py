"""The local state of one person on one device: the home directory and its keystore.

Everything secret or trust-related lives in ONE file, ``keystore.json`` in the
home directory, sealed under the user's passphrase (client.keystore): the server
URL, the user, this device's id and private keys, the session tokens and the
pinned keys of the people this user talks to.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import getpass
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.api import User
from client.crypto import DeviceKeys
from client.keystore import KeystoreError, load_keystore, save_keystore

KEYSTORE_NAME = "keystore.json"
LOCK_NAME = ".lock"
STATE_VERSION = 1
MIN_PASSPHRASE_LENGTH = 8
LOCK_TIMEOUT_SECONDS = 30.0

PASSPHRASE_ENV = "INTERLUDE_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
PASSWORD_ENV = "INTERLUDE_PASSWORD"  # noqa: S105 - a variable name, not a secret
HOME_ENV = "INTERLUDE_CLIENT_HOME"


class UsageError(Exception):
    """The command cannot run as asked (configuration, input, local state): exit 2."""


class NotEnrolled(UsageError):
    """This home holds no keystore."""


def default_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(HOME_ENV) or Path.home() / ".interlude").expanduser()


def ensure_home(home: Path) -> None:
    """Create the home directory (mode 0700) if needed."""
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if home.stat().st_mode & 0o077:
            # mkdir's mode is filtered by the umask, and an existing home may be lax.
            home.chmod(0o700)
    except OSError as exc:
        raise UsageError(f"cannot use home directory {home}: {exc.strerror}") from None


@contextlib.contextmanager
def home_lock(home: Path, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
    """Hold an exclusive lock on the home for one command.

    Two commands refreshing the same token at once would look like token theft to
    the server (reuse ends the session), and two saves would lose one's changes.
    """
    fd = _open_lock(home)
    try:
        deadline = time.monotonic() + timeout
        while not _try_lock(fd, home, deadline):
            time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.asynccontextmanager
async def home_lock_async(home: Path, timeout: float = LOCK_TIMEOUT_SECONDS
                          ) -> AsyncIterator[None]:
    """:func:`home_lock` for a long-running command that holds the lock only briefly
    (``watch``), waiting without blocking its event loop."""
    fd = _open_lock(home)
    try:
        deadline = time.monotonic() + timeout
        # Another process's lock has no event to await: poll it.
        while not _try_lock(fd, home, deadline):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _open_lock(home: Path) -> int:
    ensure_home(home)
    return os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)


def _try_lock(fd: int, home: Path, deadline: float) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if time.monotonic() > deadline:
            raise UsageError(f"another interlude-client command is using {home}; "
                             "try again when it has finished") from None
        return False


# -- secrets from the environment or the terminal -------------------------------

def _have_terminal() -> bool:
    # getpass reads /dev/tty, not stdin, so a piped stdin is fine when a terminal exists.
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _ask(what: str, env_name: str, *, confirm: bool, env: Mapping[str, str]) -> str:
    value = env.get(env_name)
    if value:
        return value
    if not _have_terminal():
        raise UsageError(f"no terminal to ask for the {what}; set {env_name}")
    try:
        first = getpass.getpass(f"{what.capitalize()}: ")
        if confirm and getpass.getpass(f"Repeat the {what}: ") != first:
            raise UsageError(f"the two {what}s differ")
    except EOFError:
        raise UsageError(f"no {what} given") from None
    if not first:
        raise UsageError(f"the {what} must not be empty")
    return first


def ask_passphrase(*, new: bool, env: Mapping[str, str] | None = None) -> str:
    """The keystore passphrase: $INTERLUDE_PASSPHRASE, else asked (twice when `new`)."""
    value = _ask("keystore passphrase", PASSPHRASE_ENV, confirm=new,
                 env=os.environ if env is None else env)
    if new and len(value) < MIN_PASSPHRASE_LENGTH:
        raise UsageError(f"the keystore passphrase must have at least {MIN_PASSPHRASE_LENGTH} "
                         "characters")
    return value


def ask_password(*, new: bool, env: Mapping[str, str] | None = None) -> str:
    """The account password: $INTERLUDE_PASSWORD, else asked (twice when `new`)."""
    return _ask("account password", PASSWORD_ENV, confirm=new,
                env=os.environ if env is None else env)


# -- pinned keys ----------------------------------------------------------------

@dataclass(frozen=True, slots=True, order=True)
class PinnedKey:
    """One device key of a person, as first seen or as explicitly trusted."""

    device_id: str
    signing_public_key: str  # base64, as the server publishes it
    key_id: str  # hex

    def to_json(self) -> dict[str, str]:
        return {"device_id": self.device_id, "signing_public_key": self.signing_public_key,
                "key_id": self.key_id}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PinnedKey:
        return cls(str(data["device_id"]), str(data["signing_public_key"]),
                   str(data["key_id"]))


@dataclass
class Peer:
    email: str
    keys: set[PinnedKey] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {"email": self.email, "keys": [k.to_json() for k in sorted(self.keys)]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Peer:
        return cls(str(data.get("email", "")), {PinnedKey.from_json(k) for k in data["keys"]})


# -- the keystore contents ----------------------------------------------------------

@dataclass
class State:
    """What the keystore holds. Mutate, then `LocalStore.save`."""

    server: str
    user: User
    device_id: uuid.UUID
    keys: DeviceKeys
    access_token: str | None = None
    refresh_token: str | None = None
    keys_published: bool = False
    pins: dict[uuid.UUID, Peer] = field(default_factory=dict)
    # The newest notification `watch` has shown, to resume the live stream from.
    last_notification_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "server": self.server,
            "user": self.user.to_json(),
            "device_id": str(self.device_id),
            "device_keys": self.keys.to_dict(),
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "keys_published": self.keys_published,
            "pins": {str(k): v.to_json() for k, v in self.pins.items()},
            "last_notification_id": self.last_notification_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> State:
        if data.get("version") != STATE_VERSION:
            raise KeystoreError(f"keystore holds state version {data.get('version')!r}, "
                                f"this client knows {STATE_VERSION}")
        return cls(
            server=str(data["server"]),
            user=User.from_json(data["user"]),
            device_id=uuid.UUID(data["device_id"]),
            keys=DeviceKeys.from_dict(data["device_keys"]),
            access_token=data.get("access_token"),
            refresh_token=data.get("refresh_token"),
            keys_published=bool(data.get("keys_published")),
            pins={uuid.UUID(k): Peer.from_json(v) for k, v in data.get("pins", {}).items()},
            last_notification_id=data.get("last_notification_id"),
        )


class LocalStore:
    """The keystore file of one home directory and the passphrase that opens it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / KEYSTORE_NAME
        self._passphrase: str | None = None

    def exists(self) -> bool:
        return self.path.exists()

    def load(self, passphrase: str | None = None) -> State:
        """Open the keystore (asking for the passphrase if not given)."""
        if not self.exists():
            raise NotEnrolled(f"not enrolled here ({self.home}); run enroll or login")
        secret = passphrase if passphrase is not None else ask_passphrase(new=False)
        data = load_keystore(self.path, secret)
        try:
            state = State.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise KeystoreError(f"keystore {self.path} holds malformed state ({exc})") from None
        self._passphrase = secret
        return state

    def reload(self) -> State:
        """Open the keystore again with the passphrase already given (another command
        may have changed it meanwhile)."""
        if self._passphrase is None:
            raise RuntimeError("reload before load or create")
        return self.load(self._passphrase)

    def create(self, state: State, passphrase: str) -> None:
        """Write a new keystore; refuses to overwrite an existing one."""
        if self.exists():
            raise UsageError(f"a keystore already exists at {self.path}; use another --home")
        ensure_home(self.home)
        self._passphrase = passphrase
        self.save(state)

    def save(self, state: State) -> None:
        if self._passphrase is None:
            raise RuntimeError("save before load or create")
        save_keystore(self.path, self._passphrase, state.to_json())
