// Evaluates release-svc's features through the stock OpenFeature flagd web provider
// (@openfeature/flagd-web-provider: Connect with JSON over fetch, HTTP/1.1: ResolveAll for
// the context, EventStream for changes), and prints what it saw as JSON lines for
// tests/tests/flagd_connect.rs to check.
//
// Environment: FLAGD_HOST, FLAGD_PORT (a release-svc gRPC port: the main one or
// --flagd-listen), FLAGD_TLS=1 for https (NODE_EXTRA_CA_CERTS names the CA), FLAGD_TOKEN
// (optional bearer token, sent by an interceptor), FLAGD_ONCE=1 to stop after the first
// answers.
// Protocol with the test: prints {"phase":"before",...}; waits for a line on stdin (the test
// has changed the flags); prints {"phase":"after",...} once the provider reported the
// change, or after 20 s without one.
'use strict';

const web = require('@openfeature/web-sdk');
const { FlagdWebProvider } = require('@openfeature/flagd-web-provider');

const token = process.env.FLAGD_TOKEN;
// The provider's documented hook for headers: a Connect interceptor.
const interceptors = token
  ? [(next) => async (req) => {
      req.header.set('Authorization', `Bearer ${token}`);
      return next(req);
    }]
  : [];

function details(d) {
  return { value: d.value, reason: d.reason, variant: d.variant ?? null, error: d.errorCode ?? null };
}

function seen(client) {
  return {
    new_cart: details(client.getBooleanDetails('new-cart', false)),
    banner_text: details(client.getStringDetails('banner-text', 'code-default')),
    missing: details(client.getBooleanDetails('nope', true)),
  };
}

function nextLine() {
  return new Promise((resolve) => {
    process.stdin.once('data', () => resolve());
  });
}

async function main() {
  await web.OpenFeature.setContext({ targetingKey: 'u1' });
  const provider = new FlagdWebProvider({
    host: process.env.FLAGD_HOST,
    port: Number(process.env.FLAGD_PORT),
    tls: process.env.FLAGD_TLS === '1',
    maxRetries: 3,
    interceptors,
  });
  await web.OpenFeature.setProviderAndWait(provider);
  const client = web.OpenFeature.getClient();
  let changed = false;
  const seenChange = new Promise((resolve) => {
    client.addHandler(web.ProviderEvents.ConfigurationChanged, () => {
      changed = true;
      resolve();
    });
  });
  console.log(JSON.stringify({ phase: 'before', web: seen(client) }));
  if (process.env.FLAGD_ONCE === '1') {
    await web.OpenFeature.close();
    process.exit(0);
  }
  await nextLine();
  await Promise.race([seenChange, new Promise((r) => setTimeout(r, 20000))]);
  console.log(JSON.stringify({ phase: 'after', changed, web: seen(client) }));
  await web.OpenFeature.close();
  process.exit(0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
