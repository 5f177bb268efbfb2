//! The analytics service of the example shop (examples/shop/): consumes order.created as the
//! group `analytics` and prints one line per order with the running revenue per currency.
//! Ctrl-C (or SIGTERM) closes it gracefully: running handlers finish and are acked first.
//!
//!     SIDEBUS_SOCKET=/tmp/x.sock cargo run -p sidebus-client --example shop_analytics

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use sidebus_client::{Client, Delivery, SubscribeOptions, default_socket};
use tokio::signal::unix::{SignalKind, signal};

/// The data of an order.created event.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Order {
    order_id: String,
    amount: f64,
    currency: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The socket comes from $SIDEBUS_SOCKET (default /run/sidebus/sidebus.sock).
    let client = Client::connect_as(default_socket(), "analytics").await?;
    let sub = client.subscribe("order.created", "analytics", SubscribeOptions { max_in_flight: Some(16), ..Default::default() }).await?;
    println!("analytics: counting order.created as group analytics");
    let revenue: Arc<Mutex<BTreeMap<String, (u64, f64)>>> = Arc::default();
    let consuming = tokio::spawn(sub.consume_deliveries(move |d: Delivery| {
        let revenue = revenue.clone();
        async move {
            // An order that does not decode is nacked: retried, then dead-lettered.
            let o: Order = d.data().map_err(|e| format!("unreadable order: {e}"))?;
            let (orders, total) = {
                let mut r = revenue.lock().unwrap_or_else(|e| e.into_inner());
                let t = r.entry(o.currency.clone()).or_default();
                *t = (t.0 + 1, t.1 + o.amount);
                *t
            };
            println!(
                "analytics: order {} of {:.2} {}: {orders} orders, {total:.2} {} so far",
                o.order_id, o.amount, o.currency, o.currency
            );
            Ok::<(), String>(()) // acked
        }
    }));

    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    client.close().await?;
    consuming.await?;
    println!("analytics: stopped");
    Ok(())
}
