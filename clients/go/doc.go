// Package sidebus is the Go client of sidebus, a per-host sidecar event bus: it connects to the
// daemon's Unix socket, publishes events (pipelined), subscribes with handlers (nil acks, an
// error nacks), calls the admin operations, and reconnects by itself after the daemon
// restarts.
//
//	client, err := sidebus.Dial(ctx, sidebus.Options{Name: "orders"})
//	res, err := client.Publish(ctx, "order.created", map[string]any{"orderId": "o-1"}, sidebus.PublishOptions{})
//	sub, err := client.Subscribe(ctx, "order.created", "inventory", sidebus.SubscribeOptions{},
//		func(ctx context.Context, d *sidebus.Delivery) error { return nil })
//	err = client.Close(ctx)
//
// The wire protocol is protocol/PROTOCOL.md in the sidebus repository.
package sidebus
