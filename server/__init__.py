"""The routedsl relay: SMTP intake, durable spool, delivery engines, reload.

Depends on the language package (`routedsl`), never the reverse.
"""
