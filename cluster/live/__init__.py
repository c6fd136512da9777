"""Live market data kept for readers: candles persisted under ``DATA_DIR``."""
