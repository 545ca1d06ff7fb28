"""pendo-event-router: ingest Pendo events onto Kafka and route them to analytics sinks."""
