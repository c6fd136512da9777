"""Names under which the platform's Ray actors and Serve application are registered.

Every component finds the others by these names (``ray.get_actor(name, namespace=NAMESPACE)``);
shard actors are named by ``cluster.trading.placement.ShardSpec.name``.
"""

from __future__ import annotations

NAMESPACE = "shardex"  # Ray namespace of every named actor of the platform
LEDGER = "ledger"  # the ledger's MachineHost
FEED = "feed"  # the FeedActor (Kafka consumer -> shards)
SERVE_APP = "shardex"  # the Serve application holding the HTTP API
API_DEPLOYMENT = "api"  # its ingress deployment
