"""Coverage-guided fuzzing of postwarden's untrusted-input parsers (atheris / libFuzzer).

One harness per target, each a module with `one_input(data: bytes) -> None` that raises
only when an invariant breaks (the same invariants as the hypothesis tests in
tests/unit/policyd/*_fuzz.py and tests/unit/milterd/test_message_handler_fuzz.py), and
`SEEDS`, the inputs the mutator starts from:

- `policy`: policyd's policy delegation codec, bytes split into arbitrary reads, plus a
  verdict built from the bytes and encoded.
- `socketmap`: the socketmap netstring codec and its reply encoding.
- `milter`: milterd's MessageHandler.process() on a message decoded from the bytes, for
  signing, submission and verifying envelopes: exactly one outcome per message (changes
  the MTA can apply, or a MessageFault answered per milterd.on_error), never another
  exception.

Run: `make fuzz` or `python -m bench.fuzz TARGET... --runs N --seconds S` (__main__.py).
"""
