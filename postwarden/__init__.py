"""postwarden: the shared core (config, store, lists, decision engine, DKIM) of the mail gateway.

Nothing in this package knows about sockets or click; the adapters (`policyd`, `milterd`,
`cli`) import it, never the reverse.
"""

__version__ = "0.1.0"
