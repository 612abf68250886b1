"""What `config check` accepts, every daemon starts with; what they would refuse, it refuses.

Configs are generated over every key of the model (a key without a strategy here fails
`test_every_key_has_a_strategy`), mixing valid and invalid forms of each grammar. Many are
checked in-process; a bounded number of accepted ones start `postwarden policyd` and
`postwarden milterd`, `postwarden frontd` (and `postwarden mapd` when its socket is set) on
temp unix sockets, which must be listening without a traceback.
Only the keys that name this machine's files, sockets, ports and groups are pinned to the
temp dir before the daemons start (file existence is not a grammar).
"""

from __future__ import annotations

import copy
import socket
import subprocess
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from postwarden.config import Config, ConfigError, parse_config
from postwarden.config.loading import load_config
from tests.fixtures import daemon_process
from tests.fixtures.policyd_daemon import POSTWARDEN, to_toml

# -- strategies per grammar ---------------------------------------------------------------

_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_octet = st.integers(0, 255).map(str)
_messy = st.sampled_from(
    ["", " ", "*", "10.0.0.0/33", "1.2.3", "fe80::1%eth0", "a b", "-x.example", "10.0.0.0/x"]
)
networks = st.one_of(
    _ipv4,
    _ipv6,
    st.builds(lambda a, n: f"{a}/{n}", _ipv4, st.integers(0, 32)),
    st.builds(lambda a, n: f"{a}/{n}", _ipv6, st.integers(0, 128)),
    st.builds(lambda a, n: f"{a}:255.255.{n}.0", _ipv4, st.sampled_from([0, 255, 128, 7])),
    st.builds(lambda a, b: f"{a}.{b}.*", _octet, _octet),
    st.builds(lambda a: f"::ffff:{a}/120", _ipv4),
    _messy,
)
ports = st.one_of(st.integers(1, 65535), st.sampled_from([0, 70000]))
nameservers = st.one_of(
    _ipv4,
    _ipv6,
    st.builds(lambda a, p: f"{a}:{p}", _ipv4, ports),
    st.builds(lambda a, p: f"[{a}]:{p}", _ipv6, ports),
    st.sampled_from(["10.0.0.0/8", "resolver.example", "[::1]", "::ffff:127.0.0.1"]),
    _messy,
)
dnsbl_codes = st.one_of(
    _ipv4,
    st.builds(lambda a, b: f"{a}-{b}", _ipv4, _ipv4),
    st.builds(lambda a, n: f"{a}/{n}", _ipv4, st.integers(0, 32)),
    st.sampled_from(["127.0.0.0/8", "127.0.0.*", "::1", "127.0.0.2-::1"]),
    _messy,
)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,5}[a-z0-9])?", fullmatch=True)
domains = st.one_of(
    st.lists(_label, min_size=1, max_size=3).map(".".join),
    st.sampled_from(["Example.COM.", "a_b.example", "x.123", "a" * 64 + ".example", "bücher.de"]),
    _messy,
)
hosts = st.one_of(domains, _ipv4, _ipv6, st.builds(lambda a: f"[{a}]", _ipv6))
metrics_listen = st.one_of(
    st.none(),
    st.builds(lambda p: f"127.0.0.1:{p}", ports),
    st.builds(lambda p: f"[::1]:{p}", ports),
    st.sampled_from(["::1:9641", "localhost:9641", "0.0.0.0:9641", "127.0.0.1", "[::1]"]),
)
listen = st.one_of(
    st.builds(lambda n: f"unix:/tmp/pw-{n}.sock", st.integers(0, 9)),
    st.builds(lambda a, p: f"inet:{a}:{p}", st.one_of(_ipv4, domains), ports),
    st.builds(lambda a, p: f"inet:[{a}]:{p}", _ipv6, ports),
    st.sampled_from(["unix:rel.sock", "tcp:1.2.3.4:5", "inet:a b:10"]),
)
selectors = st.one_of(st.lists(_label, min_size=1, max_size=2).map(".".join), _messy)
mailboxes = st.one_of(st.builds(lambda d: f"user@{d}", domains), _messy)
texts = st.text(max_size=20)
paths = st.sampled_from(["/nonexistent/pw", "/tmp"])

# Keys whose value has a grammar (or a shape a plain type does not say): dotted key -> strategy.
BY_KEY: dict[str, st.SearchStrategy[Any]] = {
    "store.url": st.sampled_from(["sqlite:///tmp/x.db", "mysql://x", "redis://127.0.0.1:1/0"]),
    "policyd.listen": st.lists(listen, min_size=0, max_size=2),
    "policyd.socket_mode": st.sampled_from(["0660", "660", "0999", "x"]),
    "policyd.metrics_listen": metrics_listen,
    "policyd.aliases_listen": st.one_of(st.none(), listen),
    "policyd.mailbox_lmtp": st.one_of(st.none(), listen),
    "milterd.listen": st.lists(listen, min_size=0, max_size=2),
    "milterd.socket_mode": st.sampled_from(["0660", "660", "0999", "x"]),
    "milterd.authserv_id": st.one_of(st.none(), domains),
    "milterd.metrics_listen": metrics_listen,
    "frontd.milter_listen": listen,
    "frontd.sasl_listen": st.one_of(st.none(), listen),
    "frontd.sasl_upstream": st.one_of(st.none(), listen),
    "dns.nameservers": st.lists(nameservers, max_size=3),
    "dnsbl.zones.zone": domains,
    "dnsbl.zones.codes": st.lists(dnsbl_codes, max_size=3),
    "dkim.keys.domain": domains,
    "dkim.keys.selector": selectors,
    "network.trusted": st.lists(networks, max_size=3),
    "mail.hostname": domains,
    "mail.helo_name": st.one_of(st.none(), domains),
    "mail.main_domain": domains,
    "mail.additional_domains": st.lists(domains, max_size=2),
    "mail.relay_domains": st.lists(
        st.builds(lambda d, h: f"{d}|{h}", domains, hosts) | _messy, max_size=2
    ),
    "mail.relays.name": st.sampled_from(["isp", "b2", "Bad Name"]),
    "mail.relays.host": hosts,
    "mail.relays.sender_domains": st.lists(domains, max_size=2),
    "mail.copy_incoming_to": st.one_of(st.none(), mailboxes),
    "mail.copy_outgoing_to": st.one_of(st.none(), mailboxes),
    "mail.postmaster_address": st.one_of(st.none(), mailboxes),
    "mail.connection_control.addresses": st.lists(networks, max_size=3),
    "mail.sender_grants": st.dictionaries(
        st.builds(lambda d: f"u@{d}", domains), st.lists(mailboxes, max_size=2), max_size=2
    ),
}


def _leaf_strategy(annotation: Any) -> st.SearchStrategy[Any]:
    """A strategy from a plain annotation: bool, numbers, Literal, Path, str, optional."""
    if get_origin(annotation) is Annotated:
        return _leaf_strategy(get_args(annotation)[0])
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is list:
        return st.lists(_leaf_strategy(args[0]), max_size=2)
    if get_origin(annotation) is not None and type(None) in get_args(annotation):
        return st.one_of(st.none(), _leaf_strategy(args[0]))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(-2, 70000)
    if annotation is float:
        return st.floats(-1, 100, allow_nan=False)
    if str(get_origin(annotation)) == "typing.Literal":
        return st.sampled_from(get_args(annotation))
    if annotation is Path:
        return paths
    if annotation is str:
        return texts
    raise LookupError(annotation)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def model_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf key of `model`, dotted; items of a list of tables as `table.key`."""
    keys = []
    for name, info in model.model_fields.items():
        sub = _model_of(info.annotation)
        key = f"{prefix}{name}"
        keys.extend(model_keys(sub, f"{key}.") if sub else [key])
    return keys


def table_strategy(model: type[BaseModel], prefix: str = "") -> st.SearchStrategy[dict[str, Any]]:
    """Some of `model`'s keys, each from BY_KEY or its annotation; nested tables recursively."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_of(info.annotation)
        if sub is not None:
            table = table_strategy(sub, f"{key}.")
            is_list = get_origin(info.annotation) is list
            fields[name] = st.lists(table, max_size=2) if is_list else table
        elif key in BY_KEY:
            fields[name] = BY_KEY[key]
        else:
            try:
                fields[name] = _leaf_strategy(info.annotation)
            except LookupError:
                continue  # test_every_key_has_a_strategy names it
    return st.fixed_dictionaries({}, optional=fields)


configs = table_strategy(Config)


def test_every_key_has_a_strategy() -> None:
    uncovered = []
    for key in model_keys(Config):
        if key in BY_KEY:
            continue
        model: Any = Config
        for part in key.split(".")[:-1]:
            model = _model_of(model.model_fields[part].annotation)
        try:
            _leaf_strategy(model.model_fields[key.rsplit(".", 1)[-1]].annotation)
        except LookupError:
            uncovered.append(key)
    assert uncovered == [], f"add a strategy to BY_KEY for {uncovered}"


# -- config check, in-process ---------------------------------------------------------------


def _check(data: dict[str, Any]) -> Config | None:
    try:
        return parse_config(data)
    except ConfigError:
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_config_check_refuses_only_with_config_error(data: dict[str, Any]) -> None:
    cfg = _check(data)
    if cfg is not None:  # what was accepted is what the daemons build their objects from
        from policyd.metrics import parse_metrics_listen
        from postwarden.dns.resolver import make_resolver
        from postwarden.policy.dnsbl import parse_codes

        make_resolver(cfg.dns)
        for zone in cfg.dnsbl.zones:
            parse_codes(zone.codes)
        if cfg.policyd.metrics_listen is not None:
            parse_metrics_listen(cfg.policyd.metrics_listen)


# -- the daemons ------------------------------------------------------------------------------


def _without_none(value: Any) -> Any:
    """TOML has no null: an unset key is an absent key."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def pin_to_machine(data: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Point every key naming a file, socket, port, group or process count at the temp dir."""
    pinned = _without_none(copy.deepcopy(data))
    pinned["store"] = {**pinned.get("store", {}), "url": f"sqlite:///{tmp}/state.db"}
    policyd = pinned.setdefault("policyd", {})
    policyd["listen"] = [f"unix:{tmp}/policyd.sock"]
    policyd["workers"] = min(policyd.get("workers", 1), 2) or 1
    for key in ("socket_group", "metrics_listen"):
        policyd.pop(key, None)
    if policyd.get("aliases_listen") is not None:
        policyd["aliases_listen"] = f"unix:{tmp}/aliases.sock"
    if policyd.get("mailbox_lmtp") is not None:
        policyd["mailbox_lmtp"] = f"unix:{tmp}/lmtp.sock"
    milterd = pinned.setdefault("milterd", {})
    milterd["listen"] = [f"unix:{tmp}/milterd.sock"]
    for key in ("socket_group", "metrics_listen"):
        milterd.pop(key, None)
    frontd = pinned.setdefault("frontd", {})
    frontd["enabled"] = True  # frontd refuses to run for a config that does not use it
    frontd["milter_listen"] = f"unix:{tmp}/milter-front.sock"
    frontd.pop("socket_group", None)
    if frontd.get("sasl_listen") is not None:
        frontd["sasl_listen"] = f"unix:{tmp}/sasl-front.sock"
    if frontd.get("sasl_upstream") is not None:
        frontd["sasl_upstream"] = f"unix:{tmp}/dovecot-auth.sock"
    dkim = pinned.setdefault("dkim", {})
    dkim["key_directory"] = str(tmp / "dkim")
    dkim["keys"] = []  # a key file's existence is not a grammar
    pinned.get("greylisting", {}).pop("large_senders_file", None)
    mail = pinned.get("mail", {})
    mail.pop("tls", None)
    mail.pop("relays", None)
    mail.get("connection_control", {}).pop("addresses_file", None)
    return pinned


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def assert_starts(config: Path, daemon: str, sock: Path, tmp: Path) -> None:
    """The daemon is listening on `sock`, logged no traceback, and stops on SIGTERM."""
    log_path = tmp / f"{daemon}.log"
    process = daemon_process.spawn([POSTWARDEN, "--config", str(config), daemon], log_path, tmp)
    try:
        daemon_process.wait_until_answers(
            daemon, process, lambda: _listening(sock), lambda: log_path.read_text()
        )
        assert process.poll() is None
    finally:
        daemon_process.stop(process)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=configs)
def test_accepted_configs_start_every_daemon(
    data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("cfg")
    pinned = pin_to_machine(data, tmp)
    assume(_check(pinned) is not None)  # the refused ones are test_config_check_…'s
    config = tmp / "postwarden.toml"
    config.write_text(to_toml(pinned), encoding="utf-8")
    load_config(config)  # the file as written is the config that was checked
    assert_starts(config, "policyd", tmp / "policyd.sock", tmp)
    assert_starts(config, "milterd", tmp / "milterd.sock", tmp)
    assert_starts(config, "frontd", tmp / "milter-front.sock", tmp)
    if pinned["policyd"].get("aliases_listen") is not None:
        assert_starts(config, "mapd", tmp / "aliases.sock", tmp)


# -- fixed cases: one per unified grammar ---------------------------------------------------

BASE = (
    '[store]\nurl = "sqlite:///{tmp}/s.db"\n[policyd]\nlisten = ["unix:{tmp}/p.sock"]\n'
    '[milterd]\nlisten = ["unix:{tmp}/m.sock"]\n[dkim]\nkey_directory = "{tmp}/dkim"\n'
)

REFUSED = [
    ('[dns]\nnameservers = ["10.0.0.0/8"]\n', "dns.nameservers[0] = '10.0.0.0/8'", "IP address"),
    (
        '[dns]\nnameservers = ["resolver.example"]\n',
        "dns.nameservers[0]",
        "not a network or a host",
    ),
    (
        '[dnsbl]\nenabled = true\nzones = [{ zone = "zen.example", codes = ["::1"] }]\n',
        "dnsbl.zones[0].codes[0] = '::1'",
        "IPv4 addresses (A records) only",
    ),
    (
        '[dnsbl]\nenabled = true\nzones = [{ zone = "zen example", codes = [] }]\n',
        "dnsbl.zones[0].zone = 'zen example'",
        "not a valid domain label",
    ),
    ('[network]\ntrusted = ["10.0.0.0/0.0.0.255"]\n', "network.trusted[0]", "not contiguous"),
    ('[network]\ntrusted = ["*"]\n', "network.trusted[0]", "every address"),
    ('[mail]\nhostname = "mx.123"\n', "mail.hostname = 'mx.123'", "cannot end in a number"),
    ('[mail]\nhostname = "' + "a" * 64 + '.example"\n', "mail.hostname", "not a valid domain"),
    ('[policyd]\nmetrics_listen = "::1:9641"\n', "policyd.metrics_listen", '"[::1]:9641"'),
    ('[policyd]\nmetrics_listen = "127.0.0.1:0"\n', "policyd.metrics_listen", "1..65535"),
    ('[milterd]\nlisten = ["inet:a b:10"]\n', "milterd.listen[0]", "nor a host name"),
]


@pytest.mark.parametrize(("text", "key", "reason"), REFUSED)
def test_values_the_daemons_would_refuse_are_refused_with_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    config = tmp_path / "postwarden.toml"
    config.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [POSTWARDEN, "--config", str(config), "config", "check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if key in line)
    assert line.startswith(f"{config}: ")
    assert reason in line


ACCEPTED = [
    # A CIDR return-code filter is a legitimate filter: both daemons run with it.
    '[dnsbl]\nenabled = true\nzones = [{ zone = "zen.example", codes = ["127.0.0.0/8"] }]\n'
    '[dns]\nnameservers = ["127.0.0.1:1"]\n[spf]\nenabled = true\n',
    # The seed's wildcard and addr:mask forms, and IPv4-mapped networks, in trusted networks.
    '[network]\ntrusted = ["127.0.0.*", "::ffff:127.0.0.0/104", "10.1.2.0:255.255.255.0"]\n'
    '[dns]\nnameservers = ["[::1]:5353", "127.0.0.1"]\n',
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_fixed_accepted_configs_start_both_daemons(tmp_path: Path, text: str) -> None:
    config = tmp_path / "postwarden.toml"
    config.write_text(BASE.format(tmp=tmp_path) + text, encoding="utf-8")
    load_config(config)
    assert_starts(config, "policyd", tmp_path / "p.sock", tmp_path)
    assert_starts(config, "milterd", tmp_path / "m.sock", tmp_path)
