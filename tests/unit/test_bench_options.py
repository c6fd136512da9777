"""A benchmark's option out of range is a usage error (exit 2, one line naming it) before
anything starts, not a traceback from inside the run."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

# per benchmark, the options it must refuse (numpy's generator takes no negative seed)
BAD_BY_KIND = {
    "engine": [["--positions", "-1"], ["--ticks", "0"], ["--orders", "x"], ["--seed", "-1"]],
    "api": [["--concurrency", "abc"], ["--concurrency", "1,,64"], ["--concurrency", "0"],
            ["--replicas", "-2"], ["--duration-s", "nan"]],
    "durability": [["--slices", "0"], ["--slice-s", "inf"]],
    "feed": [["--rate", "-5"]],
    "latency": [["--liquidating-share", "1.5"], ["--report", "/no/such/run.json"],
                ["--report", "/"]],
    "live": [["--clients", "1e3"]],
    "chaos": [["--interval", "0"], ["--seed", "\u0661"], ["--assets", "DOGE"],
              ["--assets", "SOL,sol"], ["--assets", ""], ["--assets", "SOL,,BTC"],
              ["--assets", "\u017fol"]],
    "footprint": [["--window-s", "-1"]], "serve_paths": [["--duration-s", "0"]],
}
BAD = [(kind, argv) for kind, options in BAD_BY_KIND.items() for argv in options]


@pytest.mark.parametrize(("kind", "argv"), BAD)
def test_an_option_out_of_range_is_a_usage_error(
        kind: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"bench.{kind}")
    with pytest.raises(SystemExit) as ended:
        module.main(argv)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {argv[0]}: {argv[1]!r} is not " in err, err
    assert "Traceback" not in err, err


def test_good_values_parse_as_numbers() -> None:
    from bench import options

    assert options.int_list("1, 64") == [1, 64]
    assert options.nonneg_int("0") == 0 and options.positive_int("7") == 7
    assert options.duration("0.5") == 0.5 and options.share("1") == 1.0
    assert options.integer("-3") == -3 and options.positive_int(" 5 ") == 5
    assert options.asset_list(" sol, BTC") == ("SOL", "BTC")


def test_a_file_to_write_after_the_run_is_checked_before_it(tmp_path: Path) -> None:
    """``bench latency --dump PATH`` wrote PATH after its run of minutes: a directory that
    did not exist failed it then, with a traceback and neither the dump nor the report."""
    import argparse

    from bench import options

    assert options.new_file(str(tmp_path / "run.json")) == str(tmp_path / "run.json")
    for bad in (str(tmp_path / "no" / "run.json"), str(tmp_path), ""):
        with pytest.raises(argparse.ArgumentTypeError, match=" is not a file path in an "):
            options.new_file(bad)


@pytest.mark.parametrize("text", ["not json", "{}", "[1]", "\udcff"])
def test_a_report_of_no_dump_is_a_usage_error(
        text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It ended in a JSONDecodeError or KeyError traceback."""
    from bench import latency

    path = tmp_path / "run.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(SystemExit) as ended:
        latency.main(["--report", str(path)])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --report {path}: not a run --dump wrote" in err, err
    assert "Traceback" not in err, err


@pytest.mark.parametrize(("kind", "text"), [
    ("positive_int", "\u0665"), ("nonneg_int", "1_000"), ("positive_int", "+8"),
    ("int_list", "1,\uff18"), ("integer", "\u0661"), ("duration", "1_0"), ("duration", "1e1"),
    ("duration_or_zero", "\u0660"), ("rate", "\u0665"), ("share", "0.5_0")])
def test_a_number_is_plain_ascii_decimal_text(kind: str, text: str) -> None:
    """int() and float() took these as 5, 1000, 8, 10, ...: the run went ahead with them."""
    import argparse

    from bench import options

    with pytest.raises(argparse.ArgumentTypeError, match=" is not "):
        getattr(options, kind)(text)


class _Parsed(Exception):
    """Raised in place of running the benchmark once its options parsed."""


ZERO_SKIPS = [("durability", "--positions"), ("durability", "--commits"),
              ("durability", "--ledger-closes"), ("api", "--positions"), ("engine", "--orders")]


@pytest.mark.parametrize(("kind", "option"), ZERO_SKIPS)
def test_an_option_whose_zero_skips_a_part_accepts_zero(
        kind: str, option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parsed(parse(self, *args, **kwargs))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    module = importlib.import_module(f"bench.{kind}")
    with pytest.raises(_Parsed) as parsed:
        module.main([option, "0"])
    [namespace] = parsed.value.args
    assert getattr(namespace, option[2:].replace("-", "_")) == 0


def test_a_chaos_run_whose_start_fails_ends_with_why(capsys: pytest.CaptureFixture[str]) -> None:
    """A Kafka the settings refuse stops the run before the platform starts: the CLI prints
    the one line naming it. Its cleanup joined the client thread it never started, and that
    RuntimeError hid the cause under a traceback; the empty DATA_DIR it made stayed behind."""
    from cluster.cli import main

    assert main(["bench", "chaos", "--bootstrap", "localhost"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("shardex: configuration error: KAFKA_BROKERS must be "), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "DATA_DIR is kept" not in out, out
