"""Everything Ray: actors, the Serve API, the launcher CLI and placement."""
