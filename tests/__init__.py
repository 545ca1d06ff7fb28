"""Tests: unit (no I/O beyond loopback HTTP), integration (the real local Kafka broker)."""
