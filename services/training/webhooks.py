"""Job webhooks: signed HTTP POSTs of a job's terminal state, retried with backoff.

Each delivery is a POST of the JSON body fixed at enqueue time (webhook_outbox.py) with:

* `X-Atelier-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`: signed
  per attempt (a fresh `t`), so receivers can verify the body and reject stale replays;
* `X-Atelier-Idempotency-Key: <job id>:<STATE>`: the same on every attempt;
* `X-Atelier-Event: training_job.<state>` and `Content-Type: application/json`.

Any 2xx is success; anything else (3xx included: redirects are not followed, so a POST is
never silently turned into a GET elsewhere), a timeout or a connection error is retried after
`webhook_backoff_seconds * 2**(attempt-1)` (capped at `webhook_max_backoff_seconds`) until
`webhook_max_attempts`, then the delivery is GAVE_UP (kept with its last error).
`WebhookDispatcher` runs in every training process (API and workers): whichever finds a due
row first sends it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

from sqlalchemy.engine import Engine

from services.common.background import DaemonThread
from services.common.config import Settings
from services.common.errors import InvalidInput
from services.training import webhook_outbox as outbox

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Atelier-Signature"
IDEMPOTENCY_HEADER = "X-Atelier-Idempotency-Key"
EVENT_HEADER = "X-Atelier-Event"
MAX_URL_CHARS = 2048
MIN_SECRET_CHARS, MAX_SECRET_CHARS = 16, 256
BATCH = 16


def validate_webhook(url: str, secret: str) -> tuple[str, str] | None:
    """(url, secret) for a job, None without a webhook; InvalidInput naming the field."""
    if not url:
        if secret:
            raise InvalidInput("webhook_secret", "set only together with webhook_url")
        return None
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput("webhook_url", f"at most {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("webhook_url", "must be an absolute http:// or https:// URL")
    if not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS:
        raise InvalidInput("webhook_secret", f"required with webhook_url: {MIN_SECRET_CHARS}-{MAX_SECRET_CHARS} "
                           "characters (the HMAC-SHA256 key receivers verify with)")
    return url, secret


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, tolerance_seconds: float = 300.0,
           now: float | None = None) -> bool:
    """Receiver-side check (also what the tests use): right MAC and a fresh timestamp."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), f"t={timestamp},v1={fields.get('v1', '')}")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a 3xx becomes an HTTPError: retried, never followed


def http_post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST and return the status code; raises OSError on connection problems."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


Poster = Callable[[str, bytes, dict[str, str], float], int]


class WebhookDispatcher:
    """Sends due deliveries from the job store; `run_forever` until `stop` is set."""

    def __init__(self, settings: Settings, engine: Engine, *, post: Poster = http_post,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._engine = engine
        self._post = post
        self._clock = clock
        self._thread = DaemonThread("atelier-webhooks", self.run_forever)
        self.stop = self._thread.stop

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float | None = 10.0) -> None:
        self._thread.close(timeout)

    def run_forever(self) -> None:
        while not self.stop.is_set():
            try:
                sent = self.run_once()
            except Exception:  # a database outage must not end the loop
                log.exception("webhook dispatcher error")
                sent = 0
            if not sent:
                self.stop.wait(self._settings.webhook_poll_seconds)

    def run_once(self) -> int:
        """Send every due delivery once; returns how many were attempted."""
        due = outbox.claim_due(self._engine, BATCH, self._settings.webhook_timeout_seconds)
        for delivery in due:
            self._attempt(delivery)
        return len(due)

    def _attempt(self, delivery: outbox.Delivery) -> None:
        event = delivery.idempotency_key.rsplit(":", 1)[-1].lower()
        headers = {"Content-Type": "application/json", "User-Agent": "atelier-webhooks/1",
                   SIGNATURE_HEADER: sign(delivery.secret, int(self._clock()), delivery.body),
                   IDEMPOTENCY_HEADER: delivery.idempotency_key, EVENT_HEADER: f"training_job.{event}"}
        try:
            status = self._post(delivery.url, delivery.body, headers, self._settings.webhook_timeout_seconds)
            error = "" if 200 <= status < 300 else f"HTTP {status}"
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections
            error = f"{type(exc).__name__}: {exc}"
        if not error:
            outbox.record_success(self._engine, delivery.id)
            log.info("webhook delivered", extra={"job_id": delivery.job_id, "attempt": delivery.attempts})
            return
        retry_in = self.backoff(delivery.attempts)
        outbox.record_failure(self._engine, delivery.id, error, retry_in)
        log.warning("webhook attempt failed", extra={"job_id": delivery.job_id, "attempt": delivery.attempts,
                                                     "error": error, "gave_up": retry_in is None})

    def backoff(self, attempts: int) -> float | None:
        """Delay before the next attempt after `attempts` failures; None once they are used up."""
        if attempts >= self._settings.webhook_max_attempts:
            return None
        delay = self._settings.webhook_backoff_seconds * (2 ** max(0, attempts - 1))
        return float(min(self._settings.webhook_max_backoff_seconds, delay))
