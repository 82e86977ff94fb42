"""`flexnpu keys`: make, show, authorize and trust the CURVE keys of TCP publishing.

Exit codes: 0 done, 1 a key file or dir that cannot be used (one line saying why), 2 bad usage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from flexnpu import SCHEMA, paths
from flexnpu.cliargs import fail
from flexnpu.remote import keys

app = typer.Typer(
    help="CURVE keys for publishing on TCP: a key pair per server and per client, the clients a "
         "server lets in (authorized/) and the servers a client expects (servers/). Keys live in "
         f"{paths.SERVICE_KEYS_DIR} for root and the service user, else in {paths.USER_KEYS_DIR} "
         "($FLEXNPU_KEYS_DIR or --dir over both). Secret keys are 0600, their owner's alone; "
         "docs/multinode.md walks through two nodes.",
    no_args_is_help=True,
)

DirOpt = Annotated[Optional[Path], typer.Option("--dir", help="Keys dir (default: see `flexnpu keys --help`).",
                                                metavar="DIR")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]


def _dir(d: Path | None) -> Path:
    return Path(d) if d is not None else paths.keys_dir()


def _out(json_out: bool, data: dict[str, Any], text: str) -> None:
    print(json.dumps({"schema": SCHEMA, **data}) if json_out else text)


def _guard(cmd: str, fn: Any) -> Any:
    try:
        return fn()
    except keys.KeysError as e:
        fail(f"keys {cmd}", str(e), 1)
    except OSError as e:
        fail(f"keys {cmd}", f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1)


@app.command("new")
def new_command(
    name: Annotated[str, typer.Argument(help="Name of the key pair: `server` for a node's services, "
                                             "`client` for `flexnpu top --nodes`, or your own.")],
    d: DirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair of that name.")] = False,
    owner: Annotated[Optional[str], typer.Option(
        help="User who will use the secret key (root only; e.g. the service user `flexnpu`).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Make a key pair: NAME.key (public, 0644) and NAME.key_secret (0600, the owner's alone).

    Examples:
      sudo flexnpu keys new server --owner flexnpu   # /etc/flexnpu/keys/server.key{,_secret}
      flexnpu keys new client                        # ~/.config/flexnpu/keys/client.key{,_secret}
      flexnpu keys new n1 --dir ./keys --json
    """
    kd = _dir(d)
    _guard("new", lambda: keys.check_name(name))
    pair = _guard("new", lambda: keys.new_pair(kd, name, force, owner))
    pub = keys.public_path(kd, name)
    _out(json_out, {"name": name, "public_key": pair.public.decode(), "public": str(pub), "secret": str(pair.path)},
         f"public key {pair.public.decode()}\n  {pub} (give this one to the other side)\n"
         f"  {pair.path} (secret: keep it here, 0600)")


@app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="A key pair's name in the keys dir, or a key file's path.")] = "server",
    d: DirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Print a public key (and check the secret key file's mode when there is one).

    Examples:
      flexnpu keys show              # this node's server key
      flexnpu keys show client
      flexnpu keys show ./n1.key --json
    """
    kd = _dir(d)

    def find() -> tuple[Path, keys.KeyPair, Path | None]:
        if os.sep in name or name.endswith(keys.PUBLIC_SUFFIX) or name.endswith(keys.SECRET_SUFFIX):
            p = Path(name)
            return p, keys.read_public(p), None
        pub, sec = keys.public_path(kd, name), keys.secret_path(kd, name)
        if sec.exists() or sec.is_symlink():
            keys.read_secret(sec)  # refused if others may read it
            return pub if pub.exists() else sec, keys.read_public(sec), sec
        return pub, keys.read_public(pub), None

    path, pair, sec = _guard("show", find)
    _out(json_out, {"name": name, "public_key": pair.public.decode(), "file": str(path),
                    "secret": str(sec) if sec else None},
         pair.public.decode())


def _public_from(cmd: str, key: str) -> bytes:
    return _guard(cmd, lambda: keys.public_key_arg(key))


@app.command("authorize")
def authorize_command(
    name: Annotated[str, typer.Argument(help="Who the key belongs to (a name for the file).")],
    key: Annotated[str, typer.Argument(help="The client's public key file (NAME.key), or the key itself "
                                            "(40 characters of Z85).")],
    d: DirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an authorized key of that name.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Let a client subscribe to this node's TCP endpoints.

    Copies its public key into DIR/authorized/NAME.key. It takes effect at
    the client's next connection, without a restart.

    Examples:
      sudo flexnpu keys authorize alice /tmp/alice-client.key
      sudo flexnpu keys authorize laptop "$(ssh laptop flexnpu keys show client)"
    """
    kd = _dir(d)
    _guard("authorize", lambda: keys.check_name(name))
    public = _public_from("authorize", key)
    adir = keys.authorized_dir(kd)
    path = _guard("authorize", lambda: keys.add_public(keys.public_path(adir, name), public, force))
    why = keys.dir_problem(adir, "the authorized dir")
    if why:
        fail("keys authorize", f"written, but {why}", 1)
    _out(json_out, {"name": name, "public_key": public.decode(), "file": str(path)},
         f"authorized {name}: {path}")


@app.command("revoke")
def revoke_command(
    name: Annotated[str, typer.Argument(help="An authorized client's name.")],
    d: DirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Stop letting a client in (removes DIR/authorized/NAME.key).

    Its new connections are refused; a connection already open stays until
    it drops (restart the publisher to cut it).

    Examples:
      sudo flexnpu keys revoke alice
    """
    kd = _dir(d)
    path = _guard("revoke", lambda: keys.public_path(keys.authorized_dir(kd), name))
    try:
        path.unlink()
    except FileNotFoundError:
        fail("keys revoke", f"{name} is not authorized ({path} does not exist)", 1)
    except OSError as e:
        fail("keys revoke", f"{path}: {e.strerror}", 1)
    _out(json_out, {"name": name, "file": str(path)}, f"revoked {name}: {path} removed")


@app.command("trust")
def trust_command(
    node: Annotated[str, typer.Argument(help="The node's name, as `flexnpu top --nodes NODE=...` calls it.")],
    key: Annotated[str, typer.Argument(help="The node's public server key file (server.key), or the key "
                                            "itself (40 characters of Z85).")],
    d: DirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the key kept for that node.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Remember a node's public server key (DIR/servers/NODE.key).

    `flexnpu top --nodes` checks the node against it: a server without the
    matching secret key is not believed.

    Examples:
      flexnpu keys trust n1 /tmp/n1-server.key
      flexnpu keys trust n2 "$(ssh n2 flexnpu keys show)"
    """
    kd = _dir(d)
    _guard("trust", lambda: keys.check_name(node, "node name"))
    public = _public_from("trust", key)
    path = _guard("trust", lambda: keys.add_public(keys.server_key_path(kd, node), public, force))
    _out(json_out, {"node": node, "public_key": public.decode(), "file": str(path)}, f"trusted {node}: {path}")


@app.command("list")
def list_command(d: DirOpt = None, json_out: JsonOpt = False) -> None:
    """List the key pairs, authorized clients and known servers in a keys dir.

    Any problem (a secret key others may read, an authorized dir others may
    write) is printed too, and the exit code is 1.

    Examples:
      flexnpu keys list
      sudo flexnpu keys list --json | jq .authorized
    """
    kd = _dir(d)
    pairs, problems = [], []
    try:
        names = sorted(os.listdir(kd))
    except FileNotFoundError:
        names = []
    except OSError as e:
        fail("keys list", f"{kd}: {e.strerror}", 1)
    for n in names:
        if n.endswith(keys.SECRET_SUFFIX) or (n.endswith(keys.PUBLIC_SUFFIX) and
                                              n[:-len(keys.PUBLIC_SUFFIX)] + keys.SECRET_SUFFIX not in names):
            p = kd / n
            try:
                pair = keys.read_secret(p) if n.endswith(keys.SECRET_SUFFIX) else keys.read_public(p)
                pairs.append({"name": n.rsplit(".", 1)[0], "public_key": pair.public.decode(), "file": str(p),
                              "secret": pair.secret is not None})
            except keys.KeysError as e:
                problems.append(str(e))

    def listed(sub: Path) -> list[dict[str, str]]:
        out = []
        for n in sorted(os.listdir(sub)) if sub.is_dir() else ():
            if n.endswith(keys.PUBLIC_SUFFIX):
                try:
                    out.append({"name": n[:-len(keys.PUBLIC_SUFFIX)],
                                "public_key": keys.read_public(sub / n).public.decode(), "file": str(sub / n)})
                except keys.KeysError as e:
                    problems.append(str(e))
        return out

    adir = keys.authorized_dir(kd)
    authorized = listed(adir)
    if adir.exists() and (why := keys.dir_problem(adir, "the authorized dir")):
        problems.append(why)
    servers = listed(kd / keys.SERVERS)
    if json_out:
        _out(True, {"dir": str(kd), "pairs": pairs, "authorized": authorized, "servers": servers,
                    "problems": problems}, "")
    else:
        print(f"keys dir {kd}")
        for title, items in (("key pairs", pairs), ("authorized clients", authorized), ("known servers", servers)):
            print(f"{title}:" + ("" if items else " none"))
            for it in items:
                print(f"  {it['name']:<16} {it['public_key']}")
        for p in problems:
            print(f"problem: {p}")
    if problems:
        raise typer.Exit(1)

