"""The private gateway the harness breaks: Postfix + Dovecot + policyd + milterd + NSD + store.

Everything runs inside one private network namespace (the caller re-executes itself there,
see bench/chaos/__main__.py), so its loopback is private: NSD, Redis and the daemons bind
127.0.0.x without meeting anyone else's ports, Postfix listens on the real port numbers
(25, 587, ...) of this namespace only, and the namespace's own firewall (nft) can drop
DNS without touching the machine. A veth pair holds 198.51.100.1 (the gateway) and the
outside clients' addresses (bench/chaos/sender.py), so inbound mail comes from a
documentation address, not from trusted loopback.

Postfix and Dovecot are rendered from the one config by the same code as the appliance
(tests/fixtures/mail_system.py's layout and MailSystem); policyd and milterd are the
`postwarden` console script with that config (and `postwarden mapd` serving Postfix's
lookup maps with policyd --no-maps, as the appliance runs them, when the CLI has mapd),
each run under `postwarden supervise` (the
project's restart supervisor for the no-systemd path), so a SIGKILL hits the daemon and
the supervisor starts it again. Where the CLI has no `supervise`, `Rig.restart_dead()`
does it instead: a daemon found dead is started again after RESTART_DELAY (said in the
output).
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.parser
import email.policy
import functools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import trustme

from bench.chaos.accounting import Delivery
from bench.chaos.schedule import Action, Store
from bench.chaos.sender import (
    ALL_SOURCE_IPS,
    FORBIDDEN_DOMAIN,
    FORBIDDEN_IP,
    FORBIDDEN_MAILBOX,
    GATEWAY_IP,
    LOCAL_USERS,
    REMOTE_DOMAIN,
)
from postwarden.appliance.render import render_all, write_rendered
from postwarden.config.loading import parse_config
from postwarden.config.model import DnsConfig
from postwarden.dkim.keys import generate_key, quoted_txt, txt_record, write_key
from postwarden.dkim.verification import make_dnsfunc, verify_message
from tests.fixtures.dns_server import DEFAULT_ZONES, DNSBL_ZONE, DnsServer
from tests.fixtures.mail_system import PORT_KEYS, MailSystem, private_layout
from tests.fixtures.policyd_daemon import POSTWARDEN, to_toml

RESTART_DELAY = 0.5  # seconds between finding a daemon dead and starting it again
START_TIMEOUT = 30.0
TOKEN = re.compile(rb"chaos-[0-9a-f]+-\d{6}")
STANDARD_PORTS = dict(zip(PORT_KEYS, (25, 587, 465, 143, 993, 110, 995), strict=True))
DISK_SIZE = "16m"


def _run(argv: list[str], timeout: float = 60.0, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _start_daemonizing(argv: list[str], log: Path) -> str:
    """Run a command whose daemon inherits stdout/stderr: into a file, since a pipe would
    never reach EOF while the daemon runs (as tests/fixtures/mail_system.py does)."""
    with log.open("a") as out:
        code = subprocess.run(argv, stdout=out, stderr=out, check=False, timeout=60).returncode
    return f"exit {code}"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def _has_command(name: str) -> bool:
    done = subprocess.run(
        [POSTWARDEN, name, "--help"], capture_output=True, timeout=30, check=False
    )
    return done.returncode == 0


def supervise_available() -> bool:
    """`postwarden supervise` exists (the project's restart supervisor, issue #14 item 4)."""
    return _has_command("supervise")


def descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... (from /proc; a process that is gone is skipped)."""
    found: list[int] = []
    pending = [pid]
    while pending and len(found) < 10_000:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found.extend(children)
                pending.extend(children)
    return found


@dataclass
class Daemon:
    """A postwarden daemon subprocess, its output appended to one log across restarts.

    With `supervised`, the subprocess is `postwarden supervise NAME` and the daemon is its
    child: faults hit the child (the daemon), and the supervisor starts it again.
    """

    name: str
    argv: list[str]
    log_path: Path
    cwd: Path
    supervised: bool = False
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    failed_starts: int = 0
    dead_since: float | None = None
    kills: int = 0
    frozen: bool = False

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("POSTWARDEN_CONFIG", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The daemon's own process (under a supervisor: its child), None when down."""
        if not self.alive() or self.process is None:
            return None
        if not self.supervised:
            return self.process.pid
        children = _children(self.process.pid)
        return children[0] if children else None

    def pids(self) -> list[int]:
        """The daemon's process and every process it started (not its supervisor)."""
        pid = self.pid
        return [] if pid is None else [pid, *descendants(pid)]

    def signal_all(self, sig: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> int | None:
        pid = self.pid
        if pid is not None:
            self.kills += 1
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        if self.frozen:
            self.signal_all(signal.SIGCONT)
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.signal_all(signal.SIGKILL)
            self.process.kill()
            self.process.wait(15)


@dataclass
class Downtime:
    """How long a daemon's socket refused connections, from polls every ~0.1 s."""

    socket_path: Path
    total: float = 0.0
    longest: float = 0.0
    outages: int = 0
    _down_since: float | None = None

    def poll(self, now: float) -> None:
        up = False
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.2)
            s.connect(str(self.socket_path))
            up = True
        if up and self._down_since is not None:
            gap = now - self._down_since
            self.total += gap
            self.longest = max(self.longest, gap)
            self._down_since = None
        elif not up and self._down_since is None:
            self._down_since = now
            self.outages += 1

    def describe(self) -> str:
        return (
            f"socket refused {self.outages} times, {self.total:.1f} s in all, "
            f"longest {self.longest:.1f} s"
        )


@dataclass
class RedisNode:
    """A redis-server (or Sentinel) whose argv is kept, so it can be started again."""

    name: str
    port: int
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis {self.name} on port {self.port} did not answer PING")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RigOptions:
    store: Store = "sqlite"
    greylist_delay: float = 2.0
    policy_default_action: str | None = None  # None: the product's default
    policy_unreachable_action: str | None = None  # None: the product's default
    # Postfix's virtual_alias_maps on policyd's socketmap, as installed; off: the README's
    # quick-start setup, where only the policy check depends on policyd.
    aliases_socketmap: bool = True
    # The maps served by `postwarden mapd` (as the appliance does) when the CLI has it.
    mapd: bool = True
    # Postfix on `postwarden frontd`'s milter and SASL sockets (as the appliance runs it)
    # when the CLI has frontd.
    frontd: bool = True
    workers: int = 1
    # "supervise": `postwarden supervise` restarts a killed daemon; "harness": this harness
    # does, RESTART_DELAY after finding it dead; "auto": supervise when the CLI has it.
    restarts: str = "auto"


@dataclass
class Rig:
    root: Path
    options: RigOptions
    config_path: Path = field(init=False)
    dns: DnsServer = field(init=False)
    mail: MailSystem = field(init=False)
    policyd: Daemon = field(init=False)
    milterd: Daemon = field(init=False)
    mapd: Daemon | None = None
    frontd: Daemon | None = None
    daemons: list[Daemon] = field(default_factory=list)
    redis_nodes: dict[str, RedisNode] = field(default_factory=dict)
    sentinel: RedisNode | None = None
    disk: Path | None = None
    notes: list[str] = field(default_factory=list)
    downtimes: dict[str, Downtime] = field(default_factory=dict)
    unsigned_files: list[str] = field(default_factory=list)
    stopped_redis: RedisNode | None = None
    _dovecot_up: bool = True
    _postfix_up: bool = True
    _dns_dropped: bool = False
    dkim_key_path: Path = field(init=False)

    # ---- set-up ---------------------------------------------------------------------------
    def start(self) -> None:
        self.root.chmod(0o755)
        self._network()
        self._dns()
        store_url = self._store()
        self._daemons(store_url)
        self._mail()
        self._lists()

    def _network(self) -> None:
        _run(["ip", "link", "set", "lo", "up"])
        # A run before this one in the same namespace (--store both) left its pair.
        _run(["ip", "link", "delete", "chaos0"], check=False)
        _run(["ip", "link", "add", "chaos0", "type", "veth", "peer", "name", "chaos1"])
        _run(["ip", "addr", "add", f"{GATEWAY_IP}/24", "dev", "chaos0"])
        for address in ALL_SOURCE_IPS:
            _run(["ip", "addr", "add", f"{address}/32", "dev", "chaos1"])
        for link in ("chaos0", "chaos1"):
            _run(["ip", "link", "set", link, "up"])

    def _dns(self) -> None:
        key = generate_key("rsa-sha256")
        self.dkim_key_path = self.root / "example.test.s1.key"
        write_key(key, self.dkim_key_path)
        spf = '"v=spf1 ip4:198.51.100.0/24 -all"'
        zones = {
            **DEFAULT_ZONES,
            "example.test": [
                f"s1._domainkey TXT ( {quoted_txt(txt_record(key))} )",
                f"@ TXT {spf}",
            ],
            REMOTE_DOMAIN: [f"@ TXT {spf}", f"mail A {GATEWAY_IP}"],
            FORBIDDEN_DOMAIN: [f"@ TXT {spf}"],
        }
        (self.root / "nsd").mkdir()
        self.dns = DnsServer(self.root / "nsd")
        self.dns.start(zones)

    def _redis_node(self, name: str, extra: list[str], sentinel_config: str | None) -> RedisNode:
        port = _free_port()
        directory = self.root / f"redis-{name}"
        directory.mkdir()
        argv = [shutil.which("redis-server") or "redis-server"]
        if sentinel_config is not None:
            conf = directory / "sentinel.conf"
            conf.write_text(sentinel_config)
            argv.append(str(conf))
        argv += ["--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory)]
        argv += ["--daemonize", "no", "--logfile", str(directory / "redis.log")]
        if sentinel_config is None:
            # Persistent, as a production store is: a restarted master keeps the lists.
            argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        node = RedisNode(name, port, argv + extra)
        node.start()
        return node

    def _store(self) -> str:
        if self.options.store == "redis":
            first = self._redis_node("a", [], None)
            second = self._redis_node("b", ["--replicaof", "127.0.0.1", str(first.port)], None)
            self.redis_nodes = {"a": first, "b": second}
            sentinel_config = (
                f"sentinel monitor mymaster 127.0.0.1 {first.port} 1\n"
                "sentinel down-after-milliseconds mymaster 5000\n"
                "sentinel failover-timeout mymaster 20000\n"
            )
            self.sentinel = self._redis_node("sentinel", ["--sentinel"], sentinel_config)
            self._wait_replica_known()
            return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/mymaster/0"
        # SQLite on a filesystem of its own, so the fault can fill it without filling /tmp.
        self.disk = self.root / "greylist-disk"
        self.disk.mkdir()
        _run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0755", "tmpfs", str(self.disk)])
        return f"sqlite://{self.disk / 'state.db'}"

    def _wait_replica_known(self) -> None:
        assert self.sentinel is not None
        client = redis.Redis(port=self.sentinel.port, socket_timeout=2, decode_responses=True)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.RedisError):
                    if client.execute_command("SENTINEL", "REPLICAS", "mymaster"):  # type: ignore[no-untyped-call]  # untyped in redis-py
                        return
                time.sleep(0.5)
        finally:
            client.close()
        self.notes.append("Sentinel did not see the replica within 60 s: failover may fail")

    def config_data(self, store_url: str) -> dict[str, dict[str, Any]]:
        p, m = self.root / "p", self.root / "m"
        dns = {"nameservers": [self.dns.nameserver], "timeout": 2.0}
        policyd: dict[str, Any] = {
            "listen": [f"unix:{p / 'policyd.sock'}"],
            "aliases_listen": f"unix:{p / 'aliases.sock'}",
            "socket_mode": "0660",
            "socket_group": "postfix",
            "workers": self.options.workers,
            "log_level": "info",
        }
        if self.options.policy_default_action:
            policyd["default_action"] = self.options.policy_default_action
        if self.options.policy_unreachable_action:
            policyd["unreachable_action"] = self.options.policy_unreachable_action
        if not self.options.aliases_socketmap:
            del policyd["aliases_listen"]
        front = self.root / "f"
        frontd = {
            "enabled": self.with_frontd,
            "milter_listen": f"unix:{front / 'milter-front.sock'}",
            "sasl_listen": f"unix:{front / 'auth-front.sock'}",
            "sasl_upstream": f"unix:{front / 'dovecot-auth'}",
            "socket_mode": "0660",
            "socket_group": "postfix",
        }
        return {
            **({"frontd": frontd} if self.with_frontd else {}),
            "store": {"url": store_url, "refresh_interval": 0.5},
            "policyd": policyd,
            "milterd": {
                "listen": [f"unix:{m / 'milterd.sock'}"],
                "socket_mode": "0660",
                "socket_group": "postfix",
                "log_level": "info",
            },
            "mail": {
                "hostname": "mx.example.test",
                "main_domain": "example.test",
                "listen": "all",
                "ipv6": False,
                "pop3": True,
                "pop3s": True,
                # Off: one user submits hundreds of messages a minute here, far beyond the
                # 10 logins a minute per client the default allows against password guessing.
                "auth_rate_limit": 0,
            },
            "dns": dns,
            "greylisting": {
                "enabled": True,
                "delay": self.options.greylist_delay,
                "auto_whitelist_after": 5,
            },
            "dnsbl": {"enabled": True, "zones": [{"zone": DNSBL_ZONE}], "budget": 2.0},
            "spf": {"enabled": True},
            "dkim": {
                "keys": [
                    {"domain": "example.test", "selector": "s1", "key": str(self.dkim_key_path)}
                ]
            },
        }

    @functools.cached_property
    def with_frontd(self) -> bool:
        return self.options.frontd and _has_command("frontd")

    @property
    def milter_socket(self) -> Path:
        """Where Postfix connects for the milter: frontd's front end, or milterd itself."""
        if self.with_frontd:
            return self.root / "f" / "milter-front.sock"
        return self.root / "m" / "milterd.sock"

    def _daemons(self, store_url: str) -> None:
        for d in ("p", "m", "f"):
            (self.root / d).mkdir(mode=0o755)
            (self.root / d).chmod(0o755)
        self.data = self.config_data(store_url)
        self.config_path = self.root / "postwarden.toml"
        self.config_path.write_text(to_toml(self.data), encoding="utf-8")
        base = [POSTWARDEN, "--config", str(self.config_path)]
        mode = self.options.restarts
        if mode == "auto":
            mode = "supervise" if supervise_available() else "harness"
        self.restart_mode = mode
        wrap = ["supervise"] if mode == "supervise" else []
        # As the appliance runs them: Postfix's lookup maps in `postwarden mapd`, policyd
        # with --no-maps, when this CLI has mapd; else policyd serves the maps itself.
        with_mapd = self.options.aliases_socketmap and self.options.mapd and _has_command("mapd")
        no_maps = ["--no-maps"] if with_mapd else []
        self.policyd = Daemon(
            "policyd",
            [*base, *wrap, "policyd", *no_maps],
            self.root / "policyd.log",
            self.root,
            bool(wrap),
        )
        self.milterd = Daemon(
            "milterd", [*base, *wrap, "milterd"], self.root / "milterd.log", self.root, bool(wrap)
        )
        self.daemons = [self.policyd, self.milterd]
        sockets = {
            "policyd": self.root / "p" / "policyd.sock",
            "milterd": self.root / "m" / "milterd.sock",
        }
        if with_mapd:
            self.mapd = Daemon(
                "mapd", [*base, *wrap, "mapd"], self.root / "mapd.log", self.root, bool(wrap)
            )
            self.daemons.append(self.mapd)
            sockets["mapd"] = self.root / "p" / "aliases.sock"
        if self.with_frontd:
            self.frontd = Daemon(
                "frontd", [*base, *wrap, "frontd"], self.root / "frontd.log", self.root, bool(wrap)
            )
            self.daemons.append(self.frontd)
            sockets["frontd"] = self.root / "f" / "milter-front.sock"
        for daemon in self.daemons:
            daemon.start()
        for daemon in self.daemons:
            self._wait_socket(sockets[daemon.name], daemon)
        self.downtimes = {name: Downtime(path) for name, path in sockets.items()}

    def _wait_socket(self, path: Path, daemon: Daemon) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not daemon.alive():
                raise RuntimeError(f"{daemon.name} exited at start:\n{daemon.log_path.read_text()}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(str(path))
                return
            time.sleep(0.05)
        raise RuntimeError(f"{daemon.name} did not listen on {path}")

    def _mail(self) -> None:
        cfg = parse_config(self.data)
        layout = private_layout(
            self.root / "mailsys",
            STANDARD_PORTS,
            policyd=f"unix:{self.root / 'p' / 'policyd.sock'}",
            milterd=f"unix:{self.milter_socket}",
        )
        layout = dataclasses.replace(layout, inet_interfaces=None, dovecot_listen=None)
        if self.options.aliases_socketmap:
            layout = dataclasses.replace(
                layout,
                virtual_alias_maps=f"socketmap:unix:{self.root / 'p' / 'aliases.sock'}:aliases",
            )
        root = self.root / "mailsys"
        root.mkdir(mode=0o755)
        ca = trustme.CA()
        for d in ("log", "sockets", "tls", "queue", "dovecot-run"):
            (root / d).mkdir(mode=0o755)
        cert = ca.issue_cert(cfg.mail.hostname, "localhost", "127.0.0.1")
        cert.private_key_pem.write_to_path(str(layout.self_signed_key))
        cert.cert_chain_pems[0].write_to_path(str(layout.self_signed_cert))
        postfix = pwd.getpwnam("postfix")
        nobody = pwd.getpwnam(layout.mail_user)
        layout.data_directory.mkdir()
        os.chown(layout.data_directory, postfix.pw_uid, postfix.pw_gid)
        layout.mail_root.mkdir()
        os.chown(layout.mail_root, nobody.pw_uid, nobody.pw_gid)
        layout.users_file.write_text(
            "".join(f"{u}:{{PLAIN}}{pw}::::::\n" for u, pw in LOCAL_USERS.items())
        )
        write_rendered(render_all(cfg, layout), root)
        self.mail = MailSystem(root=root, config=cfg, layout=layout, ca=ca, ports=STANDARD_PORTS)
        self.mail.start()

    def cli(self, *args: str) -> str:
        return _run([POSTWARDEN, "--config", str(self.config_path), *args])

    def _lists(self) -> None:
        self.cli("lists", "add", "forbidden", FORBIDDEN_DOMAIN, FORBIDDEN_MAILBOX, FORBIDDEN_IP)
        # List changes reach running daemons within a second (docs/ARCHITECTURE.md).
        time.sleep(2.0)

    # ---- the supervisor -------------------------------------------------------------------
    def restart_dead(self, now: float) -> None:
        """Start a dead daemon again RESTART_DELAY after it was found dead (without a
        supervisor); note how long each socket refused connections."""
        for downtime in self.downtimes.values():
            downtime.poll(now)
        for daemon in self.daemons:
            if daemon.supervised and daemon.alive():
                continue  # its supervisor restarts the daemon; only a dead supervisor is ours
            if daemon.alive() or daemon.frozen:
                daemon.dead_since = None
                continue
            if daemon.dead_since is None:
                daemon.dead_since = now
                if daemon.process is not None and daemon.process.returncode not in (
                    -signal.SIGKILL,
                    None,
                ):
                    daemon.failed_starts += 1
                continue
            if now - daemon.dead_since >= RESTART_DELAY:
                daemon.restarts += 1
                daemon.dead_since = None
                daemon.start()

    # ---- the faults -----------------------------------------------------------------------
    def execute(self, action: Action) -> str:
        """Do one action; return what was done, for the run's log."""
        kind, target = action.kind, action.target
        if target in ("policyd", "milterd"):
            daemon = self.policyd if target == "policyd" else self.milterd
            if kind == "kill":
                return f"SIGKILL {target} pid {daemon.kill()}"
            if kind == "freeze":
                # Just killed, it may still be starting: freeze it once it runs again.
                deadline = time.monotonic() + 10
                while daemon.pid is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                daemon.frozen = True
                pids = daemon.pids()
                daemon.signal_all(signal.SIGSTOP)
                return f"SIGSTOP {target} pids {pids}"
            if kind == "thaw":
                daemon.signal_all(signal.SIGCONT)
                daemon.frozen = False
                return f"SIGCONT {target}"
        if target == "dovecot":
            return self._stop_dovecot() if kind == "stop" else self._start_dovecot()
        if target == "postfix":
            pf = str(self.mail.layout.postfix_dir)
            verb = "stop" if kind == "stop" else "start"
            done = _start_daemonizing(["postfix", "-c", pf, verb], self.root / "faults.log")
            self._postfix_up = kind == "start"
            return f"postfix {verb} ({done})"
        if target == "redis":
            return self._redis_fault(kind)
        if target == "sentinel":
            assert self.sentinel is not None
            before = self.redis_master_port()
            client = redis.Redis(port=self.sentinel.port, socket_timeout=5)
            try:
                answer = client.execute_command("SENTINEL", "FAILOVER", "mymaster")  # type: ignore[no-untyped-call]  # untyped in redis-py
            except redis.RedisError as exc:
                answer = f"refused: {exc}"
            finally:
                client.close()
            deadline = time.monotonic() + 20
            after = before
            while after == before and time.monotonic() < deadline:
                time.sleep(0.2)
                after = self.redis_master_port()
            return f"SENTINEL FAILOVER mymaster: {answer!r}, master port {before} -> {after}"
        if target == "disk":
            return self._fill_disk() if kind == "fill" else self._free_disk()
        if target == "dns":
            return self._drop_dns() if kind == "stop" else self._pass_dns()
        raise ValueError(f"no such action {action}")

    def _stop_dovecot(self) -> str:
        pid_file = self.mail.layout.dovecot_base_dir / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return "dovecot: no pid file"
        # SIGTERM to the instance's process group (its master called setsid), as the fixture.
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(OSError, IndexError):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state == "Z":
                    break
            time.sleep(0.05)
        self._dovecot_up = False
        return f"dovecot stopped (pid {pid})"

    def _start_dovecot(self) -> str:
        conf = str(self.mail.layout.dovecot_dir / "dovecot.conf")
        done = _start_daemonizing(["dovecot", "-c", conf], self.root / "faults.log")
        self._dovecot_up = True
        return f"dovecot started ({done})"

    def redis_master_port(self) -> int | None:
        assert self.sentinel is not None
        client = redis.Redis(port=self.sentinel.port, socket_timeout=2, decode_responses=True)
        try:
            addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")  # type: ignore[no-untyped-call]  # untyped in redis-py
        except redis.RedisError:
            return None
        finally:
            client.close()
        return int(addr[1]) if addr else None

    def _redis_fault(self, kind: str) -> str:
        if kind == "stop":
            port = self.redis_master_port()
            for node in self.redis_nodes.values():
                if node.port == port:
                    node.stop()
                    self.stopped_redis = node
                    return f"redis master {node.name} (port {port}) stopped"
            return f"redis: master port {port} is not ours"
        stopped = self.stopped_redis
        if stopped is None:
            return "redis: nothing stopped"
        stopped.start()
        self.stopped_redis = None
        return f"redis {stopped.name} (port {stopped.port}) started again"

    def _fill_disk(self) -> str:
        assert self.disk is not None
        filler = self.disk / "filler"
        written = 0
        # Unbuffered, so ENOSPC comes from a write here and not from the close; 64-KiB
        # chunks, then 1-KiB ones for what the large ones could not take.
        with contextlib.suppress(OSError), filler.open("ab", buffering=0) as f:
            for size in (1 << 16, 1 << 10):
                chunk = b"\0" * size
                for _ in range(100_000):
                    try:
                        written += f.write(chunk) or 0
                    except OSError:
                        break
        free = shutil.disk_usage(self.disk).free
        return f"greylist disk filled ({written} bytes written, {free} bytes free)"

    def _free_disk(self) -> str:
        assert self.disk is not None
        with contextlib.suppress(FileNotFoundError):
            (self.disk / "filler").unlink()
        return f"greylist disk freed ({shutil.disk_usage(self.disk).free} bytes free)"

    def _drop_dns(self) -> str:
        address, port = self.dns.address, self.dns.port
        rules = (
            "table inet chaos {\n chain output {\n  type filter hook output priority 0;\n"
            f"  ip daddr {address} udp dport {port} drop\n"
            f"  ip daddr {address} tcp dport {port} drop\n }}\n}}\n"
        )
        done = subprocess.run(
            ["nft", "-f", "-"], input=rules, capture_output=True, text=True, timeout=10, check=False
        )
        if done.returncode == 0:
            self._dns_dropped = True
            return f"DNS {address}:{port} dropped (nft, this namespace only)"
        # No nftables in this kernel: freezing NSD is the same to a client (no answer).
        assert self.dns._proc is not None
        os.kill(self.dns._proc.pid, signal.SIGSTOP)
        self._dns_dropped = True
        return f"DNS frozen (SIGSTOP nsd; nft failed: {done.stderr.strip()})"

    def _pass_dns(self) -> str:
        if not self._dns_dropped:
            return "DNS: nothing to undo"
        done = subprocess.run(
            ["nft", "delete", "table", "inet", "chaos"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        if done.returncode != 0 and self.dns._proc is not None:
            os.kill(self.dns._proc.pid, signal.SIGCONT)
        self._dns_dropped = False
        return "DNS reachable again"

    # ---- what happened --------------------------------------------------------------------
    def postqueue(self) -> list[dict[str, Any]]:
        out = _run(["postqueue", "-c", str(self.mail.layout.postfix_dir), "-j"], check=False)
        items = []
        for line in out.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                items.append(json.loads(line))
        return items

    def flush(self) -> None:
        _run(["postqueue", "-c", str(self.mail.layout.postfix_dir), "-f"], check=False)

    def queued_tokens(self) -> tuple[set[str], set[str], int]:
        """(tokens of queued messages, tokens named by queued bounce notices, queue size)."""
        queued, bounced = set(), set()
        items = self.postqueue()
        for item in items:
            qid = str(item.get("queue_id", ""))
            text = subprocess.run(
                ["postcat", "-c", str(self.mail.layout.postfix_dir), "-q", qid],
                capture_output=True,
                timeout=30,
                check=False,
            ).stdout
            tokens = {t.decode() for t in TOKEN.findall(text)}
            if item.get("sender", "") in ("", "MAILER-DAEMON"):
                bounced |= tokens
            else:
                queued |= tokens
        return queued, bounced, len(items)

    def mailbox_tokens(self) -> tuple[dict[str, list[Delivery]], set[str], int]:
        """What Dovecot stored: copies by token, tokens named by bounce notices, file count."""
        parser = email.parser.BytesParser(policy=email.policy.compat32)
        dnsfunc = make_dnsfunc(DnsConfig(nameservers=[self.dns.nameserver], timeout=2.0))
        delivered: dict[str, list[Delivery]] = {}
        bounced: set[str] = set()
        files = 0
        for path in sorted(self.mail.layout.mail_root.glob("*/*/Maildir/*/*")):
            if path.parent.name not in ("new", "cur") or not path.is_file():
                continue
            files += 1
            raw = path.read_bytes()
            headers = parser.parsebytes(raw, headersonly=True)
            mailbox = path.parents[2].name
            token = (headers.get("X-Chaos-Token") or "").strip()
            is_bounce = (headers.get("Return-Path") or "").strip() in ("<>", "") and not token
            if is_bounce or "MAILER-DAEMON" in (headers.get("From") or ""):
                bounced |= {t.decode() for t in TOKEN.findall(raw)}
                continue
            if not token:
                continue
            ours, why = False, ""
            if "outbound" in (headers.get("Subject") or ""):
                crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                # Twice: a key lookup that timed out here is not the gateway's fault.
                for _ in range(2):
                    results = verify_message(crlf, dnsfunc)
                    ours = any(
                        r.result == "pass" and r.domain == "example.test" and r.selector == "s1"
                        for r in results
                    )
                    if ours:
                        break
                if not ours:
                    why = f"{path.name}: " + (
                        ", ".join(
                            f"{r.result} d={r.domain} s={r.selector} {r.reason}" for r in results
                        )
                        or "no DKIM-Signature"
                    )
                    self.unsigned_files.append(why)
            delivered.setdefault(token, []).append(Delivery(mailbox, ours))
        return delivered, bounced, files

    def daemon_log_counts(self, daemon: Daemon) -> dict[str, int]:
        """Starts, errors and tracebacks in a daemon's log (its supervisor's lines included)."""
        text = daemon.log_path.read_text(errors="replace")
        return {
            "starts": text.count(f"supervise: started {daemon.name}")
            if daemon.supervised
            else daemon.restarts + 1,
            "ERROR lines": text.count(" ERROR "),
            "tracebacks": text.count("Traceback"),
            "decision lines": text.count(", verdict=") + text.count(", dkim="),
        }

    def unlogged_decisions(self) -> tuple[int, int]:
        """(inbound messages Postfix queued on port 25, of those without a policyd line
        naming their queue id): decision lines lost (issue #14 item 5)."""
        queued = set(
            re.findall(r"postfix/smtpd\[\d+\]: ([0-9A-F]{6,}): client=", self.mail.postfix_log)
        )
        policyd_log = self.policyd.log_path.read_text(errors="replace")
        logged = set(re.findall(r"policyd: ([0-9A-F]{6,}): client=", policyd_log))
        return len(queued), len(queued - logged)

    def log_counts(self) -> dict[str, int]:
        """Lines in Postfix's log an operator would look for (see issue #14)."""
        text = self.mail.postfix_log
        patterns = {
            "451 lookup failure": "Temporary lookup failure",
            "queue file write error": "queue file write error",
            "no SASL mechanisms": "no SASL authentication mechanisms",
            "milter-reject (milterd down)": "milter-reject:",
            "milter warnings": "warning: milter ",
            "policy service unavailable": "problem talking to server",
            "address resolver failure": "address resolver failure",
            "lmtp deferred": "status=deferred",
            "delivery temporarily suspended": "delivery temporarily suspended",
            "RCPT 450 unverified address": "Recipient address rejected: unverified address",
        }
        return {name: text.count(needle) for name, needle in patterns.items()}

    # ---- tear-down ------------------------------------------------------------------------
    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._dns_dropped:
                self._pass_dns()
        for daemon in ("postfix",):
            with contextlib.suppress(Exception):
                _run(["postfix", "-c", str(self.mail.layout.postfix_dir), "abort"], check=False)
                del daemon
        with contextlib.suppress(Exception):
            if not self._dovecot_up:
                self._start_dovecot()
            self.mail._postfix_started = False
            self.mail.stop()
        for d in self.daemons:
            with contextlib.suppress(Exception):
                d.stop()
        for node in [*self.redis_nodes.values(), *([self.sentinel] if self.sentinel else [])]:
            with contextlib.suppress(Exception):
                node.stop()
        with contextlib.suppress(Exception):
            self.dns.close()
        if self.disk is not None:
            _run(["umount", "-l", str(self.disk)], check=False)


@contextlib.contextmanager
def running_rig(options: RigOptions, keep: bool = False) -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="pw-chaos-"))
    rig = Rig(root, options)
    try:
        rig.start()
        yield rig
    finally:
        rig.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
