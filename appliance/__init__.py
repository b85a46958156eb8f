"""The site server: SIP transports and transactions, registrar, guard, call control, storage,
config and the ``edgecc`` command line."""
