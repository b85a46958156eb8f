"""The cloud side: gRPC server, ingest, backup store and central IT console."""
