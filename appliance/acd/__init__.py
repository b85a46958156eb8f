"""Automatic call distribution: queues, agents and the routing rules between them.

``appliance.acd.router.Router`` is the sans-IO routing core (compiled), with
``appliance.acd.reference.ReferenceRouter`` as its pure-Python twin; the vocabulary (config,
events, decisions) is in ``appliance.acd.model``. See ``docs/acd.md``.
"""
