"""`python -m bench.fuzz TARGET... [--runs N] [--seconds S] [--timeout T] [--engine E]`.

TARGET is `policy`, `socketmap` or `milter` (several run one after the other). With
atheris (`make fuzz` installs it) each target runs under libFuzzer in a child process,
coverage-guided (the product modules are instrumented), on one core: it stops after N
inputs or S seconds, whichever comes first. An input that raises (an invariant of the
harness broken, or any exception but the codec's own error type) is a crash; an input
running longer than T seconds is a hang. libFuzzer stops at the first of either and
writes it to `bench/results/fuzz/TARGET/` (crash-* or timeout-*), next to the corpus it
grew (kept for the next run) and its log. One summary line per target:

    policy: 10000000 inputs, 0 crashes, 0 hangs, 1234.5 s, 8100 inputs/s

The exit status is non-zero when any target crashed or hung. Without atheris (or with
`--engine hypothesis`) the same harness gets N generated inputs from hypothesis in this
process: not coverage-guided, but the same invariants and the same bounds.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import ModuleType

TARGETS = {
    "policy": "bench.fuzz.policy_codec",
    "socketmap": "bench.fuzz.socketmap_codec",
    "milter": "bench.fuzz.message_handler",
}
# Instrumented for coverage (atheris instruments whole top-level packages): the code under
# test, not the harness (instrumenting the harness and the shared core too cost the codecs
# 40% of their inputs per second). For the milter that is milterd, postwarden (the DKIM
# signer and verifier) and dkimpy, whose parser sees the message first (the bug fuzzing
# found was there).
INSTRUMENTED = {
    "policy": ["policyd"],
    "socketmap": ["policyd"],
    "milter": ["milterd", "postwarden", "dkim"],
}
REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "fuzz"
# One input taking longer than this is a hang (libFuzzer's -timeout); memory is bounded too.
INPUT_TIMEOUT = 10
RSS_LIMIT_MB = 2048
MAX_LEN = 70000  # above the policy codec's request limit (65,536), so it is reached


@dataclass
class Summary:
    target: str
    inputs: int
    crashes: int
    hangs: int
    seconds: float
    wanted: int
    interrupted: bool = False

    def line(self) -> str:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        text = (
            f"{self.target}: {self.inputs} inputs, {self.crashes} crashes, {self.hangs} hangs, "
            f"{self.seconds:.1f} s, {rate:.0f} inputs/s"
        )
        if self.interrupted:
            text += " (interrupted)"
        elif self.inputs < self.wanted and not (self.crashes or self.hangs):
            text += f" (time limit reached before {self.wanted} inputs)"
        return text


def _worker(target: str, libfuzzer_args: list[str]) -> None:
    """In the child: instrument, then hand the harness to libFuzzer (which exits)."""
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    with atheris.instrument_imports(include=INSTRUMENTED[target]):
        harness = importlib.import_module(TARGETS[target])
    atheris.Setup([sys.argv[0], *libfuzzer_args], harness.one_input)
    atheris.Fuzz()


def _seed(target: str, corpus: Path) -> None:
    harness = importlib.import_module(TARGETS[target])
    corpus.mkdir(parents=True, exist_ok=True)
    for number, seed in enumerate(harness.SEEDS):
        (corpus / f"seed-{number}").write_bytes(seed)


def _run_atheris(target: str, runs: int, seconds: int, timeout: int) -> Summary:
    out = RESULTS / target
    corpus = out / "corpus"
    _seed(target, corpus)
    for old in out.glob("*-*"):  # artifacts of an earlier run: this run's are its own
        if old.name.split("-")[0] in ("crash", "timeout", "oom", "slow"):
            old.unlink()
    args = [
        f"-runs={runs}",
        f"-max_total_time={seconds}",
        f"-timeout={timeout}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={MAX_LEN}",
        "-print_final_stats=1",
        f"-artifact_prefix={out}/",
        str(corpus),
    ]
    command = [sys.executable, "-m", "bench.fuzz", "--worker", target, "--", *args]
    log_path = out / "fuzz.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        # libFuzzer's own bound is -max_total_time; this one catches a wedged child.
        child = subprocess.run(
            command,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=seconds + 120,
            check=False,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
    elapsed = time.monotonic() - started
    text = log_path.read_text("utf-8", "replace")
    executed = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    last_status = re.findall(r"^#(\d+)\s", text, re.MULTILINE)
    inputs = int(executed[-1]) if executed else int(last_status[-1]) if last_status else 0
    hangs = len(list(out.glob("timeout-*"))) or int("libFuzzer: timeout" in text)
    crashes = len(list(out.glob("crash-*"))) + len(list(out.glob("oom-*")))
    # A signal from outside: libFuzzer says so (SIGINT, SIGTERM) or the child just died of it.
    stopped = child.returncode < 0 or "libFuzzer: run interrupted" in text
    interrupted = stopped and not (crashes or hangs)
    if child.returncode > 0 and not (crashes or hangs or interrupted):
        crashes = 1  # died some other way: the log says how
    summary = Summary(target, inputs, crashes, hangs, elapsed, runs, interrupted)
    if crashes or hangs:
        print(f"{target}: see {log_path} and the artifacts in {out}/", file=sys.stderr)
        print("\n".join(text.splitlines()[-40:]), file=sys.stderr)
    return summary


def _run_hypothesis(target: str, runs: int, seconds: int, timeout: int) -> Summary:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    harness: ModuleType = importlib.import_module(TARGETS[target])
    one_input: Callable[[bytes], None] = harness.one_input
    deadline = time.monotonic() + seconds
    done = 0

    @settings(
        max_examples=runs,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        database=None,
        deadline=timedelta(seconds=timeout),  # a slow input fails as a hang
        suppress_health_check=list(HealthCheck),
    )
    @given(
        data=st.one_of(
            st.sampled_from(harness.SEEDS), st.binary(max_size=512), st.binary(max_size=MAX_LEN)
        )
    )
    def fuzz(data: bytes) -> None:
        nonlocal done
        if time.monotonic() > deadline:
            return  # out of time: the remaining examples are skipped cheaply
        one_input(data)
        done += 1

    start = time.monotonic()
    crashes = 0
    try:
        fuzz()
    except Exception as exc:  # noqa: BLE001 - reported as the crash it is, with the input
        print(f"{target}: CRASH after {done} inputs: {exc!r}", file=sys.stderr)
        crashes = 1
    return Summary(target, done, crashes, 0, time.monotonic() - start, runs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(argv[1], argv[3:])  # --worker TARGET -- libFuzzer flags...
        return 1  # not reached: libFuzzer exits
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__)
    parser.add_argument("targets", nargs="+", choices=sorted(TARGETS), metavar="TARGET")
    parser.add_argument("--runs", type=int, default=10_000_000, help="inputs per target")
    parser.add_argument("--seconds", type=int, default=3600, help="time limit per target")
    parser.add_argument("--timeout", type=int, default=INPUT_TIMEOUT, help="per input (hang)")
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    args = parser.parse_args(argv)
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "hypothesis"
    run = _run_atheris if engine == "atheris" else _run_hypothesis
    failed = False
    for target in args.targets:
        summary = run(target, args.runs, args.seconds, args.timeout)
        print(summary.line(), flush=True)
        failed |= bool(summary.crashes or summary.hangs or summary.interrupted)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
