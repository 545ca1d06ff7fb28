"""Integration tests on the real Kafka broker."""
