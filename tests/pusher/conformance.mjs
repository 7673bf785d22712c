// A Pusher Channels conformance suite for any Pusher-compatible server
// (crier, Sockudo, Soketi, Reverb, Pusher itself), checked with the real,
// unmodified pusher-js and `pusher` server SDK. tests/pusher_conformance.rs
// runs it against crier; to run it against another server:
//
//   npm ci --prefix tests/pusher
//   PUSHER_HOST=127.0.0.1 PUSHER_PORT=6001 PUSHER_APP_ID=app-id \
//   PUSHER_APP_KEY=app-key PUSHER_APP_SECRET=app-secret \
//     node tests/pusher/conformance.mjs
//
// Environment:
//   PUSHER_HOST, PUSHER_PORT    where pusher-js connects (ws://host:port/app/key)
//   PUSHER_HTTP_PORT            the HTTP API's port (default: PUSHER_PORT)
//   PUSHER_APP_ID, PUSHER_APP_KEY, PUSHER_APP_SECRET
//   CONFORMANCE_ONLY            a comma-separated list of checks to run
//   CONFORMANCE_TIMEOUT_MS      how long one expectation may take (5000)
//
// The app must have client events and subscription counts enabled, and
// let anyone hear the channels the checks use (conf-…, cache-conf-…, and
// the private-, presence- and private-encrypted- ones, which are signed).
//
// Output: one JSON line per check, {"check", "ok", "detail"?}, then
// {"summary": {"passed", "failed"}}; the exit code is 0 when every check
// passed. Each check uses its own channels and users, so checks do not
// see each other's events.
import Pusher from 'pusher-js';
import PusherServer from 'pusher';

const env = process.env;
const host = env.PUSHER_HOST || '127.0.0.1';
const port = Number(env.PUSHER_PORT);
const httpPort = Number(env.PUSHER_HTTP_PORT || env.PUSHER_PORT);
const [appId, key, secret] = [env.PUSHER_APP_ID, env.PUSHER_APP_KEY, env.PUSHER_APP_SECRET];
const TIMEOUT = Number(env.CONFORMANCE_TIMEOUT_MS || 5000);
if (!port || !appId || !key || !secret) {
  console.error('set PUSHER_PORT, PUSHER_APP_ID, PUSHER_APP_KEY and PUSHER_APP_SECRET');
  process.exit(2);
}
const run = `${Date.now().toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`;
const encryptionMasterKeyBase64 = Buffer.from('conformance-master-key-32-bytes!').toString('base64');
const sdkWith = (s) => new PusherServer({
  appId, key, secret: s, host, port: String(httpPort), useTLS: false, encryptionMasterKeyBase64,
});
const sdk = sdkWith(secret);

class Failed extends Error {}
const fail = (why) => { throw new Failed(why); };
const check = (ok, why) => { if (!ok) fail(why); };
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

/// Resolves with the first emission of `event` on `target` within the
/// timeout, or fails saying `what`.
function once(target, event, what) {
  return handled(new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Failed(`timed out waiting for ${what}`)), TIMEOUT);
    const handler = (data, meta) => {
      clearTimeout(timer);
      target.unbind(event, handler);
      resolve({ data, meta });
    };
    target.bind(event, handler);
  }));
}

/// `promise`, marked as handled: a check that fails before awaiting it
/// does not end the suite with an unhandled rejection.
function handled(promise) {
  promise.catch(() => {});
  return promise;
}

const clients = [];
/// A pusher-js client as user `user`, connected: channel authorization
/// (and user authentication) signed by the SDK, as an app's endpoints do.
async function connect({ user = 'anonymous', watchlist, forge = false } = {}) {
  const client = new Pusher(key, {
    wsHost: host, wsPort: port, forceTLS: false, enabledTransports: ['ws'],
    disableStats: true, cluster: 'local',
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => {
        const member = channelName.startsWith('presence-')
          ? { user_id: user, user_info: { name: `User ${user}` } } : undefined;
        const answer = sdk.authorizeChannel(socketId, channelName, member);
        if (forge) answer.auth = answer.auth.replace(/:.*/, ':' + '0'.repeat(64));
        callback(null, answer);
      },
    },
    userAuthentication: {
      customHandler: ({ socketId }, callback) => {
        const data = { id: user };
        if (watchlist) data.watchlist = watchlist;
        callback(null, sdk.authenticateUser(socketId, data));
      },
    },
  });
  clients.push(client);
  if (client.connection.state !== 'connected') {
    await once(client.connection, 'connected', `${user} to connect`);
  }
  return client;
}

async function subscribe(client, name) {
  const channel = client.subscribe(name);
  const outcome = await Promise.race([
    once(channel, 'pusher:subscription_succeeded', `the subscription to ${name}`).then((r) => ['ok', r.data]),
    once(channel, 'pusher:subscription_error', `the subscription to ${name}`).then((r) => ['error', r.data]),
  ]);
  return { channel, outcome: outcome[0], data: outcome[1] };
}

async function subscribed(client, name) {
  const { channel, outcome, data } = await subscribe(client, name);
  check(outcome === 'ok', `subscribing to ${name} was refused: ${JSON.stringify(data)}`);
  return { channel, data };
}

/// Signs `client` in, and waits until pusher-js's subscription to the
/// user's channel is answered (before that, a server may drop what is
/// sent to the user).
async function signIn(client) {
  client.signin();
  await client.user.signinDonePromise;
  const channel = client.user.serverToUserChannel;
  check(channel, 'the sign-in was refused');
  if (!channel.subscribed) {
    await once(channel, 'pusher:subscription_succeeded', 'the user channel subscription');
  }
}

/// Resolves once `target` emits `event` with data `pred` accepts.
function until(target, event, pred, what) {
  return handled(new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Failed(`timed out waiting for ${what}`)), TIMEOUT);
    target.bind(event, (data) => {
      if (pred(data)) {
        clearTimeout(timer);
        resolve(data);
      }
    });
  }));
}

/// Collects what `target` hears of `event`.
function record(target, event) {
  const seen = [];
  target.bind(event, (data) => seen.push(data));
  return seen;
}

const checks = {
  async connects() {
    const c = await connect();
    check(/^\d+\.\d+$/.test(c.connection.socket_id), `socket_id ${c.connection.socket_id}`);
  },

  async public_channel_hears_a_trigger() {
    const c = await connect();
    const { channel } = await subscribed(c, `conf-pub-${run}`);
    const heard = once(channel, 'greeting', 'the event');
    await sdk.trigger(`conf-pub-${run}`, 'greeting', { hello: 'world' });
    const { data } = await heard;
    check(same(data, { hello: 'world' }), `data ${JSON.stringify(data)}`);
  },

  async private_channel_needs_a_valid_signature() {
    const good = await connect();
    const { channel } = await subscribed(good, `private-conf-${run}`);
    const heard = once(channel, 'secret', 'the event');
    await sdk.trigger(`private-conf-${run}`, 'secret', { n: 1 });
    await heard;
    // Refused as Pusher refuses it: a `pusher:error` on the connection
    // (Pusher, crier's 4009 aside) or a `pusher:subscription_error`.
    const forger = await connect({ forge: true });
    const channel2 = forger.subscribe(`private-conf-${run}`);
    const outcome = await Promise.race([
      once(channel2, 'pusher:subscription_succeeded', 'an answer').then(() => 'accepted'),
      once(channel2, 'pusher:subscription_error', 'an answer').then(() => 'refused'),
      once(forger.connection, 'error', 'an answer').then(() => 'refused'),
    ]);
    check(outcome === 'refused', 'a forged signature was accepted');
  },

  async presence_members_join_and_leave() {
    const name = `presence-conf-${run}`;
    const a = await connect({ user: `pa-${run}` });
    const first = await subscribed(a, name);
    check(first.channel.members.count === 1, `count ${first.channel.members.count}`);
    check(first.channel.members.me.id === `pa-${run}`, 'me');
    const added = once(first.channel, 'pusher:member_added', 'member_added');
    const b = await connect({ user: `pb-${run}` });
    const second = await subscribed(b, name);
    check(second.channel.members.count === 2, `count ${second.channel.members.count}`);
    const member = (await added).data;
    check(member.id === `pb-${run}` && member.info.name === `User pb-${run}`, JSON.stringify(member));
    const removed = once(first.channel, 'pusher:member_removed', 'member_removed');
    b.disconnect();
    check((await removed).data.id === `pb-${run}`, 'member_removed');
  },

  async client_events_reach_others_not_the_sender() {
    const name = `private-conf-client-${run}`;
    const a = await connect();
    const b = await connect();
    const ca = (await subscribed(a, name)).channel;
    const cb = (await subscribed(b, name)).channel;
    const mine = record(ca, 'client-typing');
    const heard = once(cb, 'client-typing', 'the client event');
    ca.trigger('client-typing', { who: 'a' });
    check(same((await heard).data, { who: 'a' }), 'data');
    const marker = once(ca, 'marker', 'the marker');
    await sdk.trigger(name, 'marker', {});
    await marker;
    check(mine.length === 0, 'the sender heard its own client event');
  },

  async socket_id_excludes_the_sender() {
    const name = `conf-exclude-${run}`;
    const a = await connect();
    const b = await connect();
    const ca = (await subscribed(a, name)).channel;
    const cb = (await subscribed(b, name)).channel;
    const excluded = record(ca, 'saved');
    const heard = once(cb, 'saved', 'the event');
    await sdk.trigger(name, 'saved', {}, { socket_id: a.connection.socket_id });
    await heard;
    const marker = once(ca, 'marker', 'the marker');
    await sdk.trigger(name, 'marker', {});
    await marker;
    check(excluded.length === 0, 'the excluded socket heard the event');
  },

  async batch_events_are_all_delivered() {
    const name = `conf-batch-${run}`;
    const c = await connect();
    const channel = (await subscribed(c, name)).channel;
    const one = once(channel, 'one', 'the first');
    const two = once(channel, 'two', 'the second');
    await sdk.triggerBatch([{ channel: name, name: 'one', data: { n: 1 } }, { channel: name, name: 'two', data: { n: 2 } }]);
    check((await one).data.n === 1 && (await two).data.n === 2, 'data');
  },

  async http_api_lists_channels_and_users() {
    const name = `presence-conf-api-${run}`;
    const c = await connect({ user: `api-${run}` });
    await subscribed(c, name);
    const info = await (await sdk.get({ path: `/channels/${name}`, params: { info: 'user_count' } })).json();
    check(info.occupied === true && info.user_count === 1, JSON.stringify(info));
    const listed = await (await sdk.get({ path: '/channels', params: { filter_by_prefix: 'presence-conf-api' } })).json();
    check(name in listed.channels, JSON.stringify(listed));
    const users = await (await sdk.get({ path: `/channels/${name}/users` })).json();
    check(same(users.users, [{ id: `api-${run}` }]), JSON.stringify(users));
  },

  async http_api_refuses_a_bad_signature() {
    const status = await sdkWith('not-the-secret-of-this-app').trigger(`conf-x-${run}`, 'x', {})
      .then((r) => r.status, (e) => e.status);
    check(status === 401, `status ${status}`);
  },

  async encrypted_channel_is_decrypted_by_the_client() {
    const name = `private-encrypted-conf-${run}`;
    const c = await connect();
    const channel = (await subscribed(c, name)).channel;
    const heard = once(channel, 'sealed', 'the event');
    await sdk.trigger(name, 'sealed', { text: 'for your eyes only' });
    check(same((await heard).data, { text: 'for your eyes only' }), 'data');
  },

  async cache_channel_sends_its_last_event_or_a_miss() {
    const name = `cache-conf-${run}`;
    await sdk.trigger(name, 'last', { n: 7 });
    const c = await connect();
    const channel = c.subscribe(name);
    const { data } = await once(channel, 'last', 'the last event on subscribe');
    check(data.n === 7, JSON.stringify(data));
    const empty = c.subscribe(`cache-conf-empty-${run}`);
    await once(empty, 'pusher:cache_miss', 'pusher:cache_miss');
  },

  async send_to_user_reaches_only_that_user() {
    const [ua, ub] = [`sa-${run}`, `sb-${run}`];
    const a1 = await connect({ user: ua });
    const a2 = await connect({ user: ua });
    const b = await connect({ user: ub });
    for (const c of [a1, a2, b]) await signIn(c);
    const heard = [once(a1.user, 'note', 'a1 to hear'), once(a2.user, 'note', 'a2 to hear')];
    const other = record(b.user, 'note');
    await sdk.sendToUser(ua, 'note', { n: 1 });
    await Promise.all(heard);
    const marker = once(b.user, 'marker', 'the marker');
    await sdk.sendToUser(ub, 'marker', {});
    await marker;
    check(other.length === 0, 'another user heard the event');
  },

  async terminate_closes_the_users_connections() {
    const user = `t-${run}`;
    const c = await connect({ user });
    const other = await connect({ user: `keep-${run}` });
    await signIn(c);
    const closed = once(c.connection, 'disconnected', 'the connection to close');
    const error = once(c.connection, 'error', 'pusher:error');
    await sdk.terminateUserConnections(user);
    const { data } = await error;
    check(data && data.data && data.data.code === 4009, `error ${JSON.stringify(data && data.data)}`);
    await closed;
    check(other.connection.state === 'connected', 'another user was closed');
  },

  async watchlist_hears_online_and_offline() {
    const watched = `w-${run}`;
    const watcher = await connect({ user: `watcher-${run}`, watchlist: [watched] });
    await signIn(watcher);
    const online = once(watcher.user.watchlist, 'online', 'online');
    const w = await connect({ user: watched });
    await signIn(w);
    check((await online).data.user_ids.includes(watched), 'online');
    const offline = once(watcher.user.watchlist, 'offline', 'offline');
    w.disconnect();
    check((await offline).data.user_ids.includes(watched), 'offline');
  },

  async subscription_count_is_sent_and_answered() {
    const name = `conf-count-${run}`;
    const a = await connect();
    const b = await connect();
    const channel = (await subscribed(a, name)).channel;
    const two = until(channel, 'pusher:subscription_count', (c) => c.subscription_count === 2,
      'pusher:subscription_count of 2');
    await subscribed(b, name);
    await two;
    const info = await (await sdk.get({ path: `/channels/${name}`, params: { info: 'subscription_count' } })).json();
    check(info.subscription_count === 2, JSON.stringify(info));
  },
};

const only = env.CONFORMANCE_ONLY ? env.CONFORMANCE_ONLY.split(',') : Object.keys(checks);
let passed = 0;
let failed = 0;
for (const name of only) {
  const line = { check: name };
  try {
    await checks[name]();
    line.ok = true;
    passed += 1;
  } catch (e) {
    line.ok = false;
    line.detail = e instanceof Failed ? e.message : String(e && e.stack || e);
    failed += 1;
  }
  for (const c of clients.splice(0)) c.disconnect();
  process.stdout.write(JSON.stringify(line) + '\n');
}
process.stdout.write(JSON.stringify({ summary: { passed, failed } }) + '\n');
process.exit(failed === 0 ? 0 : 1);
