# Publish two events to crier through Redis (redis-py):
#   REDIS_URL=redis://127.0.0.1:6379 CHANNEL=orders:7 python3 publish.py
import json
import os

import redis

r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
                         decode_responses=True)
channel = os.environ.get("CHANNEL", "public:orders")
prefix = os.environ.get("CHANNEL_PREFIX", "")  # crier's redis.channel_prefix, if set
# With a channel_prefix the function is crier_publish_<name> (crier logs it at start).
function = os.environ.get("PUBLISH_FUNCTION", "crier_publish")

# 1. Plain PUBLISH: live only. Clients connected now get it; it has no id and
#    is not kept, so a client that was away never sees it.
reached = r.publish(prefix + channel, json.dumps({"type": "order.created", "id": 1}))
print(f"PUBLISH reached {reached} crier instance(s)")

# 2. FCALL crier_publish (Redis >= 7, channel WITHOUT the prefix): on a channel
#    whose crier rule keeps history, the event is stored and clients that were
#    away get it when they come back. Returns the message id, or None on a
#    channel without history (then it is a plain PUBLISH).
msg_id = r.fcall(function, 1, channel, json.dumps({"type": "order.created", "id": 2}))
print(f"crier_publish id: {msg_id}")
