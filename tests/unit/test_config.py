"""Settings: every variable is checked at start and a bad value names itself in one line."""

from __future__ import annotations

import math
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from cluster.config import MARKET_TOPIC
from cluster.config import RULES
from cluster.config import ConfigError
from cluster.config import Settings
from cluster.config import http_url
from feed.settings import MARKET_TOPIC as FEED_TOPIC
from feed.settings import FeedBounds

REPO = Path(__file__).resolve().parents[2]

# variable -> values it refuses
BAD = {
    "KAFKA_BROKERS": ["localhost", "h:0", "h:70000", "h:9092,,k:1", "h :1", "h:1:2", "::1:9092",
                      "[k1]:9092", "a:\u0669\u0660\u0669\u0662"],
    "BACKPACK_WS_URL": ["https://ws.backpack.exchange", "wss://", "backpack", "wss://a b",
                        "ws://127.0.0.1:abc", "ws://:80", "ws://h:0", "ws://h:65536",
                        "ws://[::1", "ws://u:p@:80"],
    "FEED_SOURCE": ["kafka", "sim?rate=0", "sim?rate=nan", "sim?x=1", "replay:", "auto?wait=-1",
                    "replay:/no/such/file.jsonl", "sim?seed=--5", "auto?seed=\u00b2",
                    "sim?rate=1_000", "sim?rate=\u0665", "auto?wait=1e3", "sim?rate=+5",
                    "sim?seed=x&seed=1", "sim?rate=2&rate=3"],
    "PORT": ["0", "65536", "-1", "4000.0", "http", "", "\u0661\u0662", "\uff11\uff12", "+5"],
    "HOST": ["", "a b", "host/x", "999.999.999.999", "[[[", "-", ":::", "[::1]", "a..b", "1.2.3",
             "-a.b", "a-.b", "x" * 64 + ".b", "h\u0131"],
    "RAY_ADDRESS": ["ray:// host", "garbage", "local", "h:0", "h:65536", "ray://", "h:",
                    "http://127.0.0.1:8265", "ray://h:99999", "h:6379 ", "\u0663", "/"],
    "ASSETS": ["DOGE", "SOL,SOL", "SOL,,BTC", ",", "\u017fol", "", "  "],
    "SHARDS": ["0", "-1", "x", "SOL=0", "SOL=2,SOL=3", "DOGE=1", "257", "SOL=1,BTC", "1.5",
               "\u0663", "SOL=\u0661", "\u017fol=2", "*=2", "SOL=3,*=2"],
    "DATA_DIR": ["", "/dev/null", " /tmp/x", "/tmp/x ", "/tmp/" + "a" * 300],
    "MAINTENANCE_MARGIN_RATE": ["1", "1.5", "-0.001", "0.0000001", "nan", "abc", ""],
    "MAX_PRICE_AGE_S": ["inf", "-inf", "nan", "0", "-1", "86400.5", "1e400", "x", "", "1e-9",
                        "1_000", "\u0661\u0662"],
    "SIGNUP_BALANCE": ["-1", "1000000.000001", "0.0000001", "1e3", "abc"],
    "MAX_CLOCK_SKEW_S": ["-0.1", "3600.1", "inf", "nan", "x"],
    "MAX_TICK_JUMP_BPS": ["0", "-5", "1000001", "10.5", "x", ""],
    "MAX_BODY_BYTES": ["0", "x"],
    "MAX_JSON_DEPTH": ["0", "100000"],
    "API_KEY_RATE_PER_S": ["-1"],
    "API_KEY_BURST": ["0"],
    "SIGNUPS_PER_MIN": ["-1"],
    "PUBLIC_RATE_PER_S": ["-1", "1000001", "2.5", "x"],
    "PUBLIC_BURST": ["0", "1000001", "x"],
    "STATE_POSITIONS": ["0", "10001", "x"],
    "MAX_OPEN_POSITIONS": ["0", "100001", "x"],
    "MAX_OPEN_ORDERS": ["0", "100001", "-1"],
    "CLIENT_ORDER_ID_TTL_S": ["59", "2592001", "1.5"],
    "MAX_CLIENT_ORDER_IDS": ["0", "10000001", "-1", "1e5"],
    "HTTP_CONNECTIONS": ["-1", "100001", "many", "1.5"],
    "WS_CONNECTIONS": ["0", "100001", "ten"],
    "WS_SUBSCRIPTIONS": ["0", "10001", "-5"],
    "WS_UNSENT": ["0", "1000001", "1e3"],
    "WS_MARKET_INTERVAL_MS": ["-1", "60001", "0.5", "x"],
    "ACCOUNT_EVENTS_TOPIC": ["", "has space", "a/b", "..", "x" * 250, "backpack-market-updates",
                             "__consumer_offsets", "__transaction_state"],
    "API_REPLICAS": ["0", "65", "two"],
    "API_MAX_REPLICAS": ["-1", "65", "1.5"],
    "MIN_FREE_DISK_MB": ["-1", "10000001", "1e2", "100MB"],
}


@pytest.mark.parametrize(("var", "value"), [(v, x) for v, xs in BAD.items() for x in xs])
def test_a_bad_value_stops_with_one_line_naming_it(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    text = str(info.value)
    assert text.startswith(f"{var} must be {RULES[var]} (got ")
    assert "\n" not in text


def test_a_refused_source_url_is_shown_without_its_credentials() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"BACKPACK_WS_URL": "wss://trader:s3cret@ws.example:abc/stream"})
    assert "s3cret" not in str(info.value) and "trader" not in str(info.value)
    assert "wss://***@ws.example:abc/stream" in str(info.value)
    url = "wss://trader:s3cret@ws.example:9443/stream"
    assert Settings.from_env({"BACKPACK_WS_URL": url}).backpack_ws_url == url


def test_messages_of_the_issue() -> None:
    with pytest.raises(ConfigError, match=r"^MAINTENANCE_MARGIN_RATE must be in \[0, 1\) .*"
                                          r"\(got 1\)$"):
        Settings.from_env({"MAINTENANCE_MARGIN_RATE": "1"})
    with pytest.raises(ConfigError, match=r"^MAX_PRICE_AGE_S must be a finite number in "
                                          r"\(0, 86400\] \(got inf\)$"):
        Settings.from_env({"MAX_PRICE_AGE_S": "inf"})


def test_the_replicas_ports_must_fit_above_the_port() -> None:
    """Behind the front door on PORT, API_REPLICAS replicas and the door's three listeners
    take the ports above it."""
    assert Settings.from_env({"PORT": "65530", "API_REPLICAS": "2"}).api_replicas == 2
    assert Settings.from_env({"PORT": "65535", "API_REPLICAS": "1"}).api_replicas == 1
    with pytest.raises(ConfigError, match=r"^API_REPLICAS must be .*PORT 65531 \+ it \+ 3"):
        Settings.from_env({"PORT": "65531", "API_REPLICAS": "2"})


def test_autoscaling_runs_between_the_replicas_and_the_most() -> None:
    s = Settings.from_env({"API_REPLICAS": "2", "API_MAX_REPLICAS": "4"})
    assert (s.autoscaled, s.replica_slots) == (True, 4)
    s = Settings.from_env({"API_REPLICAS": "2", "API_MAX_REPLICAS": "2"})
    assert (s.autoscaled, s.replica_slots) == (False, 2)
    assert (Settings().autoscaled, Settings().replica_slots) == (False, 1)
    with pytest.raises(ConfigError, match=r"^API_MAX_REPLICAS must be .*at least API_REPLICAS 3"):
        Settings.from_env({"API_REPLICAS": "3", "API_MAX_REPLICAS": "2"})
    with pytest.raises(ConfigError, match=r"^API_MAX_REPLICAS must be .*PORT 65530 \+ it \+ 3"):
        Settings.from_env({"PORT": "65530", "API_MAX_REPLICAS": "3"})


def test_a_data_dir_below_a_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    """Nothing could be made there: status said it could not read a layout.json, and a start
    failed on it, neither naming DATA_DIR."""
    (tmp_path / "file").write_text("")
    for below in ("file/data", "file/a/b"):
        with pytest.raises(ConfigError) as info:
            Settings.from_env({"DATA_DIR": str(tmp_path / below)})
        text = str(info.value)
        assert text.startswith(f"DATA_DIR must be {RULES['DATA_DIR']} (got ")
        assert text.endswith(f": {tmp_path / 'file'} is a file)")
    assert Settings.from_env({"DATA_DIR": str(tmp_path / "a/b")}).data_dir == tmp_path / "a/b"


def test_every_variable_has_a_rule_and_a_refusal() -> None:
    assert set(BAD) == set(RULES)


@pytest.mark.parametrize(("var", "field", "text", "value"), [
    ("PORT", "port", "4001", 4001), ("MAX_PRICE_AGE_S", "max_price_age_us", "2.5", 2_500_000),
    ("MAINTENANCE_MARGIN_RATE", "maintenance_margin_ppm", "0.1", 100_000),
    ("SIGNUP_BALANCE", "signup_balance_micros", "10.000001", 10_000_001)])
def test_a_number_with_spaces_or_a_line_end_around_it_is_that_number(
        var: str, field: str, text: str, value: int) -> None:
    """As an env file with CRLF line ends gives it; the two decimals were refused, while the
    integers and seconds took it."""
    for raw in (f" {text} ", f"{text}\r", f"\t{text}\n"):
        assert getattr(Settings.from_env({var: raw}), field) == value, raw


@pytest.mark.parametrize("address", ["auto", "10.0.0.2:6379", "head.example:6379",
                                     "[::1]:6379", "ray://head:10001", "ray://head"])
def test_a_ray_address_of_each_form_ray_joins_is_taken(address: str) -> None:
    assert Settings.from_env({"RAY_ADDRESS": address}).ray_address == address


def test_brokers_of_spaces_only_are_unset_and_spaces_around_them_go() -> None:
    assert Settings.from_env({"KAFKA_BROKERS": " "}).kafka_brokers is None
    assert Settings.from_env({"KAFKA_BROKERS": " a:9092 "}).kafka_brokers == "a:9092"


def test_good_values_and_defaults() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.max_clock_skew_s, s.max_tick_jump_bps, s.max_price_age_s) == (5.0, 1000, 15.0)
    s = Settings.from_env({
        "KAFKA_BROKERS": "k1:9092,[::1]:9093", "BACKPACK_WS_URL": "ws://127.0.0.1:1/x",
        "FEED_SOURCE": "sim?seed=7&rate=50", "PORT": "4001", "HOST": "0.0.0.0",
        "RAY_ADDRESS": "auto", "ASSETS": "sol, eth", "SHARDS": "SOL=3", "DATA_DIR": "/tmp/x",
        "MAINTENANCE_MARGIN_RATE": "0.005", "MAX_PRICE_AGE_S": "86400", "SIGNUP_BALANCE": "0",
        "MAX_CLOCK_SKEW_S": "0", "MAX_TICK_JUMP_BPS": "1000000",
        "ACCOUNT_EVENTS_TOPIC": "team-a.account_events-1"})
    assert s.kafka_brokers == "k1:9092,[::1]:9093" and s.port == 4001
    assert s.account_topic == "team-a.account_events-1"
    assert Settings().account_topic == "shardex-account-events"
    assert list(s.assets) == ["SOL", "ETH"] and s.shards_of("SOL") == 3
    assert s.maintenance_margin_ppm == 5000 and s.signup_balance_micros == 0
    assert s.feed.bounds == FeedBounds(86_400_000_000, 0, 1_000_000)
    assert s.feed.assets is s.assets and s.feed.bootstrap_servers == "k1:9092,[::1]:9093"


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1", "::", "::1", "fe80::1",
                                  "::ffff:127.0.0.1", "localhost", "api-1.example.com",
                                  "a1.b2", "1.2.3.example", "x" * 63 + ".b"])
def test_a_host_is_an_ip_address_or_a_host_name(host: str) -> None:
    assert Settings.from_env({"HOST": host}).host == host


def test_a_replay_source_says_whether_its_path_is_missing_or_not_a_file(tmp_path: Path) -> None:
    """A path that is there but not a regular file (a device, a directory) is not "no file"."""
    for path, why in [(tmp_path / "missing.jsonl", f"no file {tmp_path / 'missing.jsonl'}"),
                      (Path("/dev/zero"), "/dev/zero is not a regular file"),
                      (tmp_path, f"{tmp_path} is not a regular file")]:
        with pytest.raises(ConfigError) as info:
            Settings.from_env({"FEED_SOURCE": f"replay:{path}"})
        assert str(info.value).endswith(f": {why})"), str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "var"),
    [("maintenance_margin_ppm", 1_000_000, "MAINTENANCE_MARGIN_RATE"),
     ("max_price_age_s", math.inf, "MAX_PRICE_AGE_S"),
     ("max_clock_skew_s", -1.0, "MAX_CLOCK_SKEW_S"),
     ("max_tick_jump_bps", 0, "MAX_TICK_JUMP_BPS"),
     ("port", 0, "PORT"),
     ("shards", {"SOL": 0}, "SHARDS"),
     ("shards", {"*": 200, "SOL": 100}, "SHARDS"),
     ("feed_source", "kafka", "FEED_SOURCE"),
     ("signup_balance_micros", -1, "SIGNUP_BALANCE"),
     ("account_topic", "no spaces", "ACCOUNT_EVENTS_TOPIC")],
)
def test_settings_built_directly_are_checked_too(field: str, value: object, var: str) -> None:
    with pytest.raises(ConfigError, match=f"^{var} must be "):
        Settings(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["0.001009", "0.000498", "4.35", "15", "0.000001"])
def test_the_shards_and_the_feed_hold_prices_equally_long(text: str) -> None:
    """MAX_PRICE_AGE_S in whole microseconds, the same for the shards (opens and closes refused
    on an older price) and the feed (older ticks dropped). The shards' value was cut toward
    zero: 0.001009 s held there as 1008 us, 1009 us at the feed."""
    settings = Settings.from_env({"MAX_PRICE_AGE_S": text})
    exact = int(Decimal(text) * 1_000_000)
    assert settings.max_price_age_us == settings.feed.bounds.max_price_age_us == exact


def test_topic_lives_in_feed_and_is_re_exported() -> None:
    assert MARKET_TOPIC is FEED_TOPIC == "backpack-market-updates"


def test_feed_imports_nothing_from_cluster() -> None:
    code = ("import sys, feed.backpack, feed.conflation, feed.frames, feed.gate, feed.message, "
            "feed.payload, feed.pipeline, feed.producer, feed.replay, feed.service, feed.settings, "
            "feed.sim, feed.source, feed.broker; "
            "print(sorted(m for m in sys.modules if m == 'cluster' or m.startswith('cluster.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_prints_the_line_and_exits_non_zero() -> None:
    env = {"PATH": "/usr/bin:/bin", "MAINTENANCE_MARGIN_RATE": "1"}
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "MAINTENANCE_MARGIN_RATE must be in [0, 1)" in lines[0], out.stderr
    assert "(got 1)" in lines[0] and out.stdout == ""


@pytest.mark.parametrize(("host", "url"), [("127.0.0.1", "http://127.0.0.1:4000"),
                                           ("localhost", "http://localhost:4000"),
                                           ("::1", "http://[::1]:4000"),
                                           ("2001:db8::7", "http://[2001:db8::7]:4000")])
def test_the_api_url_names_its_host_and_port_as_urls_write_them(host: str, url: str) -> None:
    # the banner's and the address record's URL: an IPv6 host without brackets reads as a port
    assert http_url(host, 4000) == url
    parsed = httpx.URL(http_url(host, 4000))
    assert (parsed.host, parsed.port) == (host, 4000)
