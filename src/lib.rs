//! authsync: login and merge events on Kafka become idempotent changes in Postgres, and
//! their results leave through a transactional outbox. See `docs/ARCHITECTURE.md`.

mod allocator;
pub mod app;
pub mod config;
pub mod consumer;
pub mod domain;
pub mod events;
pub mod ingest;
pub mod kafka;
pub mod ops;
pub mod relay;
pub mod steps;
pub mod store;
pub mod telemetry;

/// A crash point for the crash-consistency tests: with the `failpoints` feature and
/// `FAILPOINTS="<name>=return"` (or `"<name>=20*off->1*return"`) the process aborts here,
/// as a `kill -9` would. Compiled to nothing without the feature.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| {
            eprintln!(concat!("failpoint ", $name, ": aborting"));
            std::process::abort()
        });
    };
}
