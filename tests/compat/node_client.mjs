// Sends one of each Segment call through the official Node library
// (npm `@segment/analytics-node`, pinned in package-lock.json), unchanged, to
// the host in $SEGMENT_HOST.
//
// Run by tests/segment_clients.rs from a copy of tests/compat under
// target/test-deps/, beside the node_modules of `npm ci` (the harness installs it).
// Environment:
//   SEGMENT_HOST       base URL of the forwarder, e.g. http://127.0.0.1:8080
//   SEGMENT_WRITE_KEY  write key
//
// Every call but one carries a fixed messageId, so a second run must be
// deduplicated; the last track lets the library assign its own id. Prints one
// JSON line: the library's version and the messageIds of the events it sent.
// Exits 1 when the library reports a failed delivery (it never throws for
// one, it calls back with an error and emits `error`).

import { Analytics } from '@segment/analytics-node'

const analytics = new Analytics({
  writeKey: process.env.SEGMENT_WRITE_KEY,
  host: process.env.SEGMENT_HOST,
  // Fail fast in tests: the library's default is 10 retries with backoff.
  maxRetries: 1,
  // One batch for the whole run: the library's default flushAt is 15 events.
  flushAt: 20,
  flushInterval: 10000,
})

const errors = []
const sent = []
analytics.on('error', (err) => {
  errors.push(`${err.code}: ${err.reason}`)
})

// Records the messageId the library actually sent, the assigned one included.
const done = (err, ctx) => {
  if (err) errors.push(String(err))
  if (ctx) sent.push(ctx.event.messageId)
}

const userId = 'node-user'
const account = 'node-account'
const when = new Date('2026-01-15T10:30:00.123Z')

analytics.identify(
  {
    userId,
    messageId: 'node-identify-1',
    traits: {
      email: 'grace@example.com',
      firstName: 'Grace',
      lastName: 'Hopper',
      plan: 'enterprise',
      seats: 12,
      beta: true,
      accountExternalId: account,
    },
  },
  done,
)
analytics.track(
  {
    userId,
    event: 'Report Exported',
    messageId: 'node-track-1',
    timestamp: when,
    properties: { quantity: 3, description: 'Q3 board report', format: 'pdf' },
  },
  done,
)
analytics.group(
  {
    userId,
    groupId: account,
    messageId: 'node-group-1',
    traits: { name: 'Compiler Works Inc', employees: 42 },
  },
  done,
)
analytics.page(
  { userId, name: 'Pricing', properties: { path: '/pricing' }, messageId: 'node-page-1' },
  done,
)
analytics.screen({ userId, name: 'Dashboard', messageId: 'node-screen-1' }, done)
analytics.alias({ userId, previousId: 'node-anon', messageId: 'node-alias-1' }, done)
analytics.track(
  {
    anonymousId: 'node-anon',
    event: 'Anonymous Click',
    timestamp: when,
    messageId: 'node-anon-track-1',
  },
  done,
)
// No messageId: the library assigns one (node-next-<ms>-<uuid>), new on every run.
analytics.track({ userId, event: 'Library Id', timestamp: when }, done)

await analytics.closeAndFlush({ timeout: 30000 })

console.log(
  JSON.stringify({
    library: '@segment/analytics-node',
    version: analytics.VERSION,
    message_ids: sent,
  }),
)
if (errors.length > 0 || sent.length !== 8) {
  console.error(`errors: ${errors.join('; ')} (${sent.length} of 8 events called back)`)
  process.exit(1)
}
