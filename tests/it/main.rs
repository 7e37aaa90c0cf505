//! Integration tests: one binary, real Postgres, the Kafka protocol (librdkafka's mock
//! broker in process; a real broker process for `real_broker` when one is configured).

mod auth_sync;
mod crash;
mod dead_letters;
mod faults;
mod helpers;
mod hostile;
mod identity;
mod ingest;
mod merge;
mod ops;
mod providers;
mod real_broker;
mod relay;
mod runtime;
mod sources;
mod trust;
