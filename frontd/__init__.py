"""frontd: always-up front ends on Postfix's milter and SASL sockets (docs/ARCHITECTURE.md)."""
