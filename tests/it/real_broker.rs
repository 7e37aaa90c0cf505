//! End to end through the real `authsync` binary against a Kafka-compatible broker process.
