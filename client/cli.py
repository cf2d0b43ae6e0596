"""``interlude-client``: enroll, send, read and reply — the encryption happens here.

Exit codes: 0 ok, 1 the server refused or could not be reached, 2 usage or local
configuration (wrong passphrase, not enrolled, no terminal to ask a secret),
3 refused for trust reasons (a person's keys changed, an unsigned device record).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from client import cli_boundaries, cli_channels, cli_watch
from client.account import (
    DEFAULT_SERVER,
    PROG,
    SERVER_ENV,
    Account,
    choose_relationship,
    open_account,
    publish_keys,
)
from client.account import local_time as _when
from client.account import peer_label as _peer_label
from client.account import server_url as _server
from client.account import warn as _warn
from client.api import (
    NOT_SIGNED_IN,
    ApiError,
    GatewayClient,
    Relationship,
    ServerUnreachable,
    User,
)
from client.crypto import MAX_TEXT_BYTES, DeviceKeys
from client.explain import crisis_box, expectation_lines, notification_text, reply_lines
from client.keystore import KeystoreError
from client.messages import read_inbox, send_message
from client.session import (
    LocalStore,
    NotEnrolled,
    State,
    UsageError,
    ask_passphrase,
    ask_password,
    default_home,
    home_lock,
)
from client.stream import StreamRefused
from client.trust import (
    TrustError,
    accept_keys,
    change_warning,
    check_pins,
    safety_number_for,
    verify_devices,
)
from shared.envelope import KIND_CHECKIN, KIND_REPLY, SUITE_MLKEM768_X25519, SUITE_X25519

SUITE_NAMES = {"mlkem768-x25519": SUITE_MLKEM768_X25519, "x25519": SUITE_X25519}

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_TRUST = 0, 1, 2, 3


async def _publish_after_signin(api: GatewayClient, store: LocalStore, state: State) -> int:
    try:
        await publish_keys(api, state)
    except (ApiError, ServerUnreachable) as exc:
        message = exc.message if isinstance(exc, ApiError) else str(exc)
        _warn(f"{PROG}: signed in, but publishing this device's keys failed: {message}")
        _warn(f"{PROG}: the keystore is saved; the next command retries publishing")
        return EXIT_API
    finally:
        store.save(state)
    return EXIT_OK


def read_text(arg: str) -> str:
    """The message text: the argument, or stdin for '-'."""
    text = sys.stdin.read() if arg == "-" else arg
    text = text.rstrip("\r\n")
    if not text.strip():
        raise UsageError("the message is empty")
    if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
        raise UsageError(f"the message is too long (at most {MAX_TEXT_BYTES} bytes of UTF-8)")
    return text


# -- commands -------------------------------------------------------------------------

async def cmd_enroll(args: argparse.Namespace) -> int:
    store = LocalStore(args.home)
    if store.exists():
        raise UsageError(f"already enrolled here (keystore {store.path}); use another --home, "
                         "or `login` to sign in again")
    # Ask every secret before the code is spent.
    passphrase = ask_passphrase(new=True)
    password = ask_password(new=True)
    keys = DeviceKeys.generate(SUITE_NAMES[args.suite])
    server = _server(args, None)
    async with GatewayClient(server) as api:
        session = await api.enroll(code=args.code, email=args.email, password=password,
                                   display_name=args.name)
        state = State(server=server, user=session.user, device_id=uuid.uuid4(), keys=keys,
                      access_token=session.access_token, refresh_token=session.refresh_token)
        store.create(state, passphrase)
        user = session.user
        print(f"enrolled {user.display_name} <{user.email}> as {user.role} on {server}")
        if session.relationship_id:
            print(f"relationship {session.relationship_id} with your therapist is active")
        print(f"this device: {state.device_id} (keys in {store.path})")
        return await _publish_after_signin(api, store, state)


async def cmd_login(args: argparse.Namespace) -> int:
    store = LocalStore(args.home)
    if store.exists():
        state = store.load()
        if state.user.email.lower() != args.email.strip().lower():
            raise UsageError(f"this home ({args.home}) belongs to {state.user.email}; "
                             "use another --home for another account")
        password = ask_password(new=False)
        server = _server(args, state)
        async with GatewayClient(server) as api:
            session = await api.login(email=args.email, password=password)
            if session.user.id != state.user.id:
                raise UsageError(f"the account {args.email} on {server} is not the one this "
                                 "keystore was made for; use another --home")
            state.server, state.user = server, session.user
            state.access_token, state.refresh_token = session.access_token, session.refresh_token
            print(f"signed in as {state.user.display_name} <{state.user.email}> "
                  f"(this device {state.device_id})")
            return await _publish_after_signin(api, store, state)
    passphrase = ask_passphrase(new=True)
    password = ask_password(new=False)
    server = _server(args, None)
    async with GatewayClient(server) as api:
        session = await api.login(email=args.email, password=password)
        state = State(server=server, user=session.user, device_id=uuid.uuid4(),
                      keys=DeviceKeys.generate(SUITE_NAMES[args.suite]),
                      access_token=session.access_token, refresh_token=session.refresh_token)
        store.create(state, passphrase)
        print(f"signed in as {state.user.display_name} <{state.user.email}> on a new device "
              f"{state.device_id}")
        print("messages sent before this device existed cannot be read on it")
        return await _publish_after_signin(api, store, state)


async def cmd_logout(args: argparse.Namespace) -> int:
    async with open_account(args, publish=False) as acct:
        if acct.state.access_token:
            try:
                await acct.api.logout()
            except ApiError as exc:
                if exc.status != 401:
                    raise
        acct.state.access_token = acct.state.refresh_token = None
        print(f"signed out; this device's keys stay in {acct.store.path}")
    return EXIT_OK


async def cmd_whoami(args: argparse.Namespace) -> int:
    store = LocalStore(args.home)
    state = store.load()
    user = state.user
    print(f"{user.display_name} <{user.email}>, {user.role}")
    print(f"user id:    {user.id}")
    print(f"device id:  {state.device_id} (key id {state.keys.key_id.hex()})")
    print(f"server:     {_server(args, state)}")
    print(f"signed in:  {'yes' if state.access_token else 'no'}; keys published: "
          f"{'yes' if state.keys_published else 'no'}")
    return EXIT_OK


async def cmd_relationships(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        rels = await acct.api.relationships()
        me = acct.state.user.id
        if args.json:
            print(json.dumps([{"id": str(r.id), "status": r.status, "created_at": r.created_at,
                               "peer": (p.to_json() if (p := r.peer_of(me)) else None)}
                              for r in rels], indent=2))
        elif not rels:
            print("no relationships yet")
        for rel in [] if args.json else rels:
            print(f"{_peer_label(rel, me)}  relationship {rel.id}  ({rel.status})")
    return EXIT_OK


async def cmd_invite(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        invite = await acct.api.create_invite()
        print(f"invite {invite.id}, single use, valid until {_when(invite.expires_at)}")
        print(f"your client runs: {PROG} enroll --code CODE --email THEIR_EMAIL --name NAME")
        print(invite.code)
    return EXIT_OK


async def _send(args: argparse.Namespace, *, kind: int, role: str) -> int:
    text = read_text(args.text)
    async with open_account(args) as acct:
        state = acct.state
        if state.user.role != role:
            other = "reply --to CLIENT" if role == "client" else "send"
            raise UsageError(f"a {state.user.role} uses `{PROG} {other}`")
        rel = choose_relationship(await acct.api.relationships(), state.user.id, args.to)
        if rel.status != "active":
            raise UsageError(f"the relationship with {_peer_label(rel, state.user.id)} "
                             "has ended")
        sent = await send_message(acct.api, state, rel, text, kind=kind,
                                  urgent=getattr(args, "urgent", False), warn=_warn,
                                  deliver_now=getattr(args, "now", False))
        posted = sent.posted
        if args.json:
            print(json.dumps(posted.answer, indent=2, ensure_ascii=False))
            return EXIT_OK
        what = "check-in" if kind == KIND_CHECKIN else "reply"
        again = "" if sent.created else " (already stored by an earlier attempt)"
        peer = _peer_label(rel, state.user.id)
        print(f"sent {what} {sent.message_id} to {peer}, "
              f"encrypted for {sent.recipients} devices{again}")
        if posted.expectation is not None:
            therapist_tz = await _therapist_zone(acct, rel.id)
            print("\n".join(expectation_lines(posted.expectation, therapist_tz=therapist_tz)))
            if posted.expectation.crisis_resources:
                print()
                print("\n".join(crisis_box(posted.expectation.crisis_resources)))
        elif posted.release_at is not None:
            person = rel.peer_of(state.user.id)
            name = person.display_name if person else "your client"
            print("\n".join(reply_lines(held=posted.held, release_at=posted.release_at,
                                        deliver_now=getattr(args, "now", False), client=name)))
    return EXIT_OK


async def _therapist_zone(acct: Account, relationship_id: uuid.UUID) -> str | None:
    """The zone of the therapist's office hours, to show times in it too (best effort)."""
    try:
        return (await acct.api.relationship_availability(relationship_id)).tz
    except (ApiError, ServerUnreachable):
        return None


async def cmd_send(args: argparse.Namespace) -> int:
    return await _send(args, kind=KIND_CHECKIN, role="client")


async def cmd_reply(args: argparse.Namespace) -> int:
    return await _send(args, kind=KIND_REPLY, role="therapist")


def _print_message(entry: dict[str, Any]) -> None:
    what = "check-in" if entry["kind"] == "checkin" else "reply"
    urgent = "  URGENT" if entry.get("urgent") else ""
    print(f"--- {what} from {entry['from_name']} <{entry['from']}>, "
          f"{_when(entry['sent_at'])}{urgent}")
    print(f"    message {entry['id']} (relationship {entry['relationship_id']})")
    if "error" in entry:
        print(f"    [cannot be shown: {entry['error']}]")
    else:
        if not entry.get("key_trusted", True):
            print("    [signed by a device key you have not verified]")
        print(entry["text"])
    print()


async def cmd_inbox(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        rels = await acct.api.relationships()
        if args.to:
            rels = [choose_relationship(rels, acct.state.user.id, args.to)]
        entries = await read_inbox(acct.api, acct.state, rels, warn=_warn)
        if args.json:
            print(json.dumps(entries, indent=2, ensure_ascii=False))
            return EXIT_OK
        if not entries:
            print("no messages")
        for entry in entries:
            _print_message(entry)
    return EXIT_OK


async def cmd_notifications(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        items = []
        async for item in acct.api.notifications(unread=args.unread,
                                                 page_size=min(args.limit, 100)):
            items.append(item)
            if len(items) >= args.limit:
                break
        if args.json:
            print(json.dumps([n.to_json() for n in items], indent=2, ensure_ascii=False))
        else:
            if not items:
                print("no notifications")
            for n in items:
                mark = "  " if n.read_at else "* "
                where = ", ".join(f"{name} {value}" for name, value in (
                    ("relationship", n.relationship_id), ("message", n.message_id)) if value)
                print(f"{mark}{_when(n.created_at)}  "
                      f"{notification_text(n.kind, n.actor_name, n.details)}"
                      + (f"  ({where})" if where else ""))
        if args.mark_read:
            updated = await acct.api.mark_all_read()
            _warn(f"marked {updated} notification(s) read")
    return EXIT_OK


async def _peer_and_devices(acct: Account, selector: str | None) -> tuple[
        Relationship, User, list[Any]]:
    me = acct.state.user.id
    rels = await acct.api.relationships()
    if selector and selector.strip().lower() == acct.state.user.email.lower():
        rel = choose_relationship(rels, me, None)
        person = acct.state.user
    else:
        rel = choose_relationship(rels, me, selector, option="PEER")
        peer = rel.peer_of(me)
        if peer is None:
            raise UsageError("the other person of this relationship is unknown to the server")
        person = peer
    devices = verify_devices(await acct.api.devices(rel.id))
    return rel, person, devices


def _explain_number(number: str, peer: User) -> None:
    print(f"Safety number for you and {peer.display_name} <{peer.email}>:")
    print()
    print(f"    {number}")
    print()
    print(f"Compare it in person with {peer.display_name} at your next session: each of you")
    print(f"runs `{PROG} fingerprint` and reads the 12 groups aloud. If every digit matches,")
    print("nobody sits between you. If it differs, do not send anything private; ask")
    print("whether either of you has a new device, and tell your practice.")


async def cmd_fingerprint(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        rel, peer, devices = await _peer_and_devices(acct, args.peer)
        if peer.id == acct.state.user.id:
            raise UsageError("a safety number is between you and someone else; name them")
        emails = {p.id: p.email for p in (rel.therapist, rel.client) if p}
        report = check_pins(acct.state, devices, emails)
        for user_id in report.changed:
            _warn(change_warning(emails.get(user_id, str(user_id))))
        _explain_number(safety_number_for(acct.state.user.id, peer.id, devices), peer)
    return EXIT_OK


async def cmd_trust(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        _, person, devices = await _peer_and_devices(acct, args.peer)
        mine = person.id == acct.state.user.id
        if not mine:
            _explain_number(safety_number_for(acct.state.user.id, person.id, devices), person)
            print()
        new = accept_keys(acct.state, person.id, devices, person.email)
        keys = ", ".join(sorted(d.pin.key_id for d in devices if d.user_id == person.id))
        whose = "your own devices" if mine else f"{person.email}'s devices"
        print(f"trusted {whose} (key ids {keys or 'none'}); {new} key(s) newly accepted")
    return EXIT_OK


# -- parsing ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Interlude's end-to-end encrypted check-ins and replies. Messages are "
        "encrypted and decrypted on this device; the server only ever holds ciphertext.",
        epilog="Secrets: the keystore passphrase comes from INTERLUDE_PASSPHRASE and the "
        "account password from INTERLUDE_PASSWORD, else they are asked on the terminal. "
        "Exit codes: 0 ok, 1 server error, 2 usage or local problem, 3 refused for trust.")
    parser.add_argument("--server", metavar="URL",
                        help=f"gateway URL (default: ${SERVER_ENV}, else the server this home "
                        f"enrolled with, else {DEFAULT_SERVER})")
    parser.add_argument("--home", metavar="DIR", type=Path, default=default_home(),
                        help="directory of this device's keystore (default: "
                        "$INTERLUDE_CLIENT_HOME, else ~/.interlude)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], Awaitable[int]],
                help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    suite_help = ("cipher suite of the new device keys (default mlkem768-x25519, the "
                  "post-quantum hybrid)")
    p = command("enroll", cmd_enroll, "create your account with a one-time code and make "
                "this device's keys")
    p.add_argument("--code", required=True, help="the enrollment code (from the operator "
                   "for a therapist, from the therapist's invite for a client)")
    p.add_argument("--email", required=True, help="your email address")
    p.add_argument("--name", required=True, help="your name as the other person sees it")
    p.add_argument("--suite", choices=sorted(SUITE_NAMES), default="mlkem768-x25519",
                   help=suite_help)

    p = command("login", cmd_login, "sign in; reuses this home's device keys, or makes a new "
                "device if the home is empty")
    p.add_argument("--email", required=True, help="your email address")
    p.add_argument("--suite", choices=sorted(SUITE_NAMES), default="mlkem768-x25519",
                   help=suite_help + "; only for a new device")

    command("logout", cmd_logout, "end the session on the server and forget its tokens "
            "(the device keys stay)")
    command("whoami", cmd_whoami, "show the account and device of this home (no network)")
    p = command("relationships", cmd_relationships, "list the people you are connected with")
    p.add_argument("--json", action="store_true", help="print JSON")

    command("invite", cmd_invite, "(therapist) create a one-time invite code for a new "
            "client; the code is the last line printed")

    private = ("TEXT on the command line is visible to other local users; use '-' to read it "
               "from stdin")
    p = command("send", cmd_send, "(client) send an encrypted check-in to your therapist")
    p.add_argument("text", metavar="TEXT", help=f"the message, or '-' for stdin. {private}")
    p.add_argument("--urgent", action="store_true",
                   help="mark it urgent (alerts outside office hours only if agreed)")
    p.add_argument("--to", metavar="REL", help="therapist email or relationship id (needed "
                   "only with more than one relationship)")
    p.add_argument("--json", action="store_true", help="print the server's answer as JSON "
                   "(with the expectation: when your therapist is alerted, reply-by time)")

    p = command("reply", cmd_reply, "(therapist) send an encrypted reply to a client; outside "
                "your office hours it is held until they open, unless --now")
    p.add_argument("--to", metavar="CLIENT", help="the client's email or the relationship id "
                   "(optional with exactly one client)")
    p.add_argument("text", metavar="TEXT", help=f"the reply, or '-' for stdin. {private}")
    p.add_argument("--now", action="store_true", help="deliver it now, even outside your "
                   "office hours")
    p.add_argument("--json", action="store_true", help="print the server's answer as JSON")

    p = command("inbox", cmd_inbox, "decrypt and show the messages of your relationships")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--to", metavar="REL", help="only this relationship (email or id)")

    p = command("notifications", cmd_notifications,
                "list your notifications (who and when, never content), newest first")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--unread", action="store_true", help="only unread ones")
    p.add_argument("--mark-read", action="store_true", help="then mark all of them read")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")

    p = command("fingerprint", cmd_fingerprint, "show the safety number to compare in person")
    p.add_argument("peer", metavar="PEER", nargs="?",
                   help="email or relationship id (default: your only peer)")

    p = command("trust", cmd_trust, "after comparing safety numbers, accept a person's "
                "current keys (needed after a key change)")
    p.add_argument("peer", metavar="PEER", help="their email or the relationship id (your own "
                   "email accepts your own new devices)")

    cli_boundaries.add_commands(sub)
    cli_channels.add_commands(sub)
    cli_watch.add_commands(sub)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "notifications" and args.limit < 1:
        parser.error("--limit must be at least 1")
    try:
        if args.command not in ("enroll", "login") and not LocalStore(args.home).exists():
            # Before locking, so a mistyped --home does not leave an empty directory behind.
            raise NotEnrolled(f"not enrolled here ({args.home}); run enroll or login")
        if getattr(args, "locks_home", True):
            with home_lock(args.home):
                result: int = asyncio.run(args.func(args))
        else:  # a long-running command that takes the lock itself, briefly (watch)
            result = asyncio.run(args.func(args))
        return result
    except TrustError as exc:
        return _fail(str(exc), EXIT_TRUST)
    except ApiError as exc:
        code = _fail(exc.message, EXIT_API)
        if exc.status == 401 and exc.code not in ("invalid_credentials", NOT_SIGNED_IN):
            _warn(f"{PROG}: sign in again with `{PROG} login --email EMAIL`")
        return code
    except (ServerUnreachable, StreamRefused) as exc:
        return _fail(str(exc), EXIT_API)
    except (KeystoreError, UsageError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), EXIT_USAGE)
    except KeyboardInterrupt:
        interrupted: int = getattr(args, "interrupt_code", 130)  # watch: Ctrl-C ends it
        return interrupted
    except Exception as exc:  # never a traceback; the type says where to look
        return _fail(f"unexpected error ({exc.__class__.__name__}): {exc}", EXIT_API)


if __name__ == "__main__":
    sys.exit(main())
