// The inventory service of the example shop: consumes order.created as the group
// `inventory` and prints one line per order it reserves stock for. Ctrl-C (or SIGTERM) closes
// it gracefully: running handlers finish and are acked before it exits.
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	sidebus "github.com/sidebus/sidebus/clients/go"
)

// Order is the data of an order.created event.
type Order struct {
	OrderID  string  `msgpack:"orderId"`
	Amount   float64 `msgpack:"amount"`
	Currency string  `msgpack:"currency"`
	Email    string  `msgpack:"email"`
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	// The socket comes from $SIDEBUS_SOCKET (default /run/sidebus/sidebus.sock).
	client, err := sidebus.Dial(ctx, sidebus.Options{Name: "inventory"})
	if err != nil {
		log.Fatalf("inventory: %v", err)
	}
	_, err = client.Subscribe(ctx, "order.created", "inventory", sidebus.SubscribeOptions{MaxInFlight: 16},
		func(ctx context.Context, d *sidebus.Delivery) error {
			var o Order
			if err := d.DecodeData(&o); err != nil {
				return fmt.Errorf("unreadable order: %w", err) // nacked: retried, then dead-lettered
			}
			fmt.Printf("inventory: reserved stock for order %s (%.2f %s, attempt %d)\n", o.OrderID, o.Amount, o.Currency, d.Attempt)
			return nil // acked
		})
	if err != nil {
		log.Fatalf("inventory: %v", err)
	}
	fmt.Println("inventory: waiting for order.created as group inventory")

	<-ctx.Done()
	closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := client.Close(closeCtx); err != nil {
		log.Printf("inventory: close: %v", err)
	}
	fmt.Println("inventory: stopped")
}
