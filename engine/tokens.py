"""API tokens: the token file, its checks, and `python -m engine.tokens create|list|revoke`.

The token file (auth.tokens_file, JSON, mode 0600) is owned by this module: the CLI is its only
writer, and the gateway reads it (gateway/auth.py re-reads it whenever it changes, so a revoked
token stops working without a restart). It holds each token's name, restrictions and SHA-256
digest, never the token: `create` prints the token once and nobody can print it again.

A token is 32 random bytes from `secrets` (256 bits), so a plain SHA-256 digest is enough: a
slow password hash protects low-entropy secrets and would only add cost to every request.
`find` hashes what a client presented and compares it with every stored digest using
hmac.compare_digest, without stopping at a match, so timing tells nothing about which
digest (or how much of one) matched.

Writes are atomic (a temporary file renamed over the old one) and serialised by an flock on
`<file>.lock`, so concurrent CLI runs cannot lose a revocation and the gateway never reads a
half-written file. A missing file means no tokens; a malformed one raises TokenFileError.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import sys
from pathlib import Path

import msgspec

PREFIX = "dft_"  # recognisable in logs and secret scanners
NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class TokenFileError(Exception):
    """The token file cannot be read or does not hold valid tokens."""


class Token(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    sha256: str  # hex digest of the token
    created: str
    read_only: bool = False  # GET routes only (metrics, stats, OpenAPI): no queries
    databases: list[str] | None = None  # None: every database; else only these


class TokenFile(msgspec.Struct, forbid_unknown_fields=True):
    version: int = 1
    tokens: list[Token] = []


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def find(tokens: list[Token], presented: str) -> Token | None:
    """The token whose digest matches presented, compared in constant time."""
    wanted = digest(presented).encode()
    found = None
    for token in tokens:
        if hmac.compare_digest(wanted, token.sha256.encode()):
            found = token
    return found


def load(path: str | os.PathLike) -> list[Token]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TokenFileError(f"{path}: {exc}") from None
    try:
        tokens = msgspec.json.decode(data, type=TokenFile).tokens
    except msgspec.DecodeError as exc:
        raise TokenFileError(f"{path}: not a valid token file: {exc}") from None
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        raise TokenFileError(f"{path}: token names must be unique")
    return tokens


def save(path: str | os.PathLike, tokens: list[Token]) -> None:
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(msgspec.json.format(msgspec.json.encode(TokenFile(tokens=tokens))) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold the token file's lock: read, change and save it without losing another change."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create(path, name: str, read_only: bool = False,
           databases: list[str] | None = None) -> str:
    """Add a token called name; returns the token itself (the only time it exists in clear)."""
    if not NAME.match(name):
        raise TokenFileError(f"token name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    token = PREFIX + secrets.token_urlsafe(32)
    with locked(path):
        tokens = load(path)
        if any(t.name == name for t in tokens):
            raise TokenFileError(f"a token called {name!r} exists already; revoke it first")
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        tokens.append(Token(name, digest(token), created, read_only,
                            sorted(set(databases)) if databases else None))
        save(path, tokens)
    return token


def revoke(path, name: str) -> bool:
    with locked(path):
        tokens = load(path)
        kept = [t for t in tokens if t.name != name]
        if len(kept) == len(tokens):
            return False
        save(path, kept)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.tokens",
                                     description="Manage duckfleet API tokens (hashes only are stored).")
    parser.add_argument("--config", help="engine.toml whose auth.tokens_file to use "
                                         "(default: ./engine.toml if present)")
    parser.add_argument("--file", help="the token file itself (overrides --config)")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("create", help="make a token and print it (once)")
    make.add_argument("name")
    make.add_argument("--read-only", action="store_true",
                      help="only GET routes (metrics, stats, OpenAPI); no queries")
    make.add_argument("--database", action="append", dest="databases", metavar="DB",
                      help="only this database (repeat for several); default: all")
    commands.add_parser("list", help="names and restrictions of the tokens")
    drop = commands.add_parser("revoke", help="delete a token; the gateway stops accepting it at once")
    drop.add_argument("name")
    args = parser.parse_args(argv)
    try:
        path = args.file or _configured_file(args.config)
        if args.command == "create":
            print(create(path, args.name, args.read_only, args.databases))
            print(f"token {args.name!r} added to {path}; it is shown only this once",
                  file=sys.stderr)
        elif args.command == "list":
            for t in load(path):
                scope = "read-only routes" if t.read_only else "all routes"
                dbs = ", ".join(t.databases) if t.databases else "all databases"
                print(f"{t.name}\tcreated {t.created}\t{scope}\t{dbs}")
        elif not revoke(path, args.name):
            print(f"no token called {args.name!r} in {path}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.name!r}", file=sys.stderr)
    except TokenFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _configured_file(config_path: str | None) -> str:
    from engine import config as config_mod

    path = config_path or ("engine.toml" if Path("engine.toml").exists() else None)
    try:
        return config_mod.load(path).auth.tokens_file
    except config_mod.ConfigError as exc:
        raise TokenFileError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
