"""Market data: Backpack client, normalisation, sources, Kafka glue, consumer logic, broker.

Modules (one concept each):

- ``feed.settings``: :class:`FeedSettings` and :class:`FeedBounds` (what the feed is configured
  with; ``cluster.config`` builds them), ``MARKET_TOPIC``, ``parse_source`` (FEED_SOURCE).
- ``feed.payload``: ``load_json`` (bounded JSON parsing of untrusted payloads).
- ``feed.message``: :class:`MarketDataMessage` (the SPEC wire format) and :class:`TickDecoder`
  (JSON -> ``engine.market.Tick``, drops and counts malformed and out-of-bounds messages).
- ``feed.frames``: :class:`FrameNormalizer` (Backpack frames -> messages; drops per reason).
- ``feed.backpack``: :class:`BackpackClient` (WebSocket, resubscribes, jittered backoff).
- ``feed.sim`` / ``feed.replay``: :class:`SimSource` (seeded random walk) and
  :class:`ReplaySource` (jsonl of Backpack frames).
- ``feed.source``: ``make_source`` (FEED_SOURCE) and
  ``async run_source(settings, stop, bootstrap=...)`` (source -> Kafka until ``stop`` is set).
- ``feed.producer``: :class:`MarketDataProducer` (aiokafka; recreates the topic after a restart).
- ``feed.broker``: :class:`EmbeddedBroker` (Tansu; start/stop/restart, context manager),
  ``async ensure_topic(bootstrap, partitions)``, ``free_port()``.
- ``feed.conflation``: :class:`BatchConflator` and :class:`ShardFanout`; ``feed.gate``:
  :class:`TickGate` (update order, jump hold and confirmation); ``feed.pipeline``:
  :class:`TickPipeline`, all of them together; ``feed.consumer``: :class:`MarketDataConsumer`
  (aiokafka; assignment without a consumer group, positioning, topic recreation, rebuilds,
  lag) feeding a pipeline and handing its ready ticks to a shard-call callback. Together the
  Ray-free logic of the feed actor (``cluster.actors.feed``).
- ``feed.service``: ``run_feed_service(settings)`` behind ``shardex feed``.

Nothing here imports Ray or ``cluster``.
"""
