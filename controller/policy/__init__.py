"""The pure policy engine: documents, conditions, evaluation and resolution. No I/O here."""
