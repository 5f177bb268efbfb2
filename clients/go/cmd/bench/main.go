// Command bench measures the Go client against a running daemon: it subscribes a fresh group,
// publishes N events pipelined (up to 1,000 in flight, durability local) and reports the
// publish rate, then the rate at which the handler consumed (and acked) all N.
//
//	bench --socket /tmp/x.sock --count 100000
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"runtime/pprof"
	"strings"
	"sync/atomic"
	"time"

	sidebus "github.com/sidebus/sidebus/clients/go"
)

func main() {
	socket := flag.String("socket", os.Getenv("SIDEBUS_SOCKET"), "the daemon's socket")
	count := flag.Int("count", 10000, "events to publish and consume")
	window := flag.Int("in-flight", 1000, "publishes in flight at most")
	maxInFlight := flag.Uint64("max-in-flight", 1024, "the subscription's max_in_flight")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the client here")
	consume := flag.Bool("consume", true, "subscribe and consume (false: measure publishing alone)")
	flag.Parse()
	ctx := context.Background()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			log.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			log.Fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	n := *count
	if n <= 0 {
		log.Fatal("--count must be positive")
	}

	consumer, err := sidebus.Dial(ctx, sidebus.Options{Socket: *socket, Name: "bench-consumer"})
	if err != nil {
		log.Fatal(err)
	}
	publisher, err := sidebus.Dial(ctx, sidebus.Options{Socket: *socket, Name: "bench-publisher"})
	if err != nil {
		log.Fatal(err)
	}
	run := fmt.Sprintf("%d", time.Now().UnixNano())
	typ := "bench.go." + run
	var consumed atomic.Int64
	var firstDelivery atomic.Int64
	all := make(chan time.Time, 1)
	if *consume {
		_, err = consumer.Subscribe(ctx, typ, "bench-"+run, sidebus.SubscribeOptions{MaxInFlight: *maxInFlight},
			func(ctx context.Context, d *sidebus.Delivery) error {
				firstDelivery.CompareAndSwap(0, time.Now().UnixNano())
				if consumed.Add(1) == int64(n) {
					all <- time.Now()
				}
				return nil
			})
		if err != nil {
			log.Fatal(err)
		}
	}

	pad := strings.Repeat("x", 200)
	start := time.Now()
	queue := make([]*sidebus.PendingPublish, 0, *window)
	wait := func(p *sidebus.PendingPublish) {
		if _, err := p.Wait(ctx); err != nil {
			log.Fatalf("publish: %v", err)
		}
	}
	for i := 0; i < n; i++ {
		if len(queue) == *window {
			wait(queue[0])
			queue = queue[1:]
		}
		p, err := publisher.PublishAsync(ctx, typ, map[string]any{"n": i, "pad": pad},
			sidebus.PublishOptions{Durability: sidebus.DurabilityLocal})
		if err != nil {
			log.Fatalf("publish: %v", err)
		}
		queue = append(queue, p)
	}
	for _, p := range queue {
		wait(p)
	}
	published := time.Since(start)

	consumeRate := 0.0
	if *consume {
		var last time.Time
		select {
		case last = <-all:
		case <-time.After(5 * time.Minute):
			log.Fatalf("consumed %d of %d in 5 minutes", consumed.Load(), n)
		}
		// The consume rate runs from the first delivery to the start of the last handler.
		consumeRate = float64(n) / last.Sub(time.Unix(0, firstDelivery.Load())).Seconds()
	}
	closeCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_ = consumer.Close(closeCtx)
	_ = publisher.Close(closeCtx)
	out, _ := json.Marshal(map[string]any{
		"client":        "go",
		"count":         n,
		"publish_per_s": float64(n) / published.Seconds(),
		"consume_per_s": consumeRate,
	})
	fmt.Println(string(out))
}
