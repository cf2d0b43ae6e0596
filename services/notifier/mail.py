"""Email channels: the two messages the notifier ever sends, and the SMTP client.

An alert email says only that there is something new and where to open
Interlude; a verification email carries only the code. Neither names a client,
a practice or anything that was written, whatever the notification was about.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr

import aiosmtplib

from services.notifier.senders import Claimed, DeliveryFailed
from shared.settings import SmtpSettings

ALERT_SUBJECT = "You have something new in Interlude"
CODE_SUBJECT = "Your Interlude verification code"
MAX_ADDRESS_LENGTH = 254
_ADDRESS = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")


def check_address(value: str) -> str:
    """``value`` as an address to send to, else :class:`ValueError`."""
    value = value.strip()
    if len(value) > MAX_ADDRESS_LENGTH or not _ADDRESS.match(value) \
            or any(unicodedata.category(ch).startswith("C") for ch in value) \
            or any(ch in value for ch in '<>,;"()[]\\'):
        raise ValueError("not an email address")
    local, _, domain = value.rpartition("@")
    return f"{local}@{domain.lower()}"


def _message(sender: str, to: str, subject: str, text: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    # The sender's domain, not this machine's name, in the Message-ID.
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    message["Message-ID"] = make_msgid(domain=domain)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    return message


def alert_message(sender: str, to: str, public_url: str | None) -> EmailMessage:
    """The one alert email: the same words for every kind of notification."""
    where = (f"Open Interlude to see it: {public_url}" if public_url
             else "Open the Interlude app to see it.")
    text = (
        "There is something new for you in Interlude.\n\n"
        f"{where}\n\n"
        "This email says nothing more on purpose: what is shared in Interlude stays\n"
        "in Interlude. You get these emails because you asked for them in Interlude's\n"
        "notification settings, where you can also turn them off.\n"
    )
    return _message(sender, to, ALERT_SUBJECT, text)


def code_message(sender: str, to: str, code: str, valid_minutes: int) -> EmailMessage:
    """The verification email: the code, how long it works, nothing else."""
    text = (
        f"Your Interlude verification code is: {code}\n\n"
        f"It works for {valid_minutes} minutes. If you did not ask for it, ignore\n"
        "this email and nothing will be sent to this address.\n"
    )
    return _message(sender, to, CODE_SUBJECT, text)


class Mailer:
    """Sends one message per call through the configured SMTP relay."""

    def __init__(self, smtp: SmtpSettings, public_url: str | None) -> None:
        self._smtp = smtp
        self._public_url = public_url

    @property
    def sender(self) -> str:
        return self._smtp.sender

    @property
    def max_seconds(self) -> float:
        # aiosmtplib's timeout applies per step (connect, TLS, each command);
        # the whole conversation gets a few of them.
        return self._smtp.timeout * 4

    async def send_message(self, message: EmailMessage) -> None:
        """Send ``message``; :class:`DeliveryFailed` (permanent for a 5xx refusal) if not."""
        smtp = self._smtp
        try:
            async with asyncio.timeout(self.max_seconds):
                await aiosmtplib.send(
                    message, hostname=smtp.host, port=smtp.port,
                    username=smtp.username, password=smtp.password,
                    use_tls=smtp.security == "tls",
                    start_tls=smtp.security == "starttls",
                    timeout=smtp.timeout,
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            raise DeliveryFailed(f"SMTP refused the address ({codes[0] if codes else '?'})",
                                 permanent=bool(codes) and all(c >= 500 for c in codes)) from None
        except aiosmtplib.SMTPResponseException as exc:
            # 5xx about the message (not the relay's own set-up) will not change on retry.
            permanent = exc.code >= 500 and isinstance(exc, aiosmtplib.SMTPDataError)
            raise DeliveryFailed(f"SMTP error {exc.code}", permanent=permanent) from None
        except TimeoutError:
            raise DeliveryFailed("the SMTP relay did not answer in time") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise DeliveryFailed(f"SMTP relay unreachable ({exc.__class__.__name__})") from None

    async def send(self, delivery: Claimed) -> None:
        if delivery.address is None:
            raise DeliveryFailed("the channel has no address", permanent=True)
        await self.send_message(alert_message(self._smtp.sender, delivery.address,
                                              self._public_url))
