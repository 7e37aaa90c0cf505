//! authsync: login and merge events on Kafka become idempotent changes in Postgres, and
//! their results leave through a transactional outbox. See `docs/ARCHITECTURE.md`.

mod allocator;
pub mod app;
pub mod config;
pub mod consumer;
pub mod domain;
pub mod events;
pub mod kafka;
pub mod ops;
pub mod relay;
pub mod steps;
pub mod store;
pub mod telemetry;
