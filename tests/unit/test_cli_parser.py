"""The command line without privileges: the parser, bad values, and every exit status of
mace.errors.EXIT_CODES that can be reached without root; the others are shown to be what
`main` turns each kind of error into."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from mace import cli, errors
from mace.errors import EXIT_CODES

NO_SOCKET = "/nonexistent/mace.sock"


def run_main(argv, capsys) -> tuple[int, str, str]:
    """mace.cli.main in this process; argparse's own errors exit through SystemExit."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def run_mace(*argv, prefix=(), timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("MACE_SOCKET", None)
    return subprocess.run([*prefix, sys.executable, "-m", "mace", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def one_line_error(rc, out, err, code, message):
    assert rc == code, (rc, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mace: error: ") and re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert out == ""


# -- the parser -------------------------------------------------------------------------------

def test_every_command_is_there_and_has_help(capsys):
    parser = cli.build_parser()
    for cmd in ("trace", "demo", "events", "serve", "on", "off", "status", "read"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert f"usage: mace {cmd}" in capsys.readouterr().out


def test_trace_options_parse_to_their_values():
    a = cli.build_parser().parse_args(
        ["trace", "--netns", "web", "--netns", "1234", "-f", "csv", "-o", "x.csv", "--duration",
         "2.5", "--count", "10", "--hops", "--uplink", "eth1", "--table-size", "1024",
         "--ring-pages", "64", "--max-age", "250", "--end-at-xmit", "--no-tui", "-q"])
    assert a.command == "trace" and a.netns == ["web", "1234"]
    assert (a.format, a.output, a.duration, a.count) == ("csv", "x.csv", 2.5, 10)
    assert (a.hops, a.uplink, a.table_size, a.ring_pages, a.max_age) == (True, ["eth1"], 1024, 64, 250.0)
    assert not a.end_at_queue and a.tui is False and a.quiet


def test_serve_uplink_is_repeatable_like_traces():
    a = cli.build_parser().parse_args(["serve", "--uplink", "eth1", "--uplink", "wg0"])
    assert a.uplink == ["eth1", "wg0"]
    # none named: the service traces every uplink discovery finds, as trace does
    assert cli.build_parser().parse_args(["serve"]).uplink is None


def test_trace_defaults():
    a = cli.build_parser().parse_args(["trace", "--netns", "web"])
    assert a.format is None and a.output is None and a.duration is None and a.count is None
    assert not a.hops and a.tui is None and a.ring_pages is None and a.segment == "device"
    assert a.max_age == 1000 and a.table_size >= 2 and a.table_size & (a.table_size - 1) == 0
    # egress ends where native traffic joins the path: the uplink's qdisc is not isolation
    cli._check_tracer_options(a)
    assert a.end_at_queue is True


def test_each_segment_has_its_own_end_unless_one_is_asked_for():
    p = cli.build_parser()
    # the socket segment compares with a capture on the uplink: MACE's end, the driver
    for argv, end in ((["--segment", "socket"], False), (["--segment", "socket", "--end-at-queue"], True),
                      (["--end-at-xmit"], False)):
        a = p.parse_args(["trace", "--netns", "web", *argv])
        cli._check_tracer_options(a)
        assert a.end_at_queue is end, argv
    a = p.parse_args(["trace", "--netns", "web", "--segment", "socket", "--start-at-inner"])
    with pytest.raises(cli.UsageError, match="start-at-inner"):
        cli._check_tracer_options(a)


def test_end_at_queue_and_end_at_xmit_exclude_each_other(capsys):
    p = cli.build_parser()
    assert p.parse_args(["trace", "--netns", "web", "--end-at-queue"]).end_at_queue
    with pytest.raises(SystemExit):
        p.parse_args(["trace", "--netns", "web", "--end-at-queue", "--end-at-xmit"])
    assert "not allowed with" in capsys.readouterr().err


def test_client_options():
    p = cli.build_parser()
    a = p.parse_args(["read", "--follow", "-f", "jsonl", "--socket", "/s"])
    assert (a.op, a.follow, a.format, a.socket) == ("read", True, "jsonl", "/s")
    a = p.parse_args(["status", "--json"])
    assert a.op == "status" and a.json and a.socket is None


def test_version(capsys):
    from mace import __version__
    rc, out, _ = run_main(["--version"], capsys)
    assert rc == 0 and out.strip() == f"mace {__version__}"


# -- usage errors: 2 ----------------------------------------------------------------------------

ARGPARSE = [
    ("no-command", []),
    ("unknown-command", ["frobnicate"]),
    ("trace-without-netns", ["trace"]),
    ("format", ["trace", "--netns", "web", "-f", "xml"]),
    ("not-a-number", ["trace", "--netns", "web", "--count", "many"]),
    ("tui-and-no-tui", ["trace", "--netns", "web", "--tui", "--no-tui"]),
    ("read-format", ["read", "-f", "csv"]),
    ("unknown-option", ["status", "--frobnicate"]),
]


@pytest.mark.parametrize("argv", [a for _, a in ARGPARSE], ids=[n for n, _ in ARGPARSE])
def test_parser_refuses_with_2(argv, capsys):
    rc, out, err = run_main(argv, capsys)
    assert rc == 2, (rc, err)
    assert "usage: mace" in err and "Traceback" not in err and out == ""


BAD_VALUES = [
    ("duration", ["trace", "--netns", "web", "--duration", "-1"], r"--duration must be positive"),
    ("duration-zero", ["trace", "--netns", "web", "--duration", "0"], r"--duration must be positive"),
    ("count", ["trace", "--netns", "web", "--count", "0"], r"--count must be positive"),
    ("table-size", ["trace", "--netns", "web", "--table-size", "3"],
     r"--table-size 3 is not a power of two .*\(e\.g\. --table-size 2\)"),
    ("table-size-big", ["trace", "--netns", "web", "--table-size", str(1 << 27)],
     r"--table-size \d+ is not a power of two"),
    ("ring-pages", ["trace", "--netns", "web", "--ring-pages", "0"], r"--ring-pages 0 is not a power of two"),
    ("ring-pages-odd", ["trace", "--netns", "web", "--ring-pages", "96"], r"e\.g\. --ring-pages 64"),
    ("max-age", ["trace", "--netns", "web", "--max-age", "5000"], r"--max-age 5000(\.0)? must be between"),
    ("max-age-zero", ["trace", "--netns", "web", "--max-age", "0"], r"--max-age 0(\.0)? must be between"),
    ("serve-queue", ["serve", "--queue", "0"], r"--queue must be at least 1"),
    ("serve-namespaces", ["serve", "--max-namespaces", "0"], r"--max-namespaces must be at least 1"),
    ("serve-clients", ["serve", "--max-clients", "-3"], r"--max-clients must be at least 1"),
    ("serve-mode", ["serve", "--socket-mode", "999"], r"--socket-mode '999' is not an octal mode"),
    ("serve-mode-text", ["serve", "--socket-mode", "rw"], r"is not an octal mode \(e\.g\. 666"),
    ("serve-table", ["serve", "--table-size", "5"], r"--table-size 5 is not a power of two"),
    ("demo-count", ["demo", "--count", "0"], r"--count must be positive"),
    ("demo-interval", ["demo", "--interval", "0.001"], r"--interval below 0\.002 s would flood"),
    ("demo-colocated", ["demo", "--co-located", "65"], r"--co-located is limited to 64"),
    ("demo-colocated-negative", ["demo", "--co-located", "-1"], r"--co-located must be positive"),
    ("events-tracepoint", ["events", "-t", "net_dev_xmit"], r"'net_dev_xmit' is not a tracepoint name"),
    ("events-duration", ["events", "--duration", "-2"], r"--duration must be positive"),
]


@pytest.mark.parametrize("argv,message", [b[1:] for b in BAD_VALUES], ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_one_line_usage_errors(argv, message, capsys):
    one_line_error(*run_main(argv, capsys), EXIT_CODES["UsageError"], message)


def test_usage_error_as_a_command():
    r = run_mace("trace", "--netns", "web", "--table-size", "3")
    one_line_error(r.returncode, r.stdout, r.stderr, 2, r"--table-size 3 is not a power of two")


# -- the service is not there: 10 ---------------------------------------------------------------

@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["on"], ["off"], ["read"],
                                  ["read", "--follow"]])
def test_client_without_a_service_is_10(argv, capsys):
    one_line_error(*run_main([*argv, "--socket", NO_SOCKET], capsys),
                   EXIT_CODES["ServiceUnreachable"], re.escape(NO_SOCKET))


def test_client_socket_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("MACE_SOCKET", NO_SOCKET)
    one_line_error(*run_main(["status"], capsys), 10, re.escape(NO_SOCKET))


def test_status_without_a_service_as_a_command():
    r = run_mace("status", "--socket", NO_SOCKET)
    one_line_error(r.returncode, r.stdout, r.stderr, 10, re.escape(NO_SOCKET))


# -- no privileges: 3 ---------------------------------------------------------------------------

def _unprivileged() -> list[str] | None:
    """A prefix that runs a command without any capability, or None if there is none."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    # root without a bounding set: exec leaves it no effective capability
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"]


@pytest.mark.parametrize("argv", [["trace", "--netns", "1"], ["demo"],
                                  ["serve", "--socket", "/nonexistent/s"]],
                         ids=["trace", "demo", "serve"])
def test_without_capabilities_is_3(argv):
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("needs setpriv (util-linux) when run as root")
    r = run_mace(*argv, prefix=prefix)
    one_line_error(r.returncode, r.stdout, r.stderr, EXIT_CODES["PermissionProblem"],
                   r"\broot\b.*CAP_SYS_ADMIN")


# -- what main makes of each kind of error ------------------------------------------------------

def test_exit_codes_are_distinct_and_cover_every_error():
    codes = list(EXIT_CODES.values())
    assert len(set(codes)) == len(codes)
    assert 0 not in codes and 2 in codes
    kinds = {n for n, v in vars(errors).items()
             if isinstance(v, type) and issubclass(v, errors.MaceError)}
    assert kinds == set(EXIT_CODES)


@pytest.mark.parametrize("name", sorted(EXIT_CODES, key=EXIT_CODES.get))
def test_main_turns_each_error_into_its_status_and_one_line(name, capsys, monkeypatch):
    kind = getattr(errors, name)

    def fails(args):
        raise kind("the thing went wrong", hint="do this instead")

    monkeypatch.setattr(cli, "cmd_client", fails)
    rc, out, err = run_main(["status"], capsys)
    assert rc == EXIT_CODES[name] == kind.exit_code
    assert err == "mace: error: the thing went wrong (do this instead)\n" and out == ""



def test_a_mistyped_option_gets_its_subcommands_usage_and_the_nearest_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["trace", "--netns", "web", "--duraton", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mace trace ") and "did you mean --duration?" in err.splitlines()[-1]
    with pytest.raises(SystemExit):
        cli.main(["trace", "--netns", "web", "--bogus"])
    assert "did you mean" not in capsys.readouterr().err     # nothing near: no guess


def test_trace_help_has_examples_and_serve_help_mounts_the_socket_read_only(capsys):
    for argv in (["trace", "--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
    out = capsys.readouterr().out
    assert "examples:\n  mace trace --netns docker:web" in out
    assert "-v /run/mace:/run/mace:ro" in out
