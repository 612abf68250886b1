"""Values from the wire and the config, parsed once; untrusted text made safe.

Contract: docs/ARCHITECTURE.md, "Layers".
"""
