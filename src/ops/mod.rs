//! Operator commands: replay, dead-letter inspection and redrive, outbox status, dev.

pub mod dev;
pub mod dlq;
pub mod outbox;
pub mod replay;
pub mod replay_lane;
