//! Operator commands.

pub mod dev;
