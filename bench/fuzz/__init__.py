"""Coverage-guided fuzzing of postwarden's untrusted-input parsers (atheris / libFuzzer).

One harness per target, each a module with `one_input(data: bytes) -> None` that raises
only when an invariant breaks (the same invariants as the hypothesis tests in
tests/unit/policyd/*_fuzz.py and tests/unit/milterd/test_message_handler_fuzz.py):

- `policy`: policyd's policy delegation codec, bytes split into arbitrary reads, plus a
  verdict built from the bytes and encoded.
- `socketmap`: the socketmap netstring codec and its reply encoding.
- `milter`: milterd's MessageHandler.process() on a message decoded from the bytes, for
  signing, submission and verifying envelopes.

Run: `python -m bench.fuzz TARGET --runs N [--seconds S]` (see __main__.py).
"""
