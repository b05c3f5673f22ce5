"""The app's local accounts from the command line: `users`."""

from __future__ import annotations

import argparse
import getpass
import sys

from bus_core.clinic.accounts import Accounts
from bus_core.clinic.cases import open_store
from bus_core.errors import BusError
from bus_core.roles import ROLES, operator


def cmd_users(args: argparse.Namespace) -> int:
    """Manage the app's local accounts (as the command-line operator: every role)."""
    with open_store(args.db) as store:
        accounts, me = Accounts(store), operator()
        if args.action == "list":
            for user in accounts.list_users():
                state = "disabled" if user.disabled else "locked" if user.locked() else "active"
                print(f"{user.name:<24} {','.join(sorted(user.roles)):<40} {state:<8} "
                      f"{'password' if user.has_password else 'single sign-on'}  "
                      f"last sign-in {user.last_signin or 'never'}")
        elif args.action == "log":
            for entry in reversed(accounts.log(args.limit)):
                print(f"{entry['at']}  {entry['who']}: {entry['action']} {entry['subject'] or ''}"
                      f"{'  (' + str(entry['detail']) + ')' if entry['detail'] else ''}")
        elif args.action == "add":
            if args.exist_ok and accounts.get(args.name.strip()) is not None:
                print(f"User {args.name.strip()} exists already; left as it is.")
                return 0
            password = None if args.no_password else _read_password(args.password_stdin)
            user = accounts.add(me, args.name, args.role, password)
            print(f"Added {user.name} ({', '.join(sorted(user.roles))}).")
        elif args.action == "set-role":
            user = accounts.set_roles(me, args.name, args.roles)
            print(f"{user.name} now has the roles {', '.join(sorted(user.roles))}.")
        elif args.action in ("disable", "enable"):
            accounts.set_disabled(me, args.name, args.action == "disable")
            print(f"{args.name} is {args.action}d.")
        elif args.action == "passwd":
            accounts.set_password(me, args.name, _read_password(args.password_stdin))
            print(f"New password set for {args.name} (the account is unlocked).")
    return 0


def _read_password(from_stdin: bool) -> str:
    """The new password: one line of standard input, or typed twice at a terminal."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise BusError("Give the password on standard input with --password-stdin.")

    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        raise BusError("The two passwords differ: nothing was changed.")
    return first


def add_users(sub: argparse._SubParsersAction) -> None:
    """The `users` command's options."""
    p = sub.add_parser("users", help="manage the app's local accounts")
    p.add_argument("--db", help="case database (path or SQLAlchemy URL; default: "
                                "$BUS_DATABASE_URL, else the data folder's cases.sqlite)")
    users = p.add_subparsers(dest="action", required=True)
    q = users.add_parser("add", help="add a user")
    q.add_argument("name")
    q.add_argument("--role", action="append", required=True, choices=ROLES,
                   help="repeat for several roles")
    q.add_argument("--password-stdin", action="store_true",
                   help="read the password from standard input (else typed twice)")
    q.add_argument("--no-password", action="store_true",
                   help="a single-sign-on user: only the roles are kept here")
    q.add_argument("--exist-ok", action="store_true",
                   help="do nothing when the user exists already")
    users.add_parser("list", help="list the users")
    q = users.add_parser("log", help="the account audit log (sign-ins, changes)")
    q.add_argument("--limit", type=int, default=50)
    q = users.add_parser("set-role", help="replace a user's roles")
    q.add_argument("name")
    q.add_argument("roles", nargs="+", choices=ROLES, metavar="ROLE")
    for action in ("disable", "enable"):
        users.add_parser(action, help=f"{action} a user").add_argument("name")
    q = users.add_parser("passwd", help="set a user's password (unlocks the account)")
    q.add_argument("name")
    q.add_argument("--password-stdin", action="store_true")
    p.set_defaults(func=cmd_users)
