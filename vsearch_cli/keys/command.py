"""`vsearch keys create NAME --scopes search,write --keys-file PATH`: makes a key, prints it once (it is
stored only as a hash) and adds its entry to the keys file; `vsearch keys list` and `vsearch keys
revoke NAME|KEY_ID`. The file is replaced at once on every change, so a running gateway, which rereads
it when it changes, sees either the old or the new keys."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from gateway.api_keys import SCOPES, ApiKeyEntry, KeyFileError, new_key, parse_key_file, write_key_file

Handler = Callable[[argparse.Namespace], int]

HEADER = "# vsearch API keys (hashes only), one JSON object a line; written by `vsearch keys`."


def _keys_file(args: argparse.Namespace) -> Path:
    path = args.keys_file or os.environ.get("GATEWAY_AUTH__KEYS_FILE")
    if not path:
        raise KeyFileError("give --keys-file PATH (or set GATEWAY_AUTH__KEYS_FILE)")
    return Path(path)


def read_entries(path: Path) -> tuple[list[str], list[ApiKeyEntry]]:
    """The file's comment lines (kept on rewrite) and its entries; none for a file not there yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [HEADER], []
    except (OSError, UnicodeDecodeError) as error:
        raise KeyFileError(f"cannot read the keys file {path}: {error}") from None
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    return comments, parse_key_file(text, path)


def _scopes(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_create(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    comments, entries = read_entries(path)
    if any(entry.name == args.name for entry in entries):
        print(f"vsearch keys create: {path} already has a key named {args.name!r} "
              "(revoke it first, or pick another name)", file=sys.stderr)
        return 1
    try:
        key, entry = new_key(args.name, _scopes(args.scopes))
    except ValueError as error:
        print(f"vsearch keys create: {error}", file=sys.stderr)
        return 2
    write_key_file(path, [*entries, entry], comments)
    if args.json:
        print(json.dumps({"key": key, **_described(entry), "keys_file": str(path)}))
    else:
        print(key)  # alone on stdout, for KEY=$(vsearch keys create ...)
    print(f"vsearch keys create: key {entry.name!r} (id {entry.key_id}, scopes {','.join(entry.scopes)}) "
          f"added to {path}; the key {'in the JSON' if args.json else 'above'} is shown only now: the file "
          "keeps its hash", file=sys.stderr)
    return 0


def _described(entry: ApiKeyEntry) -> dict[str, object]:
    """A key's entry for --json: never its hash (nor, but for create, the key)."""
    return {"name": entry.name, "key_id": entry.key_id, "scopes": list(entry.scopes), "created": entry.created}


def cmd_list(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    _comments, entries = read_entries(path)
    if args.json:
        print(json.dumps({"keys_file": str(path), "keys": [_described(entry) for entry in entries]}))
        return 0
    print(f"{'NAME':<24} {'KEY ID':<16}  {'SCOPES':<20} CREATED")
    for entry in entries:
        print(f"{entry.name:<24} {entry.key_id:<16}  {','.join(entry.scopes):<20} {entry.created}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    comments, entries = read_entries(path)
    kept = [entry for entry in entries if args.key not in (entry.name, entry.key_id)]
    if len(kept) == len(entries):
        print(f"vsearch keys revoke: no key named or with id {args.key!r} in {path}", file=sys.stderr)
        return 1
    write_key_file(path, kept, comments)
    if args.json:
        print(json.dumps({"keys_file": str(path), "revoked": [_described(entry) for entry in entries
                                                              if entry not in kept]}))
    print(f"vsearch keys revoke: removed {len(entries) - len(kept)} key(s) from {path}; gateways reading it "
          "refuse the key once they see the change", file=sys.stderr)
    return 0


def _guarded(handler: Handler) -> Handler:
    """The handler, with the keys file's problems as one line and an exit code instead of a traceback."""
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except KeyFileError as error:
            print(f"vsearch keys {args.keys_command}: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"vsearch keys {args.keys_command}: {error}", file=sys.stderr)
            return 1

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `keys` command to the main CLI's subparsers; handlers are `args.func(args) -> int`."""
    keys = subparsers.add_parser(
        "keys", help="create, list and revoke the gateway's API keys",
        description="API keys for the gateway, stored as hashes in the keys file it reads (GATEWAY_AUTH__KEYS_FILE).",
    )
    commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    file_help = "the keys file (default: $GATEWAY_AUTH__KEYS_FILE)"

    create = commands.add_parser("create", help="make a key, print it once, store its hash")
    create.add_argument("name", help="who the key is for (letters, digits, . _ -); shown in metrics, never secret")
    create.add_argument("--scopes", default="search",
                        help=f"comma-separated, of {', '.join(SCOPES)} (admin implies the others; default search)")
    create.add_argument("--keys-file", help=file_help)
    create.add_argument("--json", action="store_true", help="print one JSON object: the key and its entry")
    create.set_defaults(func=_guarded(cmd_create))

    listing = commands.add_parser("list", help="the keys in the file (names, ids, scopes; never the keys)")
    listing.add_argument("--keys-file", help=file_help)
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(func=_guarded(cmd_list))

    revoke = commands.add_parser("revoke", help="remove a key by name or key id")
    revoke.add_argument("key", metavar="NAME|KEY_ID")
    revoke.add_argument("--keys-file", help=file_help)
    revoke.add_argument("--json", action="store_true", help="print one JSON object: the keys removed")
    revoke.set_defaults(func=_guarded(cmd_revoke))
