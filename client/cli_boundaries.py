"""``interlude-client hours | away | agreement``: office hours, absences and agreements.

The rules themselves live on the server (shared.boundaries, shared.schedule_time);
here a spec, a time zone or a quiet-hours range is checked with the same parser
first, so a typo is one clear line (exit 2) before anything is sent.
"""

from __future__ import annotations

import argparse
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any

from client.account import PROG, choose_relationship, open_account, peer_label
from client.explain import agreement_lines, availability_lines
from client.session import UsageError
from shared.schedule import QuietHours, ScheduleError, WeeklySchedule

Command = Callable[[argparse.Namespace], Awaitable[int]]

_REPLY_WITHIN = re.compile(r"\s*(\d{1,4})\s*(business[ _-]?days?|office[ _-]?hours?)\s*",
                           re.IGNORECASE)
_UNLIMITED = ("unlimited", "none", "no-limit")


def parse_checkins(text: str) -> int | None:
    """``--checkins``: a number from 0 to 1000, or ``unlimited`` (None)."""
    if text.strip().lower() in _UNLIMITED:
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or 'unlimited', got {text!r}") from None
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1000, got {value}")
    return value


def parse_reply_within(text: str) -> dict[str, Any]:
    """``--reply-within "2 business days"`` or ``"8 office hours"`` → the API's reply_window."""
    match = _REPLY_WITHIN.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected e.g. '2 business days' or '8 office hours', got {text!r}")
    unit = "business_days" if match[2].lower().startswith("business") else "office_hours"
    return {"amount": int(match[1]), "unit": unit}


def parse_day(text: str) -> str:
    try:
        return date.fromisoformat(text.strip()).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def agreement_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The PUT body of ``agreement set``: only what was asked to change."""
    changes: dict[str, Any] = {}
    if "checkins" in vars(args):  # absent unless given: None means unlimited
        changes["checkins_allowed"] = args.checkins
    if args.per is not None:
        changes["checkin_period"] = args.per
    if args.reply_within is not None:
        changes["reply_window"] = args.reply_within
    if args.urgent is not None:
        changes["urgent_policy"] = args.urgent
    if args.quiet is not None:
        if not args.client_tz:
            raise UsageError("--quiet needs --client-tz, the client's time zone "
                             "(e.g. --client-tz Europe/Berlin)")
        try:
            QuietHours.parse(args.quiet, args.client_tz)
        except ScheduleError as exc:
            raise UsageError(f"invalid quiet hours: {exc}") from None
        changes["client_quiet_hours"] = {"spec": args.quiet.strip(), "tz": args.client_tz}
    elif args.client_tz:
        raise UsageError("--client-tz goes with --quiet")
    if args.no_quiet:
        changes["client_quiet_hours"] = None
    if args.crisis is not None:
        if not args.crisis.strip():
            raise UsageError("--crisis needs a text; --crisis-default returns to the "
                             "practice's text")
        changes["crisis_resources"] = args.crisis.strip()
    if args.crisis_default:
        changes["crisis_resources"] = None
    if not changes:
        raise UsageError("nothing to change; see `interlude-client agreement set --help`")
    return changes


def _therapist_only(role: str, what: str, instead: str) -> None:
    if role != "therapist":
        raise UsageError(f"only a therapist {what}; {instead}")


# -- commands -------------------------------------------------------------------------

async def cmd_hours_set(args: argparse.Namespace) -> int:
    try:
        WeeklySchedule.parse(args.spec, args.tz)
    except ScheduleError as exc:
        raise UsageError(f"invalid office hours: {exc}") from None
    async with open_account(args) as acct:
        _therapist_only(acct.state.user.role, "sets office hours",
                        f"see `{PROG} hours show`")
        availability = await acct.api.set_hours(args.spec, args.tz)
        if args.json:
            print(json.dumps(availability.raw, indent=2, ensure_ascii=False))
            return 0
        print(f"office hours saved (version {availability.version})")
        print("\n".join(availability_lines(availability, mine=True)))
    return 0


async def cmd_hours_show(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        mine = acct.state.user.role == "therapist"
        if mine and not args.to:
            availability = await acct.api.availability()
        else:
            rels = await acct.api.relationships()
            rel = choose_relationship(rels, acct.state.user.id, args.to)
            availability = await acct.api.relationship_availability(rel.id)
        if args.json:
            print(json.dumps(availability.raw, indent=2, ensure_ascii=False))
        else:
            print("\n".join(availability_lines(availability, mine=mine)))
    return 0


async def cmd_away_add(args: argparse.Namespace) -> int:
    last = args.last_day or args.first_day
    if last < args.first_day:
        raise UsageError(f"the last day {last} is before the first day {args.first_day}")
    async with open_account(args) as acct:
        _therapist_only(acct.state.user.role, "records absences",
                        f"see `{PROG} hours show`")
        absence = await acct.api.add_absence(args.first_day, last, args.note)
        if args.json:
            print(json.dumps(absence.to_json(), indent=2, ensure_ascii=False))
        else:
            print(f"absence {absence.id}: {absence.first_day} to {absence.last_day} "
                  "(whole days in your office-hours zone); no alerts reach you then")
    return 0


async def cmd_away_list(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        _therapist_only(acct.state.user.role, "records absences",
                        f"`{PROG} hours show` lists your therapist's")
        absences = await acct.api.absences()
        if args.json:
            print(json.dumps([a.to_json() for a in absences], indent=2, ensure_ascii=False))
            return 0
        if not absences:
            print("no absences")
        for a in absences:
            note = f"  {a.note}" if a.note else ""
            print(f"{a.id}  {a.first_day} to {a.last_day}{note}")
    return 0


async def cmd_away_remove(args: argparse.Namespace) -> int:
    try:
        absence_id = uuid.UUID(args.id)
    except ValueError:
        raise UsageError(f"{args.id!r} is not an absence id; see `{PROG} away list`") from None
    async with open_account(args) as acct:
        _therapist_only(acct.state.user.role, "records absences",
                        f"see `{PROG} hours show`")
        await acct.api.remove_absence(absence_id)
        print(f"absence {absence_id} removed")
    return 0


async def cmd_agreement_show(args: argparse.Namespace) -> int:
    async with open_account(args) as acct:
        me = acct.state.user.id
        rel = choose_relationship(await acct.api.relationships(), me, args.client,
                                  option="--client")
        agreement = await acct.api.agreement(rel.id)
        if args.json:
            print(json.dumps(agreement.raw, indent=2, ensure_ascii=False))
        else:
            print("\n".join(agreement_lines(agreement, peer=peer_label(rel, me))))
    return 0


async def cmd_agreement_set(args: argparse.Namespace) -> int:
    changes = agreement_changes(args)
    async with open_account(args) as acct:
        _therapist_only(acct.state.user.role, "sets the agreement",
                        f"see `{PROG} agreement show`")
        me = acct.state.user.id
        rel = choose_relationship(await acct.api.relationships(), me, args.client,
                                  option="--client")
        agreement = await acct.api.set_agreement(rel.id, changes)
        if args.json:
            print(json.dumps(agreement.raw, indent=2, ensure_ascii=False))
        else:
            print("agreement updated; both of you see it now")
            print("\n".join(agreement_lines(agreement, peer=peer_label(rel, me))))
    return 0


# -- parsing ------------------------------------------------------------------------------

def _group(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
           help_: str) -> Callable[[str, Command, str], argparse.ArgumentParser]:
    parser = sub.add_parser(name, help=help_, description=help_)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, func: Command, help_: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    return action


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``hours``, ``away`` and ``agreement`` on the main parser's subcommands."""
    json_help = "print the server's answer as JSON"
    hours = _group(sub, "hours", "office hours: when alerts reach the therapist")
    p = hours("set", cmd_hours_set, "(therapist) set your weekly office hours")
    p.add_argument("spec", metavar="SPEC", help='e.g. "Mon-Thu 09:00-12:00,14:00-17:00; '
                   'Fri 09:00-13:00"; an end at or before the start runs past midnight '
                   '("Sat 22:00-02:00"); "" means no office hours at all')
    p.add_argument("--tz", required=True, help="your IANA time zone, e.g. Europe/Berlin")
    p.add_argument("--json", action="store_true", help=json_help)
    p = hours("show", cmd_hours_show, "show office hours, whether open now, the next "
              "opening and absences (a client sees their therapist's)")
    p.add_argument("--to", metavar="REL", help="(client) therapist email or relationship id, "
                   "needed only with more than one relationship")
    p.add_argument("--json", action="store_true", help=json_help)

    away = _group(sub, "away", "(therapist) absences: whole days without office hours")
    p = away("add", cmd_away_add, "add an absence, first and last day included")
    p.add_argument("first_day", metavar="FIRST_DAY", type=parse_day, help="YYYY-MM-DD")
    p.add_argument("last_day", metavar="LAST_DAY", type=parse_day, nargs="?",
                   help="YYYY-MM-DD (default: FIRST_DAY)")
    p.add_argument("--note", help="a short note, e.g. 'Winter break' (your clients see it)")
    p.add_argument("--json", action="store_true", help=json_help)
    p = away("list", cmd_away_list, "list your absences")
    p.add_argument("--json", action="store_true", help=json_help)
    p = away("remove", cmd_away_remove, "remove an absence")
    p.add_argument("id", metavar="ID", help="the absence id (see `away list`)")

    agreement = _group(sub, "agreement", "the agreement of a relationship: frequency, reply "
                       "window, urgency, quiet hours, crisis resources")
    client_help = ("the client's email or the relationship id (needed only with more than "
                   "one relationship)")
    p = agreement("show", cmd_agreement_show, "show the agreement (both sides see it)")
    p.add_argument("--client", "--to", dest="client", metavar="C", help=client_help)
    p.add_argument("--json", action="store_true", help=json_help)
    p = agreement("set", cmd_agreement_set, "(therapist) change the agreement with a client; "
                  "what is not given stays as it is")
    p.add_argument("--client", "--to", dest="client", metavar="C", help=client_help)
    p.add_argument("--checkins", metavar="N|unlimited", type=parse_checkins,
                   default=argparse.SUPPRESS,
                   help="check-ins agreed per period (0-1000), or 'unlimited'")
    p.add_argument("--per", choices=("week", "day"), help="the period of --checkins")
    p.add_argument("--reply-within", metavar="WINDOW", type=parse_reply_within,
                   help="'2 business days' or '8 office hours'")
    p.add_argument("--urgent", choices=("no-urgent", "urgent-in-hours", "urgent-anytime"),
                   help="what an urgent check-in may do")
    quiet = p.add_mutually_exclusive_group()
    quiet.add_argument("--quiet", metavar="HH:MM-HH:MM",
                       help="the client's quiet hours for reply alerts, e.g. 21:00-08:00")
    quiet.add_argument("--no-quiet", action="store_true", help="no quiet hours")
    p.add_argument("--client-tz", metavar="TZ", help="the client's IANA zone, with --quiet")
    crisis = p.add_mutually_exclusive_group()
    crisis.add_argument("--crisis", metavar="TEXT", help="crisis resources the client is "
                        "shown, instead of the practice's default")
    crisis.add_argument("--crisis-default", action="store_true",
                        help="return to the practice's default crisis resources")
    p.add_argument("--json", action="store_true", help=json_help)
