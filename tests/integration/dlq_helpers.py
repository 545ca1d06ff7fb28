"""Helpers for the dead-letter tool tests: synthetic dead letters, offsets and group commits."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from router import dlq
from router.bus import TopicSpec, ensure_topics
from router.settings import Settings


async def create_topic(settings: Settings, topic: str, partitions: int = 1) -> None:
    await ensure_topics(settings.kafka, [TopicSpec(topic, partitions, 1)])


async def write_letters(settings: Settings, topic: str, letters: list[dlq.DeadLetter]) -> None:
    """Write dead letters as the consumer would (one partition: offsets 0, 1, 2...)."""
    await create_topic(settings, topic)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, enable_idempotence=True
    )
    await asyncio.wait_for(producer.start(), 30)
    try:
        for letter in letters:
            key = (letter.event_id or "x").encode()
            await asyncio.wait_for(
                producer.send_and_wait(topic, value=dlq.encode(letter), key=key), 10
            )
    finally:
        await asyncio.wait_for(producer.stop(), 10)


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Partition -> end offset; empty if the topic does not exist."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, group_id=None)
    await asyncio.wait_for(consumer.start(), 30)
    try:
        cluster = await asyncio.wait_for(consumer._client.fetch_all_metadata(), 10)
        if topic not in cluster.topics():
            return {}
        tps = [TopicPartition(topic, p) for p in cluster.partitions_for_topic(topic) or ()]
        ends = await asyncio.wait_for(consumer.end_offsets(tps), 10)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await asyncio.wait_for(consumer.stop(), 10)


async def group_done_with(settings: Settings, group: str, topic: str) -> bool:
    """The group has committed the end offset of every non-empty partition of ``topic``."""
    ends = await end_offsets(settings, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
    )
    await asyncio.wait_for(consumer.start(), 30)
    try:
        for partition, end in ends.items():
            if end and await consumer.committed(TopicPartition(topic, partition)) != end:
                return False
        return bool(ends)
    finally:
        await asyncio.wait_for(consumer.stop(), 10)


async def read_to_end(settings: Settings, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` up to its end offsets now (no waiting for more to arrive)."""
    ends = {p: end for p, end in (await end_offsets(settings, topic)).items() if end}
    if not ends:
        return []
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await asyncio.wait_for(consumer.start(), 30)
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await asyncio.wait_for(consumer.seek_to_beginning(*tps), 10)
        deadline = asyncio.get_running_loop().time() + 15
        while len(records) < sum(ends.values()):
            assert asyncio.get_running_loop().time() < deadline, f"{topic}: read timed out"
            batch = await consumer.getmany(timeout_ms=200)
            for tp, part in batch.items():
                records.extend(r for r in part if r.offset < ends[tp.partition])
    finally:
        await asyncio.wait_for(consumer.stop(), 10)
    records.sort(key=lambda r: (r.partition, r.offset))
    return records
