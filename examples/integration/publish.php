<?php
// Publish two events to crier through Redis (the phpredis extension):
//   REDIS_URL=redis://127.0.0.1:6379 CHANNEL=orders:7 php publish.php
$url = parse_url(getenv('REDIS_URL') ?: 'redis://127.0.0.1:6379');
$redis = new Redis();
$redis->connect($url['host'], $url['port'] ?? 6379);
if (isset($url['pass'])) {
    $pass = rawurldecode($url['pass']);
    $redis->auth(isset($url['user']) ? [rawurldecode($url['user']), $pass] : $pass);
}
$channel = getenv('CHANNEL') ?: 'public:orders';
$prefix = getenv('CHANNEL_PREFIX') ?: ''; // crier's redis.channel_prefix, if set
// With a channel_prefix the function is crier_publish_<name> (crier logs it at start).
$function = getenv('PUBLISH_FUNCTION') ?: 'crier_publish';

// 1. Plain PUBLISH: live only, no id, not kept.
$reached = $redis->publish($prefix . $channel, json_encode(['type' => 'order.created', 'id' => 1]));
echo "PUBLISH reached $reached crier instance(s)\n";

// 2. FCALL crier_publish (Redis >= 7, channel WITHOUT the prefix): kept in the
//    channel's history when its rule has one; returns the message id, or a nil
//    reply (false in phpredis) on a channel without history.
//    With Predis 2: $client->fcall($function, [$channel], $payload).
$id = $redis->rawCommand('FCALL', $function, 1, $channel,
                         json_encode(['type' => 'order.created', 'id' => 2]));
echo 'crier_publish id: ', $id === false ? 'none (no history on this channel)' : $id, "\n";
