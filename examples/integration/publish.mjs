// Publish two events to crier through Redis (ioredis):
//   REDIS_URL=redis://127.0.0.1:6379 CHANNEL=orders:7 node publish.mjs
import { Redis } from "ioredis";

const redis = new Redis(process.env.REDIS_URL ?? "redis://127.0.0.1:6379");
const channel = process.env.CHANNEL ?? "public:orders";
const prefix = process.env.CHANNEL_PREFIX ?? ""; // crier's redis.channel_prefix, if set
// With a channel_prefix the function is crier_publish_<name> (crier logs it at start).
const fn = process.env.PUBLISH_FUNCTION ?? "crier_publish";

// 1. Plain PUBLISH: live only. Clients connected now get it; it has no id and
//    is not kept, so a client that was away never sees it.
const reached = await redis.publish(prefix + channel, JSON.stringify({ type: "order.created", id: 1 }));
console.log(`PUBLISH reached ${reached} crier instance(s)`);

// 2. FCALL crier_publish (Redis >= 7, channel WITHOUT the prefix): on a channel
//    whose crier rule keeps history, the event is stored and clients that were
//    away get it when they come back. Returns the message id, or null on a
//    channel without history (then it is a plain PUBLISH).
const id = await redis.fcall(fn, 1, channel, JSON.stringify({ type: "order.created", id: 2 }));
console.log(`crier_publish id: ${id}`);

await redis.quit();
