// Drives headless Chromium for tests/browser_clients.rs: opens the test
// page (served from its own origin) once per delivery strategy, lets the
// page's analytics.js send its calls, and prints what the browser saw of
// every request to the forwarder as one JSON line on stdout.
//
// Environment: DEPS_DIR (where `npm ci` put node_modules), CHROMIUM,
// PAGE_URL, FORWARDER (origin of the forwarder), PROFILE_DIR (a fresh
// directory for each run's --user-data-dir).
import { createRequire } from 'node:module'
import { mkdtempSync } from 'node:fs'
import { join } from 'node:path'

const require = createRequire(join(process.env.DEPS_DIR, 'node_modules', 'x.js'))
const { chromium } = require('playwright-core')

const args = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
]

const result = {}
// Two passes of page.html (one per delivery strategy), then the README's
// snippet as written (snippet.html).
for (const strategy of ['standard', 'batching', 'snippet']) {
  const profile = mkdtempSync(join(process.env.PROFILE_DIR, `${strategy}-`))
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM,
    headless: true,
    args,
  })
  const seen = []
  const failed = []
  const consoleErrors = []
  const page = context.pages()[0] ?? (await context.newPage())
  page.on('response', (r) => {
    if (r.url().startsWith(process.env.FORWARDER)) {
      seen.push({ method: r.request().method(), path: new URL(r.url()).pathname, status: r.status() })
    }
  })
  page.on('requestfailed', (r) => failed.push({ url: r.url(), error: r.failure()?.errorText }))
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()) })
  page.on('pageerror', (e) => consoleErrors.push(String(e)))
  const url = strategy === 'snippet'
    ? `${process.env.PAGE_URL}snippet.html`
    : `${process.env.PAGE_URL}?strategy=${strategy}`
  await page.goto(url)
  const outcome = await page.waitForFunction(() => window.__done, null, { timeout: 30000 })
    .then((h) => h.jsonValue())
  // The snippet's calls return nothing to wait on: wait for their answers.
  const deadline = Date.now() + 20000
  while (seen.filter((x) => x.method === 'POST').length < (outcome.posts ?? 0) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50))
  }
  result[strategy] = { outcome, seen, failed, consoleErrors }
  await context.close()
}
console.log(JSON.stringify(result))
