# Read crier's lifecycle events (channel_occupied, channel_vacated,
# member_added, member_removed, user_online, user_offline) as a consumer
# group, so each event reaches one worker of the group at least once, even
# if every worker was down when it happened (redis-py):
#   REDIS_URL=redis://127.0.0.1:6379 STREAM=crier:events GROUP=my-app CONSUMER=worker-1 python3 events.py
import json
import os

import redis

r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
                         decode_responses=True)
stream = os.environ.get("STREAM", "crier:events")  # crier's events.stream (with its channel_prefix)
group = os.environ.get("GROUP", "my-app")
consumer = os.environ.get("CONSUMER", "worker-1")  # one name per worker, kept across restarts

# The group starts with every event still in the stream ("0"); "$" would
# start with the next one. Creating it again is harmless.
try:
    r.xgroup_create(stream, group, id="0", mkstream=True)
except redis.ResponseError as e:
    if "BUSYGROUP" not in str(e):
        raise


def handle(event):
    # Your work: start or stop a feed, mark a user online, clean up.
    print(json.dumps(event), flush=True)


# First the events this worker took before a restart but never acknowledged,
# then new ones. An event is acknowledged once handled: at least once.
pending = True
while True:
    start = "0" if pending else ">"
    answer = r.xreadgroup(group, consumer, {stream: start}, count=100,
                          block=None if pending else 5000)
    entries = answer[0][1] if answer else []
    if pending and not entries:
        pending = False
        continue
    for entry_id, fields in entries:
        handle(fields)
        r.xack(stream, group, entry_id)
