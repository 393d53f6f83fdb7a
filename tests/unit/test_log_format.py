"""``--log-format json``: one JSON object per line, with the exception when there is one."""

from __future__ import annotations

import json
import logging
import sys

from isthmus.cli import JsonFormatter, _parser


def test_json_log_lines() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "isthmus.app", logging.WARNING, __file__, 1, "cluster %s: %s", ("west", "stale"), None
    )
    line = json.loads(formatter.format(record))
    assert line["level"] == "warning"
    assert line["logger"] == "isthmus.app"
    assert line["message"] == "cluster west: stale"
    assert line["time"].endswith("+00:00")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(formatter.format(failed))
    assert "RuntimeError: boom" in entry["exception"]
    assert "\n" not in formatter.format(failed)  # one line, whatever the traceback


def test_the_flag_is_parsed() -> None:
    assert _parser().parse_args(["--log-format", "json", "status"]).log_format == "json"
    assert _parser().parse_args(["status"]).log_format == "text"
