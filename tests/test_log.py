"""appliance.log: key=value lines, quoting, and nothing rendered for a level that is off."""

from __future__ import annotations

import io
import logging
import re

from appliance.log import Fields, _KeyValueFormatter, kv


def test_kv_quotes_only_values_that_need_it() -> None:
    assert kv(event="call_started", call="ab12", caller="+15550100", n=3) == (
        "event=call_started call=ab12 caller=+15550100 n=3")
    assert kv(reason="no common codec") == 'reason="no common codec"'
    assert kv(detail='say "hi"\\') == 'detail="say \\"hi\\"\\\\"'
    assert kv(empty="") == 'empty=""'
    assert kv(name="Zoë") == 'name="Zoë"'  # outside the plain ASCII set: quoted
    assert kv(uri="sip:1001@[::1]:5060,x") == "uri=sip:1001@[::1]:5060,x"


def _capture(logger_name: str) -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_KeyValueFormatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.propagate = False
    return logger, stream, handler


def test_formatter_writes_one_key_value_line_per_record() -> None:
    logger, stream, handler = _capture("edgecc.test.log")
    logger.setLevel(logging.INFO)
    try:
        logger.info(kv(event="call_started", call="c1"))
        logger.warning("event=x detail=%s", "y")
        try:
            raise ValueError("bad thing")
        except ValueError:
            logger.exception("event=failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    stamp = r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(stamp + r" level=info logger=edgecc\.test\.log event=call_started call=c1",
                        lines[0])
    assert re.fullmatch(stamp + r" level=warning logger=edgecc\.test\.log event=x detail=y",
                        lines[1])
    assert re.match(stamp + r" level=error logger=edgecc\.test\.log event=failed exc=\"Traceback",
                    lines[2])
    assert "ValueError: bad thing" in stream.getvalue()


def test_fields_are_rendered_only_when_the_line_is_written() -> None:
    rendered: list[str] = []

    class Spy:
        def __str__(self) -> str:
            rendered.append("yes")
            return "spy"

    logger, stream, handler = _capture("edgecc.test.log.lazy")
    logger.setLevel(logging.INFO)
    try:
        logger.debug("%s", Fields(event="per_message", value=Spy()))
        assert rendered == [] and stream.getvalue() == ""
        logger.info("%s", Fields(event="kept", value=Spy()))
    finally:
        logger.removeHandler(handler)
    assert rendered == ["yes"]
    assert stream.getvalue().rstrip().endswith("event=kept value=spy")
