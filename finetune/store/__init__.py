"""The adapter store: publish atomically, list, show, export, delete and import adapters."""
