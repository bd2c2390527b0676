//! Placeholder until the report module lands.
#![allow(missing_docs)]
use serde::{Deserialize, Serialize};
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Delivery {
    pub received_at_us: u64,
    pub source: String,
    pub topic: String,
    pub publisher: String,
    pub seq: u64,
    pub sent_at_us: u64,
    pub latency_us: i64,
    pub duplicate: bool,
    pub epoch: u64,
    pub broker_rx_us: u64,
    pub compute_start_us: u64,
    pub compute_end_us: u64,
    pub payload: String,
}
