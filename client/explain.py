"""Plain words for boundaries: what sending means, office hours, agreements, notifications.

Pure functions from the server's answers to lines of text; nothing here talks to
the network. Instants are shown in the reader's local zone (``local``; None is
this machine's zone) and, where the therapist's zone differs, in theirs too.
"""

from __future__ import annotations

import textwrap
from datetime import datetime, tzinfo
from typing import Any

from client.terms import Agreement, Availability, Expectation
from shared.schedule_parse import ScheduleError, load_zone

BOX_WIDTH = 72

URGENT_POLICIES = {
    "no-urgent": "the urgent flag changes nothing: alerts follow office hours and the "
                 "agreed frequency",
    "urgent-in-hours": "an urgent check-in alerts at once inside office hours, even beyond "
                       "the agreed frequency; outside them it waits for the next opening",
    "urgent-anytime": "an urgent check-in alerts at once, even outside office hours",
}


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _zone(tz: str | None) -> tzinfo | None:
    if not tz:
        return None
    try:
        return load_zone(tz)
    except ScheduleError:
        return None


def instant(iso: str | None, *, local: tzinfo | None = None, other_tz: str | None = None,
            other_label: str = "your therapist's time") -> str:
    """``Wed 16 Dec 2026, 10:00 CET``, plus the time in ``other_tz`` when it reads differently."""
    if not iso:
        return "-"
    try:
        at = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    mine = at.astimezone(local)
    text = mine.strftime("%a %d %b %Y, %H:%M %Z")
    zone = _zone(other_tz)
    if zone is not None:
        theirs = at.astimezone(zone)
        if theirs.utcoffset() != mine.utcoffset():
            same_day = theirs.date() == mine.date()
            shown = theirs.strftime("%H:%M %Z" if same_day else "%a %d %b, %H:%M %Z")
            text += f" ({shown}, {other_label}, {other_tz})"
    return text


def crisis_box(text: str, width: int = BOX_WIDTH) -> list[str]:
    """The crisis resources as a boxed block that stands out in a terminal."""
    inner = width - 4
    body = ["IF YOU CANNOT WAIT", ""]
    for paragraph in text.splitlines() or [""]:
        body.extend(textwrap.wrap(paragraph, inner, break_long_words=True) or [""])
    rule = "+" + "-" * (width - 2) + "+"
    return [rule, *(f"| {line.ljust(inner)} |" for line in body), rule]


def expectation_lines(exp: Expectation, *, local: tzinfo | None = None,
                      therapist_tz: str | None = None) -> list[str]:
    """What a client is told after sending a check-in, one sentence a line."""
    def at(iso: str | None) -> str:
        return instant(iso, local=local, other_tz=therapist_tz)

    lines = []
    if exp.alert == "now":
        why = " (urgent)" if exp.reason == "urgent" else ""
        lines.append(f"Your therapist is being alerted now{why}.")
    elif exp.alert == "never":
        lines.append("No one will be alerted: your therapist has no office hours ahead, so "
                     "this check-in waits until they set new hours.")
    elif exp.reason == "beyond_agreement":
        lines.append(f"Your therapist will be alerted at {at(exp.alert_at)}, in their next "
                     "digest.")
    else:
        lines.append(f"Your therapist will be alerted at {at(exp.alert_at)}, when their "
                     "office hours next open.")
    if exp.urgent and exp.alert != "now":
        lines.append("Marking it urgent does not alert your therapist sooner under your "
                     "agreement.")
    if exp.reply_by:
        lines.append(f"Expect a reply by {at(exp.reply_by)}.")
    elif exp.alert != "now":
        lines.append("There is no reply-by time while your therapist has no office hours "
                     "ahead.")
    if exp.allowed is None:
        lines.append(f"Check-in {exp.used} this {exp.period}; your agreement sets no limit.")
    elif exp.within_agreement:
        lines.append(f"Check-in {exp.used} of {exp.allowed} agreed this {exp.period}: within "
                     "the agreement.")
    else:
        tail = ("its alert waits for the next digest" if exp.alert != "now"
                else "it is shown to your therapist as usual")
        lines.append(f"Check-in {exp.used} of {exp.allowed} agreed this {exp.period}: beyond "
                     f"the agreement. It is still accepted and stored; {tail}.")
    return lines


def reply_lines(*, held: bool, release_at: str | None, deliver_now: bool, client: str,
                local: tzinfo | None = None) -> list[str]:
    """What a therapist is told after sending a reply."""
    if held:
        return [f"Held: you are outside your office hours, so {client} receives it at "
                f"{instant(release_at, local=local)}, when your hours next open.",
                "To deliver a reply at once, send it with --now."]
    if deliver_now:
        return [f"Delivered now, as asked: {client} can read it at once."]
    return [f"Delivered now: {client} can read it at once."]


def availability_lines(av: Availability, *, mine: bool, local: tzinfo | None = None
                       ) -> list[str]:
    """Office hours as the therapist (``mine``) or their client reads them."""
    who = "you" if mine else "your therapist"
    if not av.set:
        lines = [f"No office hours set: alerts reach {who} at any time."]
        if mine:
            lines.append('Set them with: interlude-client hours set "Mon-Fri 09:00-17:00" '
                         "--tz Europe/Berlin")
        return lines
    if av.empty:
        if mine:
            lines = [f"Office hours: none ({av.tz}). You are not alerted to check-ins until "
                     "you set hours again; clients are told no one will be alerted."]
        else:
            lines = [f"Office hours: none ({av.tz}). Your therapist is not alerted to "
                     "check-ins until they set hours again."]
    else:
        lines = [f"Office hours ({av.tz}): {av.spec}"]
        if av.open_now:
            lines.append("Open now: yes.")
        elif av.next_open:
            label = "office-hours time" if mine else "your therapist's time"
            shown = instant(av.next_open, local=local, other_tz=av.tz, other_label=label)
            lines.append(f"Open now: no. Next opening: {shown}.")
        else:
            lines.append("Open now: no. No opening within the next year.")
    if av.absences:
        lines.append("Absences:")
        for absence in av.absences:
            span = absence.first_day if absence.first_day == absence.last_day else \
                f"{absence.first_day} to {absence.last_day}"
            note = f"  {absence.note}" if absence.note else ""
            ident = f"  (id {absence.id})" if mine else ""
            lines.append(f"  {span}{note}{ident}")
    else:
        lines.append("Absences: none.")
    return lines


def agreement_lines(ag: Agreement, *, peer: str) -> list[str]:
    """The agreement of one relationship, for either side."""
    if ag.checkins_allowed is None:
        checkins = f"no limit (counted per {ag.checkin_period})"
    else:
        checkins = f"{ag.checkins_allowed} per {ag.checkin_period}"
    unit = "business day" if ag.reply_unit == "business_days" else "office hour"
    urgent = URGENT_POLICIES.get(ag.urgent_policy, "")
    quiet = "none" if ag.quiet_hours is None else (
        f"{ag.quiet_hours.start}-{ag.quiet_hours.end} {ag.quiet_hours.tz} (reply alerts to "
        "the client wait until they end)")
    source = "set for this relationship" if ag.crisis_resources else "the practice's default"
    lines = [
        f"Agreement with {peer} (version {ag.version})",
        f"  check-ins:        {checkins}",
        f"  reply within:     {_plural(ag.reply_amount, unit)}",
        f"  urgent:           {ag.urgent_policy}" + (f": {urgent}" if urgent else ""),
        f"  quiet hours:      {quiet}",
        f"  crisis resources ({source}):",
    ]
    for paragraph in (ag.crisis_resources_effective or "-").splitlines():
        lines.extend(textwrap.wrap(paragraph, BOX_WIDTH - 4, initial_indent="    ",
                                   subsequent_indent="    ") or [""])
    return lines


def digest_text(details: dict[str, Any] | None) -> str:
    """``3 new check-ins from 2 clients, 1 beyond the agreement, 1 urgent``."""
    details = details or {}
    checkins, clients = int(details.get("checkins") or 0), int(details.get("clients") or 0)
    text = f"{_plural(checkins, 'new check-in')} from {_plural(clients, 'client')}"
    beyond, urgent = int(details.get("beyond_agreement") or 0), int(details.get("urgent") or 0)
    if beyond:
        text += f", {beyond} beyond the agreement"
    if urgent:
        text += f", {urgent} urgent"
    return text


def notification_text(kind: str, actor: str | None, details: dict[str, Any] | None, *,
                      local: tzinfo | None = None) -> str:
    """One feed item in words (never content: the server has none)."""
    someone = actor or "someone"
    if kind == "checkin.received":
        return f"new check-in from {someone}"
    if kind == "reply.received":
        return f"new reply from {someone}"
    if kind == "digest":
        return f"digest: {digest_text(details)}"
    if kind == "reminder.reply_due":
        due = instant((details or {}).get("reply_by"), local=local)
        return f"reminder: a reply to {someone} is due by {due}"
    return f"{kind} from {someone}"
