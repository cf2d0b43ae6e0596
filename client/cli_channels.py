"""``interlude-client channels``: where notifications reach you besides the app.

An email channel works once its address is verified with the code mailed to it;
a webhook channel signs every request with a secret the server shows once,
when the channel is added or its secret rotated. This module prints that secret
exactly there and keeps it nowhere: not in the keystore, not in any other output.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from client.account import PROG, local_time, open_account, warn
from client.api import ApiError
from client.channels import (
    DELIVERY_STATES,
    FAILED_STATES,
    KINDS,
    KINDS_OF_ROLE,
    Channel,
    Delivery,
)
from client.session import UsageError

SIGNATURE_HINT = (
    "Verify every request as Standard Webhooks says (their libraries do it; "
    "https://www.standardwebhooks.com): webhook-signature is 'v1,' + base64 of HMAC-SHA256 "
    "over '{webhook-id}.{webhook-timestamp}.{raw body}', keyed with the base64-decoded part "
    "after 'whsec_'; refuse timestamps more than a few minutes old.")
PAUSED = "none"
MIN_PREFIX = 6

Command = Callable[[argparse.Namespace], Awaitable[int]]


def parse_kinds(text: str) -> list[str]:
    """``--kinds checkin.received,digest``: known kinds, in the order given, once each;
    ``none`` is no kind at all (the channel is paused)."""
    if text.strip().lower() == PAUSED:
        return []
    kinds: list[str] = []
    for part in text.split(","):
        kind = part.strip()
        if not kind:
            continue
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(
                f"unknown kind {kind!r}; the kinds are {', '.join(KINDS)}")
        if kind not in kinds:
            kinds.append(kind)
    if not kinds:
        raise argparse.ArgumentTypeError(f"name at least one kind ({', '.join(KINDS)}), or "
                                         f"'{PAUSED}' to pause the channel")
    return kinds


def _warn_silent_kinds(kinds: list[str] | None, role: str) -> None:
    if kinds is None or role not in KINDS_OF_ROLE:
        return
    silent = [k for k in kinds if k not in KINDS_OF_ROLE[role]]
    if silent:
        warn(f"{PROG}: note: a {role} never receives {', '.join(silent)}; "
             f"a {role}'s kinds are {', '.join(KINDS_OF_ROLE[role])}")


def choose_channel(channels: list[Channel], selector: str) -> Channel:
    """The channel named by its id, a unique start of its id, its address or its URL."""
    wanted = selector.strip()
    for channel in channels:
        if wanted.lower() == str(channel.id) or wanted == channel.target or (
                channel.type == "email" and wanted.lower() == channel.target.lower()):
            return channel
    if len(wanted) >= MIN_PREFIX:
        matches = [c for c in channels if str(c.id).startswith(wanted.lower())]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UsageError(f"{selector!r} starts {len(matches)} channel ids; give more of it")
    raise UsageError(f"no channel {selector!r}; see `{PROG} channels list`")


def channel_line(channel: Channel) -> str:
    state = "verified" if channel.verified else "NOT VERIFIED: run `channels verify CODE`"
    if channel.type == "webhook":
        state = "signed webhook"
    kinds = ", ".join(channel.kinds) or f"{PAUSED} (paused)"
    return f"{channel.id}  {channel.type:<7}  {channel.target}  [{state}]  kinds: {kinds}"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _print_secret(secret: str) -> None:
    print()
    print("Signing secret (store it now; it will not be shown again):")
    print()
    print(f"    {secret}")
    print()
    print(SIGNATURE_HINT)


# -- commands -------------------------------------------------------------------------

async def cmd_list(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        channels = await acct.api.channels()
        if args.json:
            _print_json([c.raw for c in channels])
            return 0
        if not channels:
            print("no channels: notifications reach you only in the app "
                  f"(`{PROG} notifications`, `{PROG} watch`)")
            print(f"add one with `{PROG} channels add email ADDRESS` or "
                  f"`{PROG} channels add webhook URL`")
        for channel in channels:
            print(channel_line(channel))
    return 0


async def cmd_add_email(args: argparse.Namespace) -> int:
    address = args.address.strip()
    if "@" not in address:
        raise UsageError(f"{args.address!r} is not an email address")
    async with open_account(args) as acct:
        _warn_silent_kinds(args.kinds, acct.state.user.role)
        added = await acct.api.add_channel("email", address, args.kinds)
        if args.json:
            _print_json(added.answer)
            return 0
        channel = added.channel
        print(f"email channel {channel.id} added for {channel.target}; "
              f"kinds: {', '.join(channel.kinds)}")
        if added.code_sent is False:
            print("the verification email could not be sent just now; ask for another with "
                  f"`{PROG} channels resend-code --channel {channel.id}`")
        else:
            print(f"a verification code was sent to {channel.target}; nothing is delivered "
                  f"there until you run `{PROG} channels verify CODE`")
    return 0


async def cmd_add_webhook(args: argparse.Namespace) -> int:
    url = args.url.strip()
    if not url.lower().startswith(("https://", "http://")):
        raise UsageError(f"{args.url!r} is not an http(s) URL")
    async with open_account(args) as acct:
        _warn_silent_kinds(args.kinds, acct.state.user.role)
        added = await acct.api.add_channel("webhook", url, args.kinds)
        if args.json:
            _print_json(added.answer)  # the secret is in it: this is its one showing
            return 0
        channel = added.channel
        print(f"webhook channel {channel.id} added: signed POSTs to {channel.target}; "
              f"kinds: {', '.join(channel.kinds)}")
        if added.secret:
            _print_secret(added.secret)
    return 0


def _waiting_for_code(channels: list[Channel], selector: str | None) -> Channel:
    if selector:
        channel = choose_channel(channels, selector)
        if channel.type != "email":
            raise UsageError(f"channel {channel.id} is a webhook; only email channels have "
                             "codes")
        return channel
    waiting = [c for c in channels if c.type == "email" and not c.verified]
    if len(waiting) == 1:
        return waiting[0]
    if not waiting:
        raise UsageError("no email channel is waiting for a code; see "
                         f"`{PROG} channels list`")
    names = ", ".join(f"{c.target} ({c.id})" for c in waiting)
    raise UsageError(f"{len(waiting)} email channels wait for a code ({names}); choose one "
                     "with --channel ID")


async def cmd_verify(args: argparse.Namespace) -> int:
    code = "".join(args.code.split())
    if not code:
        raise UsageError("the code is empty")
    async with open_account(args) as acct:
        channel = _waiting_for_code(await acct.api.channels(), args.channel)
        try:
            verified = await acct.api.verify_channel(channel.id, code)
        except ApiError as exc:
            if exc.code in ("code_expired", "too_many_attempts"):
                exc.message += (f"; `{PROG} channels resend-code --channel {channel.id}` "
                                "mails a new one")
            raise
        if args.json:
            _print_json(verified.raw)
            return 0
        print(f"{verified.target} is verified; it now gets {', '.join(verified.kinds)}")
    return 0


async def cmd_resend_code(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        channel = _waiting_for_code(await acct.api.channels(), args.channel)
        sent = await acct.api.resend_code(channel.id)
        if sent.channel.verified:
            print(f"{sent.channel.target} is already verified")
        elif sent.code_sent is False:
            print(f"the email to {sent.channel.target} could not be sent just now; try again "
                  "later")
        else:
            print(f"a new code was sent to {sent.channel.target}; the earlier one no longer "
                  "works")
    return 0


async def cmd_kinds(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        _warn_silent_kinds(args.kinds, acct.state.user.role)
        channel = choose_channel(await acct.api.channels(), args.channel)
        changed = await acct.api.set_channel_kinds(channel.id, args.kinds)
        if args.json:
            _print_json(changed.raw)
            return 0
        print(f"{changed.target} now gets {', '.join(changed.kinds) or 'nothing (paused)'}")
    return 0


async def cmd_rotate_secret(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        channel = choose_channel(await acct.api.channels(), args.channel)
        if channel.type != "webhook":
            raise UsageError(f"channel {channel.id} is an email channel; only webhooks have "
                             "secrets")
        secret = await acct.api.rotate_secret(channel.id)
        print(f"new signing secret for {channel.target}; the old one stops working now")
        _print_secret(secret)
    return 0


async def cmd_remove(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        channel = choose_channel(await acct.api.channels(), args.channel)
        await acct.api.remove_channel(channel.id)
        print(f"channel {channel.id} ({channel.target}) removed; deliveries it still owed "
              "end as dead")
    return 0


def delivery_line(delivery: Delivery, targets: dict[uuid.UUID, str]) -> str:
    target = targets.get(delivery.channel_id, f"removed channel {delivery.channel_id}")
    line = (f"{local_time(delivery.updated_at)}  {delivery.state:<7}  {target}  "
            f"notification {delivery.notification_id}  attempts {delivery.attempts}")
    if delivery.next_attempt_at and delivery.state in ("pending", "failed"):
        line += f"  next {local_time(delivery.next_attempt_at)}"
    if delivery.last_error:
        line += f"  last error: {delivery.last_error}"
    return line


async def cmd_deliveries(args: argparse.Namespace) -> int:
    states = FAILED_STATES if args.failed else tuple(args.state or ())
    async with open_account(args) as acct:
        deliveries = await acct.api.deliveries(states, limit=args.limit)
        if args.json:
            _print_json([d.raw for d in deliveries])
            return 0
        targets = {c.id: c.target for c in await acct.api.channels()}
        if not deliveries:
            which = f"{' or '.join(states)} " if states else ""
            print(f"no {which}deliveries")
        for delivery in deliveries:
            print(delivery_line(delivery, targets))
        if any(d.state == "dead" for d in deliveries):
            print(f"dead deliveries are not retried; fix the channel (`{PROG} channels "
                  "list`) and read them in the app")
    return 0


# -- parsing ------------------------------------------------------------------------------

def _states(text: str) -> list[str]:
    states = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in states if s not in DELIVERY_STATES]
    if unknown or not states:
        raise argparse.ArgumentTypeError(f"states are {', '.join(DELIVERY_STATES)}")
    return states


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 1 <= value <= 200:
        raise argparse.ArgumentTypeError("must be between 1 and 200")
    return value


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``channels`` on the main parser's subcommands."""
    help_ = "where notifications reach you besides the app: email addresses and webhooks"
    parser = sub.add_parser("channels", help=help_, description=help_)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    json_help = "print the server's answer as JSON"
    kinds_help = (f"comma-separated kinds of notification it gets ({', '.join(KINDS)}), or "
                  f"'{PAUSED}'; default: every kind your role receives")
    channel_help = "the channel: its id (or a unique start of it), address or URL"

    def action(name: str, func: Command, help_: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = action("list", cmd_list, "list your channels")
    p.add_argument("--json", action="store_true", help=json_help)

    add_help = "add an email or webhook channel"
    add = actions.add_parser("add", help=add_help, description=add_help)
    kinds = add.add_subparsers(dest="channel_type", required=True, metavar="TYPE")
    p = kinds.add_parser("email", help="an email address; a code is mailed to it to verify "
                         "it", description="add an email channel; a code is mailed to it")
    p.set_defaults(func=cmd_add_email)
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("--kinds", type=parse_kinds, metavar="KIND,...", help=kinds_help)
    p.add_argument("--json", action="store_true", help=json_help)
    p = kinds.add_parser("webhook", help="a URL that gets signed POSTs (Standard Webhooks)",
                         description="add a webhook channel; its signing secret is shown "
                         "once")
    p.set_defaults(func=cmd_add_webhook)
    p.add_argument("url", metavar="URL")
    p.add_argument("--kinds", type=parse_kinds, metavar="KIND,...", help=kinds_help)
    p.add_argument("--json", action="store_true",
                   help=json_help + " (with the secret, shown this once)")

    p = action("verify", cmd_verify, "verify an email channel with the code mailed to it")
    p.add_argument("code", metavar="CODE")
    p.add_argument("--channel", metavar="ID", help="needed unless exactly one email channel "
                   "waits for a code")
    p.add_argument("--json", action="store_true", help=json_help)
    p = action("resend-code", cmd_resend_code, "mail a new verification code")
    p.add_argument("--channel", metavar="ID", help="needed unless exactly one email channel "
                   "waits for a code")

    p = action("kinds", cmd_kinds, "choose which kinds of notification a channel gets")
    p.add_argument("channel", metavar="ID", help=channel_help)
    p.add_argument("kinds", metavar="KIND,...", type=parse_kinds,
                   help=f"{', '.join(KINDS)}; or '{PAUSED}' to pause the channel")
    p.add_argument("--json", action="store_true", help=json_help)
    p = action("rotate-secret", cmd_rotate_secret, "give a webhook a new signing secret "
               "(shown once; the old one stops working)")
    p.add_argument("channel", metavar="ID", help=channel_help)
    p = action("remove", cmd_remove, "remove a channel")
    p.add_argument("channel", metavar="ID", help=channel_help)

    p = action("deliveries", cmd_deliveries, "what was sent to your channels, newest first")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--failed", action="store_true",
                       help="only failed (being retried) and dead (given up) deliveries")
    which.add_argument("--state", type=_states, metavar="STATE,...",
                       help=f"only these states ({', '.join(DELIVERY_STATES)})")
    p.add_argument("--limit", type=_limit, default=50, help="at most this many (default 50)")
    p.add_argument("--json", action="store_true", help=json_help)
