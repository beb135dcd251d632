"""Sends one of each Segment call through the official Python library
(PyPI `segment-analytics-python`), unchanged, to the host in $SEGMENT_HOST.

Run by tests/segment_clients.rs. Environment:
  SEGMENT_HOST       base URL of the forwarder, e.g. http://127.0.0.1:8080
  SEGMENT_WRITE_KEY  write key
  SEGMENT_GZIP       "1" to let the library gzip its requests (off by default
                     in the library)

Besides one of each call it sends the largest event the library allows.
Every event but one carries a fixed messageId, so a second run must be
deduplicated; the last track lets the library assign its own id. Prints one
JSON line: the library's version and the messageIds of the events it sent.
Exits 1 when the library reports an error (it never raises on a failed
upload, it calls on_error).
"""

import datetime
import json
import os
import sys

import segment.analytics as analytics

errors = []


def on_error(error, batch):
    errors.append(f"{error} ({len(batch)} events)")


analytics.write_key = os.environ["SEGMENT_WRITE_KEY"]
analytics.host = os.environ["SEGMENT_HOST"]
analytics.gzip = os.environ.get("SEGMENT_GZIP") == "1"
analytics.on_error = on_error
# Fail fast in tests: the library's default is 10 retries with backoff.
analytics.max_retries = 1

user = "py-user"
account = "py-account"
when = datetime.datetime(2026, 1, 15, 10, 30, 0, 123000, tzinfo=datetime.timezone.utc)

sent = []


def record(result):
    ok, msg = result
    if not ok:
        errors.append(f"the library did not queue {msg.get('type')}")
    sent.append(msg["messageId"])


record(
    analytics.identify(
        user,
        {
            "email": "ada@example.com",
            "firstName": "Ada",
            "lastName": "Lovelace",
            "plan": "enterprise",
            "seats": 12,
            "beta": True,
            "accountExternalId": account,
        },
        message_id="py-identify-1",
    )
)
record(
    analytics.track(
        user,
        "Report Exported",
        {"quantity": 3, "description": "Q3 board report", "format": "pdf"},
        timestamp=when,
        message_id="py-track-1",
    )
)
record(
    analytics.group(
        user,
        account,
        {"name": "Analytical Engines Ltd", "employees": 42},
        message_id="py-group-1",
    )
)
record(analytics.page(user, name="Pricing", properties={"path": "/pricing"}, message_id="py-page-1"))
record(analytics.screen(user, name="Dashboard", message_id="py-screen-1"))
record(analytics.alias("py-anon", user, message_id="py-alias-1"))
record(
    analytics.track(
        anonymous_id="py-anon",
        event="Anonymous Click",
        timestamp=when,
        message_id="py-anon-track-1",
    )
)
# The largest event the library lets through: its own measure (json.dumps of
# the event, checked against MAX_MSG_SIZE = 32 KB, inclusive) is exactly the
# limit. The forwarder must take it too, although it stores more (receivedAt,
# sentAt).
LIBRARY_LIMIT = 32 << 10
dry_run = analytics.Client(analytics.write_key, send=False)


def largest(pad):
    properties = {"description": "at the library's size limit", "blob": "x" * pad}
    return dry_run.track(user, "Largest Event", properties, timestamp=when, message_id="py-largest-1")[1]


pad = LIBRARY_LIMIT - len(json.dumps(largest(0)).encode())
if len(json.dumps(largest(pad)).encode()) != LIBRARY_LIMIT:
    errors.append("could not build an event of exactly the library's limit")
try:
    largest(pad + 1)
    errors.append("the library accepted an event over its limit: the limit moved")
except RuntimeError:
    pass
event = largest(pad)
record(analytics.track(user, "Largest Event", event["properties"], timestamp=when, message_id="py-largest-1"))

# No message_id: the library assigns one (a uuid4), new on every run.
record(analytics.track(user, "Library Id", timestamp=when))

analytics.flush()
analytics.shutdown()

print(json.dumps({"library": "analytics-python", "version": analytics.VERSION, "message_ids": sent}))
if errors:
    print("errors: " + "; ".join(errors), file=sys.stderr)
    sys.exit(1)
