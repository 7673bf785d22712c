// Drives real, unmodified pusher-js clients and the `pusher` server SDK for
// tests/pusher.rs. Reads one JSON command per line on stdin and writes one
// JSON line per thing a client sees on stdout. It also serves the app's
// channel authorization endpoint, backed by the SDK's authorizeChannel,
// on a free port (printed first: {"type":"ready","auth_port":…}).
//
// Commands:
//   {"op":"connect","client":"a","port":…,"key":…,"user":"u1"?,
//    "signin"?:true,"watchlist"?:["u2"]}   (signs in as `user` once connected)
//   {"op":"subscribe","client":"a","channel":…,"bind"?:["client-x"]}
//   {"op":"unsubscribe","client":"a","channel":…}
//   {"op":"client_event","client":"a","channel":…,"event":"client-x","data":{…}}
//   {"op":"trigger","port":…,"channels":[…],"event":…,"data":…,"socket_id"?:…,"info"?:…,
//    "batch"?:[…],"secret"?:…,"clock_offset_ms"?:…}
//   {"op":"get","port":…,"path":…,"params":{…}}
//   {"op":"send_to_user","tag":…,"port":…,"user":…,"event":…,"data":…}
//   {"op":"terminate","tag":…,"port":…,"user":…}
//   {"op":"disconnect","client":"a"}
import http from 'node:http';
import readline from 'node:readline';
import Pusher from 'pusher-js';
import PusherServer from 'pusher';
import WebSocket from 'ws';

const [appId, key, secret] = [process.env.APP_ID, process.env.APP_KEY, process.env.APP_SECRET];
if (process.env.PUSHER_WEBSOCKET === 'ws') {
  // pusher-js in Node speaks through its bundled faye-websocket, which
  // offers no extension; the `ws` library offers permessage-deflate, as
  // browsers do. pusher-js itself is unmodified: only its runtime's
  // WebSocket constructor is swapped.
  Pusher.Runtime.getWebSocketAPI = () => WebSocket;
}
const out = (line) => process.stdout.write(JSON.stringify(line) + '\n');
const clients = new Map();
const users = new Map(); // socket_id -> user, for presence channel_data
const watchlists = new Map(); // socket_id -> watchlist, for user authentication
// The app's master key for `private-encrypted-` channels: the SDK
// encrypts what it triggers there and hands subscribers their channel's
// key in the authorization; crier only relays.
const encryptionMasterKeyBase64 = Buffer.from('secret-key-of-32-bytes-for-tests').toString('base64');
const server = (port) => new PusherServer({
  appId, key, secret, host: '127.0.0.1', port: String(port), useTLS: false, encryptionMasterKeyBase64,
});
let forge = false;

// The app's auth endpoint, as a Laravel or Express app would have it.
const auth = http.createServer((req, res) => {
  let body = '';
  req.on('data', (c) => { body += c; });
  req.on('end', () => {
    const params = new URLSearchParams(body);
    const socketId = params.get('socket_id');
    if (req.url.startsWith('/pusher/user-auth')) {
      // User authentication (`pusher.signin()`), by the SDK's authenticateUser.
      const user = { id: users.get(socketId) || 'anonymous' };
      const watchlist = watchlists.get(socketId);
      if (watchlist && watchlist.length) user.watchlist = watchlist;
      res.writeHead(200, { 'content-type': 'application/json' });
      return res.end(JSON.stringify(server(0).authenticateUser(socketId, user)));
    }
    const channel = params.get('channel_name');
    const sdk = server(0);
    let answer;
    if (channel.startsWith('presence-')) {
      const user = users.get(socketId) || 'anonymous';
      answer = sdk.authorizeChannel(socketId, channel, { user_id: user, user_info: { name: `User ${user}` } });
    } else {
      answer = sdk.authorizeChannel(socketId, channel);
    }
    if (forge || channel.includes('forged')) {
      answer.auth = answer.auth.replace(/:.*/, ':' + '0'.repeat(64));
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(answer));
  });
});
auth.listen(0, '127.0.0.1', () => out({ type: 'ready', auth_port: auth.address().port }));

function connect(cmd) {
  const client = new Pusher(cmd.key || key, {
    wsHost: '127.0.0.1', wsPort: cmd.port, forceTLS: false, enabledTransports: ['ws'],
    disableStats: true, cluster: 'local',
    channelAuthorization: { endpoint: `http://127.0.0.1:${auth.address().port}/broadcasting/auth`, transport: 'ajax' },
    userAuthentication: { endpoint: `http://127.0.0.1:${auth.address().port}/pusher/user-auth`, transport: 'ajax' },
  });
  const name = cmd.client;
  clients.set(name, { client, user: cmd.user });
  client.connection.bind('state_change', ({ current }) => {
    if (current === 'connected') {
      users.set(client.connection.socket_id, cmd.user);
      watchlists.set(client.connection.socket_id, cmd.watchlist);
    }
    out({ client: name, type: 'state', state: current, socket_id: client.connection.socket_id });
  });
  // A `pusher:error` carries data ({code, message}); a transport's error
  // (a socket reset) only a type and a socket object, not JSON.
  client.connection.bind('error', (e) => out({ client: name, type: 'error', error: e && (e.data || { type: e.type, message: String(e.error && e.error.message || e.error) }) }));
  client.bind_global((event, data) => {
    if (event.startsWith('pusher:') && event !== 'pusher:error') return;
    out({ client: name, type: 'global', event, data });
  });
  client.connection.bind('message', (m) => {
    if (m.event === 'pusher:signin_success') out({ client: name, type: 'signed_in', user_data: JSON.parse(m.data.user_data) });
  });
  // What reaches the signed-in user (`sendToUser`) and its watchlist.
  client.user.bind_global((event, data) => out({ client: name, type: 'user_event', event, data }));
  for (const change of ['online', 'offline']) {
    client.user.watchlist.bind(change, (e) => out({ client: name, type: 'watchlist', name: change, user_ids: e.user_ids }));
  }
  if (cmd.signin) client.signin();
}

function subscribe(cmd) {
  const { client } = clients.get(cmd.client);
  const channel = client.subscribe(cmd.channel);
  channel.bind('pusher:subscription_succeeded', (data) => {
    const members = data && data.members ? Object.keys(data.members).sort() : undefined;
    out({ client: cmd.client, type: 'subscribed', channel: cmd.channel, members, count: data && data.count });
  });
  channel.bind('pusher:subscription_error', (data) => out({ client: cmd.client, type: 'subscription_error', channel: cmd.channel, data }));
  channel.bind('pusher:member_added', (m) => out({ client: cmd.client, type: 'member_added', channel: cmd.channel, user: m.id }));
  channel.bind('pusher:member_removed', (m) => out({ client: cmd.client, type: 'member_removed', channel: cmd.channel, user: m.id }));
  // Events bound by name get the metadata pusher-js passes (user_id).
  for (const name of cmd.bind || []) {
    channel.bind(name, (data, meta) => out({ client: cmd.client, type: 'bound', channel: cmd.channel, event: name, data, user_id: meta && meta.user_id }));
  }
  channel.bind('pusher:cache_miss', () => out({ client: cmd.client, type: 'cache_miss', channel: cmd.channel }));
  channel.bind('pusher:subscription_count', (d) => out({ client: cmd.client, type: 'subscription_count', channel: cmd.channel, count: d.subscription_count }));
  channel.bind_global((event, data, meta) => {
    if (event.startsWith('pusher:')) return;
    out({ client: cmd.client, type: 'event', channel: cmd.channel, event, data, user_id: meta && meta.user_id });
  });
}

async function run(cmd) {
  switch (cmd.op) {
    case 'connect': return connect(cmd);
    case 'subscribe': return subscribe(cmd);
    case 'unsubscribe': return clients.get(cmd.client).client.unsubscribe(cmd.channel);
    case 'client_event': {
      const ok = clients.get(cmd.client).client.channel(cmd.channel).trigger(cmd.event, cmd.data);
      return out({ type: 'client_event_sent', client: cmd.client, ok });
    }
    case 'disconnect': return clients.get(cmd.client).client.disconnect();
    case 'trigger': {
      // A client whose clock is off: the SDK signs with Date.now().
      const realNow = Date.now;
      if (cmd.clock_offset_ms) Date.now = () => realNow() + cmd.clock_offset_ms;
      const sdk = server(cmd.port);
      const sdkOf = cmd.secret ? new PusherServer({ appId, key, secret: cmd.secret, host: '127.0.0.1', port: String(cmd.port), useTLS: false }) : sdk;
      try {
        const res = cmd.batch
          ? await sdkOf.triggerBatch(cmd.batch)
          : await sdkOf.trigger(cmd.channels, cmd.event, cmd.data, cmd.socket_id ? { socket_id: cmd.socket_id, info: cmd.info } : (cmd.info ? { info: cmd.info } : undefined));
        return out({ type: 'triggered', tag: cmd.tag, status: res.status, body: await res.json() });
      } catch (e) {
        return out({ type: 'triggered', tag: cmd.tag, status: e.status, body: e.body });
      } finally {
        Date.now = realNow;
      }
    }
    case 'get': {
      try {
        const res = await server(cmd.port).get({ path: cmd.path, params: cmd.params || {} });
        return out({ type: 'got', tag: cmd.tag, status: res.status, body: await res.json() });
      } catch (e) {
        return out({ type: 'got', tag: cmd.tag, status: e.status, body: e.body });
      }
    }
    case 'send_to_user':
    case 'terminate': {
      const sdk = server(cmd.port);
      try {
        const res = cmd.op === 'terminate'
          ? await sdk.terminateUserConnections(cmd.user)
          : await sdk.sendToUser(cmd.user, cmd.event, cmd.data);
        return out({ type: 'sent', tag: cmd.tag, status: res.status, body: await res.json() });
      } catch (e) {
        return out({ type: 'sent', tag: cmd.tag, status: e.status, body: e.body });
      }
    }
    default: return out({ type: 'bad_command', cmd });
  }
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  run(JSON.parse(line)).catch((e) => out({ type: 'driver_error', error: String(e) }));
});
process.stdin.on('end', () => process.exit(0));
