"""Local emulators of destination APIs, faithful to shared/contracts/sinks.md."""
