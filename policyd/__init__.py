"""The Postfix policy server (policy delegation protocol codec and asyncio server)."""
