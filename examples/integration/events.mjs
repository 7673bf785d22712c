// Read crier's lifecycle events (channel_occupied, channel_vacated,
// member_added, member_removed, user_online, user_offline) as a consumer
// group, so each event reaches one worker of the group at least once, even
// if every worker was down when it happened (ioredis):
//   REDIS_URL=redis://127.0.0.1:6379 STREAM=crier:events GROUP=my-app CONSUMER=worker-1 node events.mjs
import Redis from 'ioredis';

const redis = new Redis(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379');
const stream = process.env.STREAM ?? 'crier:events'; // crier's events.stream (with its channel_prefix)
const group = process.env.GROUP ?? 'my-app';
const consumer = process.env.CONSUMER ?? 'worker-1'; // one name per worker, kept across restarts

// The group starts with every event still in the stream ('0'); '$' would
// start with the next one. Creating it again is harmless.
try {
  await redis.xgroup('CREATE', stream, group, '0', 'MKSTREAM');
} catch (e) {
  if (!String(e.message).includes('BUSYGROUP')) throw e;
}

function handle(event) {
  // Your work: start or stop a feed, mark a user online, clean up.
  console.log(JSON.stringify(event));
}

// First the events this worker took before a restart but never acknowledged,
// then new ones. An event is acknowledged once handled: at least once.
let pending = true;
for (;;) {
  const args = pending ? [] : ['BLOCK', 5000];
  const answer = await redis.xreadgroup('GROUP', group, consumer, 'COUNT', 100, ...args,
    'STREAMS', stream, pending ? '0' : '>');
  const entries = answer ? answer[0][1] : [];
  if (pending && entries.length === 0) {
    pending = false;
    continue;
  }
  for (const [id, flat] of entries) {
    const event = {};
    for (let i = 0; i < flat.length; i += 2) event[flat[i]] = flat[i + 1];
    handle(event);
    await redis.xack(stream, group, id);
  }
}
