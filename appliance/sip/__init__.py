"""SIP on the appliance: transports, transactions, registrar and guard."""
