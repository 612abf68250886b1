"""The one label rule for DNS names: host names, mail domains, list domains, DKIM selectors.

A label is 1..63 letters, digits and '-', not starting or ending with '-' (RFC 1035 2.3.1,
RFC 5890's A-labels included); a name is at most 253 characters and never ends in an
all-digit label (that is an IP address written wrong, not a name). Names of records rather
than hosts (`_dmarc`, list domains copied from headers) may also hold '_'.
"""

from __future__ import annotations

import re

_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_RECORD_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
MAX_NAME = 253


class DomainNameError(ValueError):
    """Text that is not a DNS name; the message is the reason alone."""


def parse_domain_name(text: str, *, underscore: bool = False) -> str:
    """The name lower-cased without its trailing dot; DomainNameError saying why not."""
    name = text.strip()
    name = name[:-1] if name.endswith(".") and not name.endswith("..") else name
    name = name.lower()
    if not name:
        raise DomainNameError("empty domain name")
    if not name.isascii():
        raise DomainNameError("use the ASCII (xn--) form of an internationalised domain")
    if len(name) > MAX_NAME:
        raise DomainNameError(f"a domain name is at most {MAX_NAME} characters")
    labels = check_labels(name, underscore=underscore)
    if labels[-1].isdigit():
        raise DomainNameError("not a valid IP address, and a domain cannot end in a number")
    return name


def check_labels(name: str, *, underscore: bool = False) -> list[str]:
    """The labels of a lower-case dotted name, each under the label rule; DomainNameError else.

    This is the rule alone, for names that are not domains (a DKIM selector may be `2024`).
    """
    label_rule = _RECORD_LABEL if underscore else _HOST_LABEL
    labels = name.split(".")
    for label in labels:
        if not label:
            raise DomainNameError("a domain has an empty label (two dots in a row?)")
        if not label_rule.fullmatch(label):
            allowed = "letters, digits, '-', '_'" if underscore else "letters, digits, '-'"
            raise DomainNameError(f"{label!r} is not a valid domain label ({allowed})")
    return labels


def is_domain_name(text: str, *, underscore: bool = False) -> bool:
    """Whether `text` is a DNS name under the same rule."""
    try:
        parse_domain_name(text, underscore=underscore)
    except DomainNameError:
        return False
    return True
