# Publish two events to crier through Redis (the redis gem):
#   REDIS_URL=redis://127.0.0.1:6379 CHANNEL=orders:7 ruby publish.rb
require "json"
require "redis"

redis = Redis.new(url: ENV.fetch("REDIS_URL", "redis://127.0.0.1:6379"))
channel = ENV.fetch("CHANNEL", "public:orders")
prefix = ENV.fetch("CHANNEL_PREFIX", "") # crier's redis.channel_prefix, if set
# With a channel_prefix the function is crier_publish_<name> (crier logs it at start).
function = ENV.fetch("PUBLISH_FUNCTION", "crier_publish")

# 1. Plain PUBLISH: live only, no id, not kept.
reached = redis.publish(prefix + channel, { type: "order.created", id: 1 }.to_json)
puts "PUBLISH reached #{reached} crier instance(s)"

# 2. FCALL crier_publish (Redis >= 7, channel WITHOUT the prefix): kept in the
#    channel's history when its rule has one; returns the message id, or nil
#    on a channel without history.
id = redis.call("FCALL", function, 1, channel, { type: "order.created", id: 2 }.to_json)
puts "crier_publish id: #{id.inspect}"
