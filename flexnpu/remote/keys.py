"""CURVE key files: a node's key pairs, the clients it lets subscribe, the servers it knows.

One keys dir (paths.keys_dir(): /etc/flexnpu/keys for the services, ~/.config/flexnpu/keys
for a user, $FLEXNPU_KEYS_DIR over both) holds

    NAME.key              a public key (0644): safe to copy anywhere
    NAME.key_secret       the same public key and its secret key (0600, its owner's alone)
    authorized/NAME.key   a client's public key: that client may subscribe to this node
    servers/NODE.key      a server's public key: what `flexnpu top --nodes` expects NODE to hold

in ZeroMQ's certificate format (czmq's ZPL, as pyzmq's zmq.auth writes and reads it), so
files made by other ZeroMQ tools work here and the other way round.

Who may read what is checked each time a file is used, as ssh checks its private keys: a
secret key file that its group or others may read, or that someone else owns, is refused
(KeysError saying how to fix it); an authorized dir that someone else owns or may write
in is refused too, since whoever may write there may let themselves in.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path


PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
AUTHORIZED = "authorized"
SERVERS = "servers"
SERVER_NAME = "server"  # the key pair `flexnpu observe` and `flexnpu controller` publish with
CLIENT_NAME = "client"  # the key pair `flexnpu top --nodes` subscribes with
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
Z85_KEY = re.compile(r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")  # a 32-byte key in Z85
MAX_FILE = 64 * 1024  # a certificate is a few hundred bytes
PUBLIC_MODE = 0o644
SECRET_MODE = 0o600
DIR_MODE = 0o755


class KeysError(ValueError):
    """A key file or dir that cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class KeyPair:
    """A public key and, when the file held one, its secret key (both Z85 text, 40 bytes)."""

    public: bytes
    secret: bytes | None
    path: Path


def check_name(name: str, what: str = "key name") -> str:
    if not NAME.match(name):
        raise KeysError(f"{what} {name!r}: use letters, digits, '.', '_' or '-' (at most 64, not starting "
                        f"with '.' or '-')")
    return name


def public_path(d: Path, name: str) -> Path:
    return Path(d) / f"{check_name(name)}{PUBLIC_SUFFIX}"


def secret_path(d: Path, name: str) -> Path:
    return Path(d) / f"{check_name(name)}{SECRET_SUFFIX}"


def authorized_dir(d: Path) -> Path:
    return Path(d) / AUTHORIZED


def server_key_path(d: Path, node: str) -> Path:
    return Path(d) / SERVERS / f"{check_name(node, 'node name')}{PUBLIC_SUFFIX}"


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


# ---------------------------------------------------------------- reading


def _read(path: Path) -> tuple[bytes, os.stat_result]:
    """A key file's bytes and the stat of what was read (not a link, a FIFO or a device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeysError(f"{path}: no such key file") from None
    except PermissionError:
        raise KeysError(f"{path}: permission denied (the key belongs to {_owner_of(path)})") from None
    except OSError as e:
        if e.errno == 40:  # ELOOP: a symlink
            raise KeysError(f"{path}: a symbolic link; give the key file itself") from None
        raise KeysError(f"{path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeysError(f"{path}: not a regular file")
        data = os.read(fd, MAX_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        raise KeysError(f"{path}: too large for a key file")
    return data, st


def _owner_of(path: Path) -> str:
    try:
        return _owner(os.lstat(path).st_uid)
    except OSError:
        return "someone else"


def parse(data: bytes, path: Path) -> KeyPair:
    """The keys in a certificate's text (lines `public-key = "..."`, `secret-key = "..."`)."""
    public = secret = None
    for line in data.splitlines():
        line = line.strip()
        if line.startswith(b"public-key") and b"=" in line:
            public = line.split(b"=", 1)[1].strip(b" \t'\"")
        elif line.startswith(b"secret-key") and b"=" in line:
            secret = line.split(b"=", 1)[1].strip(b" \t'\"")
    for what, k in (("public", public), ("secret", secret)):
        if k is not None and not Z85_KEY.match(k.decode("latin-1")):
            raise KeysError(f"{path}: its {what} key is not a CURVE key (40 characters of Z85)")
    if public is None:
        raise KeysError(f"{path}: no public-key line; not a ZeroMQ certificate")
    return KeyPair(public, secret, Path(path))


def secret_problem(st: os.stat_result, path: Path) -> str | None:
    """Why a secret key file with this stat may not be used, or None."""
    if st.st_mode & 0o077:
        return (f"{path}: the secret key is readable by others than its owner (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); anyone who reads it can pose as this node or client: "
                f"chmod 600 {path}, and make a new key pair if others may have read it")
    if os.geteuid() != 0 and st.st_uid not in (0, os.geteuid()):
        return (f"{path}: the secret key belongs to {_owner(st.st_uid)}, not to this user; use your own "
                f"key (flexnpu keys new NAME)")
    return None


def read_secret(path: Path) -> KeyPair:
    """A key pair from a secret key file, checked (secret_problem)."""
    data, st = _read(Path(path))
    why = secret_problem(st, Path(path))
    if why:
        raise KeysError(why)
    pair = parse(data, Path(path))
    if pair.secret is None:
        raise KeysError(f"{path}: holds no secret key; give the NAME{SECRET_SUFFIX} file")
    return pair


def read_public(path: Path) -> KeyPair:
    """The public key of a certificate (a .key file; a secret file is checked as one)."""
    data, st = _read(Path(path))
    pair = parse(data, Path(path))
    if pair.secret is not None:
        why = secret_problem(st, Path(path))
        if why:
            raise KeysError(why)
    return KeyPair(pair.public, None, Path(path))


def public_key_arg(text: str) -> bytes:
    """A public key given on the command line: 40 characters of Z85, or a key file's path."""
    if Z85_KEY.match(text) and not Path(text).exists():
        return text.encode()
    return read_public(Path(text)).public


def dir_problem(d: Path, what: str) -> str | None:
    """Why a dir whose contents decide who may connect may not be trusted, or None: someone
    else owns it or may write in it."""
    try:
        st = os.stat(d)
    except FileNotFoundError:
        return f"{what} {d} does not exist"
    except OSError as e:
        return f"{what} {d}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} {d} is not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return f"{what} {d} belongs to {_owner(st.st_uid)}, who could authorize anyone; chown root {d}"
    if st.st_mode & 0o022:
        return (f"{what} {d} is writable by others than its owner (mode {stat.S_IMODE(st.st_mode):04o}), who "
                f"could authorize anyone; chmod go-w {d}")
    return None


def authorized_keys(d: Path) -> dict[bytes, str]:
    """The public keys in an authorized dir (file name without .key for each), checked
    (dir_problem). Files that are not certificates are left out."""
    why = dir_problem(d, "the authorized dir")
    if why:
        raise KeysError(why)
    out: dict[bytes, str] = {}
    for entry in sorted(os.listdir(d)):
        if not entry.endswith(PUBLIC_SUFFIX):
            continue
        p = Path(d) / entry
        try:
            data, st = _read(p)
            if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
                continue  # someone else's file, or one others may change: not an authorization
            out[parse(data, p).public] = entry[:-len(PUBLIC_SUFFIX)]
        except KeysError:
            continue
    return out


# ---------------------------------------------------------------- writing


def _banner(kind: str) -> str:
    return (f"#   ****  Made by flexnpu keys on {time.strftime('%Y-%m-%d %H:%M:%S')}  ****\n"
            f"#   ZeroMQ CURVE {kind} Certificate\n#   Exchange securely, or use a secure mechanism to verify the "
            f"contents\n#   of this file after exchange. Store public certificates in your home\n"
            f"#   directory, in the .curve subdirectory.\n\n")


def cert_text(public: bytes, secret: bytes | None = None) -> bytes:
    body = "metadata\ncurve\n" + f'    public-key = "{public.decode()}"\n'
    if secret is not None:
        body += f'    secret-key = "{secret.decode()}"\n'
    return (_banner("Secret" if secret is not None else "Public") + body).encode()


def make_dir(d: Path) -> None:
    """The dir (and its parents) if missing: DIR_MODE (its files' modes guard the secrets)."""
    d = Path(d)
    if not d.is_dir():
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, DIR_MODE)


def write_file(path: Path, data: bytes, mode: int, force: bool, uid: int = -1, gid: int = -1) -> None:
    """Writes a key file with its final mode and owner before its name appears: made under a
    temporary name (O_EXCL, O_NOFOLLOW, mode 0600) and renamed into place, so a reader never
    sees it wider or half-written. An existing file is kept unless force."""
    path = Path(path)
    if not force and (path.exists() or path.is_symlink()):
        raise KeysError(f"{path} exists; not overwritten (--force replaces it, and whoever used the old key "
                        f"is refused from then on)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        if force:
            os.rename(tmp, path)
        else:
            os.link(tmp, path)  # fails if the name appeared meanwhile: never replaces a key unasked
            os.unlink(tmp)
    except FileExistsError:
        os.unlink(tmp)
        raise KeysError(f"{path} exists; not overwritten (--force replaces it)") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def new_pair(d: Path, name: str, force: bool = False, owner: str | None = None) -> KeyPair:
    """Makes NAME.key and NAME.key_secret in d; owner: the user who will use the secret key
    (root only may give it to someone else, e.g. the service user)."""
    import zmq

    check_name(name)
    uid = gid = -1
    if owner is not None:
        try:
            pw = pwd.getpwnam(owner)
        except KeyError:
            raise KeysError(f"no user {owner!r} on this node") from None
        if pw.pw_uid != os.geteuid() and os.geteuid() != 0:
            raise KeysError(f"only root may make a key pair for another user ({owner})")
        uid, gid = pw.pw_uid, pw.pw_gid
    if not zmq.has("curve"):
        raise KeysError("this libzmq was built without CURVE; install a libzmq with libsodium or its own tweetnacl")
    d = Path(d)
    pub, sec = public_path(d, name), secret_path(d, name)
    if not force:
        for p in (sec, pub):
            if p.exists() or p.is_symlink():
                raise KeysError(f"{p} exists; not overwritten (--force replaces the key pair, and whoever "
                                f"trusted the old public key refuses the new one until given it)")
    make_dir(d)
    public, secret = zmq.curve_keypair()
    write_file(sec, cert_text(public, secret), SECRET_MODE, force, uid, gid)
    write_file(pub, cert_text(public), PUBLIC_MODE, force, uid, gid)
    return KeyPair(public, secret, sec)


def add_public(path: Path, public: bytes, force: bool = False) -> Path:
    """Saves a public key as a certificate at path (authorized/NAME.key, servers/NODE.key)."""
    make_dir(Path(path).parent)
    write_file(Path(path), cert_text(public), PUBLIC_MODE, force)
    return Path(path)
