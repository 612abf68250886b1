"""The policy checks policyd runs.

Request, verdict, records, lists, precedence, greylisting, DNSBL, SPF and the filtering order.
"""
