//! Publisher and subscriber clients that follow whichever broker is serving.
//!
//! The publisher keeps a window of unacknowledged messages. When the broker it talks to does not
//! acknowledge the oldest of them within `ack_timeout` (500 ms by default), or closes the
//! connection, it switches to the other broker and resends every unacknowledged message plus the
//! last `resend` it sent (the seed's "last 5"). Messages carry their identity, so brokers drop
//! the resends they already hold and subscribers can spot the duplicates that remain.
//!
//! The subscriber keeps one connection to each broker open at once and labels every delivery
//! with the broker it came from.

mod clock;
mod consumer;
mod publisher;
mod subscriber;

pub use clock::{clock_offset, ClockOffset};
pub use consumer::{run_consumer, Consumed, ConsumerConfig, ConsumerEnd};

pub use publisher::{
    new_publisher_id, print_event, run_publisher, AckLog, AckRecord, PubEvent, PubSummary,
    PublisherConfig, ACK_COLUMNS,
};
pub use subscriber::{run_subscriber, Delivery, DeliverySink, PrintSink, SubscriberConfig};

/// Most unacknowledged messages a publisher keeps; past it, it stops taking input until ACKs
/// come back, so a publisher whose brokers are both down does not grow without bound.
pub const MAX_WINDOW: usize = 65_536;

/// The brokers a client talks to, in order of preference.
#[derive(Debug, Clone)]
pub struct Brokers {
    /// Address of the primary (`host:port`).
    pub primary: String,
    /// Address of the backup.
    pub backup: String,
}

impl Brokers {
    fn addr(&self, i: usize) -> &str {
        if i == 0 {
            &self.primary
        } else {
            &self.backup
        }
    }
}

/// Name of broker `i` (0 = primary) for output.
pub fn broker_name(i: usize) -> &'static str {
    if i == 0 {
        "primary"
    } else {
        "backup"
    }
}
