"""The floor every part stands on: settings, object store, database (every table and
migration), Kafka helpers, telemetry, the embedded stack and the dead-letter tools."""
