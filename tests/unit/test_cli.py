"""The CLI's contract: --help shows each default once, flag combinations are usage errors (exit 2), and a long
command's console carries the project's lines only, the rest going to the log file its last line names."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from melanoma import cli


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, nested in _subparsers(sub):
                    yield f"{name} {inner}", nested


def _option_help(sub: argparse.ArgumentParser, monkeypatch) -> dict[str, str]:
    """Each option's help text as --help prints it, unwrapped."""
    monkeypatch.setenv("COLUMNS", "1000")
    shown, lines = {}, sub.format_help().splitlines()
    for line, after in zip(lines, [*lines[1:], ""]):
        if not line.startswith("  -"):
            continue
        invocation, gap, text = line.strip().partition("  ")
        if not gap:  # a long invocation: the help is alone on the next line
            text = after
        shown |= {word.rstrip(","): text.strip() for word in invocation.split() if word.startswith("-")}
    return shown


def test_help_shows_every_default_once_and_never_none(monkeypatch):
    checked = 0
    for name, sub in _subparsers(cli.parser()):
        shown = _option_help(sub, monkeypatch)
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
                continue
            text = shown[action.option_strings[-1]]
            assert "(default: None)" not in text, (name, action.dest, text)
            assert text.count("(default") <= 1, (name, action.dest, text)
            if action.default is not None and action.default is not False:
                assert text.count(f"(default: {action.default})") == 1, (name, action.dest, text)
            checked += 1
    assert checked > 50


@pytest.mark.parametrize(
    "argv, said",
    [
        (["query", "s", "--sql", "SELECT 1", "--top", "3"], "--sql takes no filter flags"),
        (["query", "s", "--sql", "SELECT 1", "--flagged"], "--sql takes no filter flags"),
        (["report", "s", "--out", "r.html"], "give SCORES_URI --date D"),
        (["report", "--date", "2026-11-25", "--out", "r.html", "--model", "m"], "give SCORES_URI --date D"),
        (["report", "--out", "r.html"], "give SCORES_URI --date D"),
        (["augment", "w", "--target-per-class", "3", "--add-per-class", "2"], "not allowed with argument"),
        (["query", "s", "--date", "2026-13-01"], "'2026-13-01' is not a date"),
    ],
)
def test_flag_combinations_are_usage_errors(argv, said, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert said in err and f"usage: melanoma {argv[0]}" in err, err


def test_dates_today_and_yesterday_are_utc():
    today = datetime.now(timezone.utc).date()
    assert cli.iso_date("today") == today.isoformat()
    assert cli.iso_date("yesterday") == (today - timedelta(days=1)).isoformat()
    assert cli.iso_date("2026-11-25") == "2026-11-25"


QUIET_RUN = """
import logging, os, sys
from melanoma import runtime
with runtime.session("probe", verbose={verbose}, log_file=True):
    os.write(2, b"core_worker.cc:123 a C++ log line\\n")
    print("a Python write to stderr", file=sys.stderr)
    logging.getLogger("ray.train").warning("Failed to query Ray Train Controller actor state.")
    logging.getLogger("melanoma.probe").info("step 1/1 the project's own line")
print("the result")
"""


def test_a_quiet_session_keeps_third_party_logs_in_the_file_its_last_line_names():
    run = subprocess.run([sys.executable, "-c", QUIET_RUN.format(verbose=False)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "the result\n"
    lines = run.stderr.splitlines()
    assert lines[0] == "step 1/1 the project's own line", lines
    assert len(lines) == 2 and lines[1].startswith("logs: "), lines
    log_file = re.match(r"logs: (\S+)", lines[1]).group(1)
    logged = open(log_file).read()
    for noise in ("core_worker.cc:123", "a Python write to stderr", "Failed to query Ray Train Controller", "the project's own line"):
        assert noise in logged, (noise, logged)


def test_verbose_shows_everything_and_writes_no_log_file():
    run = subprocess.run([sys.executable, "-c", QUIET_RUN.format(verbose=True)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for said in ("core_worker.cc:123", "a Python write to stderr", "Failed to query Ray Train Controller", "the project's own line"):
        assert said in run.stderr, run.stderr
    assert "logs: " not in run.stderr
