// Publish two events to crier through Redis (go-redis v9):
//
//	REDIS_URL=redis://127.0.0.1:6379 CHANNEL=orders:7 go run publish.go
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"

	"github.com/redis/go-redis/v9"
)

func getenv(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func main() {
	ctx := context.Background()
	opts, err := redis.ParseURL(getenv("REDIS_URL", "redis://127.0.0.1:6379"))
	if err != nil {
		log.Fatal(err)
	}
	rdb := redis.NewClient(opts)
	defer rdb.Close()
	channel := getenv("CHANNEL", "public:orders")
	prefix := os.Getenv("CHANNEL_PREFIX") // crier's redis.channel_prefix, if set
	// With a channel_prefix the function is crier_publish_<name> (crier logs it at start).
	function := getenv("PUBLISH_FUNCTION", "crier_publish")

	// 1. Plain PUBLISH: live only, no id, not kept.
	payload, _ := json.Marshal(map[string]any{"type": "order.created", "id": 1})
	reached, err := rdb.Publish(ctx, prefix+channel, payload).Result()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("PUBLISH reached %d crier instance(s)\n", reached)

	// 2. FCALL crier_publish (Redis >= 7, channel WITHOUT the prefix): kept in
	//    the channel's history when its rule has one; returns the message id,
	//    or nil (redis.Nil) on a channel without history.
	payload, _ = json.Marshal(map[string]any{"type": "order.created", "id": 2})
	id, err := rdb.FCall(ctx, function, []string{channel}, payload).Text()
	if errors.Is(err, redis.Nil) {
		id = "none (no history on this channel)"
	} else if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("crier_publish id: %s\n", id)
}
