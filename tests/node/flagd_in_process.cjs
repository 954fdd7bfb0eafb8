// Evaluates cases through the stock OpenFeature Node SDK and flagd provider with its
// in-process resolver (flag definitions from flagd's sync protocol, evaluated locally), for
// tests/tests/flagd_sync.rs. Same protocol as tests/python/flagd_in_process.py.
//
// Environment: FLAGD_HOST, FLAGD_PORT, FLAGD_SELECTOR, CASES (a JSON file: a list of
// {"flag", "type": "boolean"|"string", "default", "targetingKey" (or null), "attributes"}).
// Prints one JSON line {"results": [{"value", "variant", "reason", "error"}], "seconds"};
// then for each stdin line {"flag", "type", "default", "want"} prints {"polling": flag} and
// resolves the flag every 2 ms until it answers `want`, then prints {"flag", "ms"}.
'use strict';

const fs = require('fs');
const readline = require('readline');
const { OpenFeature } = require('@openfeature/server-sdk');
const { FlagdProvider } = require('@openfeature/flagd-provider');

async function resolve(client, c) {
  const ctx = { ...(c.attributes || {}) };
  if (c.targetingKey !== null && c.targetingKey !== undefined) ctx.targetingKey = c.targetingKey;
  return c.type === 'boolean'
    ? client.getBooleanDetails(c.flag, c.default, ctx)
    : client.getStringDetails(c.flag, c.default, ctx);
}

async function main() {
  await OpenFeature.setProviderAndWait(new FlagdProvider({
    resolverType: 'in-process',
    host: process.env.FLAGD_HOST,
    port: Number(process.env.FLAGD_PORT),
    selector: process.env.FLAGD_SELECTOR,
    deadlineMs: 10000,
  }));
  const client = OpenFeature.getClient();
  const cases = JSON.parse(fs.readFileSync(process.env.CASES, 'utf8'));
  const started = process.hrtime.bigint();
  const results = [];
  for (const c of cases) {
    const d = await resolve(client, c);
    results.push({ value: d.value, variant: d.variant ?? null, reason: d.reason ?? null, error: d.errorCode ?? null });
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  console.log(JSON.stringify({ results, seconds }));
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    const wait = JSON.parse(line);
    const probe = { ...wait, targetingKey: null };
    if ((await resolve(client, probe)).value === wait.want) {
      console.log(JSON.stringify({ flag: wait.flag, error: 'already changed' }));
      process.exit(1);
    }
    console.log(JSON.stringify({ polling: wait.flag }));
    const t0 = process.hrtime.bigint();
    for (;;) {
      if ((await resolve(client, probe)).value === wait.want) break;
      if (Number(process.hrtime.bigint() - t0) / 1e9 > 30) {
        console.log(JSON.stringify({ flag: wait.flag, error: 'not seen within 30 s' }));
        process.exit(1);
      }
      await new Promise((r) => setTimeout(r, 2));
    }
    console.log(JSON.stringify({ flag: wait.flag, ms: Number(process.hrtime.bigint() - t0) / 1e6 }));
  }
  await OpenFeature.close();
  process.exit(0);
}

main().catch((e) => { console.error(e); process.exit(1); });
