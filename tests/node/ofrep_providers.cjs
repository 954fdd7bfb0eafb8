// Evaluates release-svc's features through the stock OpenFeature OFREP providers for Node:
// the server provider (@openfeature/ofrep-provider: one POST per evaluation) and the web
// provider (@openfeature/ofrep-web-provider: the bulk endpoint, then polling with ETags),
// and prints what they saw as JSON lines for tests/tests/ofrep.rs to check.
//
// Environment: OFREP_URL (release-svc's OFREP base URL), OFREP_TOKEN (optional bearer token).
// Protocol with the test: prints {"phase":"before",...}; waits for a line on stdin (the test
// has changed the flags); prints {"phase":"after",...} once the web provider reported the
// change, or after 20 s without one.
'use strict';

const server = require('@openfeature/server-sdk');
const { OFREPProvider } = require('@openfeature/ofrep-provider');
const web = require('@openfeature/web-sdk');
const { OFREPWebProvider } = require('@openfeature/ofrep-web-provider');

const baseUrl = process.env.OFREP_URL;
const headers = process.env.OFREP_TOKEN ? [['Authorization', `Bearer ${process.env.OFREP_TOKEN}`]] : [];

function details(d) {
  return { value: d.value, reason: d.reason, variant: d.variant ?? null, error: d.errorCode ?? null };
}

async function serverSide() {
  await server.OpenFeature.setProviderAndWait(new OFREPProvider({ baseUrl, headers }));
  const client = server.OpenFeature.getClient();
  const user = { targetingKey: 'u1' };
  return {
    new_cart: details(await client.getBooleanDetails('new-cart', false, user)),
    banner_text: details(await client.getStringDetails('banner-text', 'code-default', user)),
    old_thing: details(await client.getBooleanDetails('old-thing', true, user)),
    missing: details(await client.getBooleanDetails('nope', true, user)),
    mismatch: details(await client.getNumberDetails('banner-text', 7, user)),
  };
}

function webSide(client) {
  return {
    new_cart: details(client.getBooleanDetails('new-cart', false)),
    banner_text: details(client.getStringDetails('banner-text', 'code-default')),
    old_thing: details(client.getBooleanDetails('old-thing', true)),
    missing: details(client.getBooleanDetails('nope', true)),
  };
}

function nextLine() {
  return new Promise((resolve) => {
    process.stdin.once('data', () => resolve());
  });
}

async function main() {
  const before = { phase: 'before', server: await serverSide() };
  await web.OpenFeature.setContext({ targetingKey: 'u1' });
  const provider = new OFREPWebProvider({ baseUrl, headers, pollInterval: 200 });
  await web.OpenFeature.setProviderAndWait(provider);
  const client = web.OpenFeature.getClient();
  before.web = webSide(client);
  let changed = false;
  const seenChange = new Promise((resolve) => {
    client.addHandler(web.ProviderEvents.ConfigurationChanged, () => {
      changed = true;
      resolve();
    });
  });
  console.log(JSON.stringify(before));
  await nextLine();
  await Promise.race([seenChange, new Promise((r) => setTimeout(r, 20000))]);
  console.log(JSON.stringify({ phase: 'after', changed, web: webSide(client), server: await serverSide() }));
  await web.OpenFeature.close();
  await server.OpenFeature.close();
  process.exit(0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
