"""Market data: Backpack client, normalisation, sources, Kafka glue and the embedded broker."""
