"""The shared delivery layer: batching, retries, rate limits, offsets and dead letters.

Sinks are pure (build requests, classify responses); everything with I/O or time lives here.
"""
