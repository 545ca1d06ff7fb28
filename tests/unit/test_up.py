"""``router up``'s process handling: its log pump and its stop, on real child processes."""

from __future__ import annotations

import asyncio
import sys

import pytest

from router import up


async def _child(code: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, limit=up._LINE_LIMIT
    )


async def test_a_log_line_over_the_limit_does_not_stop_the_pump(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A line over asyncio's limit ended the pump; the child then blocked on a full pipe.
    code = (
        "import sys; sys.stdout.write('x' * (2 << 20) + '\\n');"
        "[sys.stdout.write(f'line {i}\\n') for i in range(3)]; sys.stdout.flush()"
    )
    child = await _child(code)
    assert child.stdout is not None
    await asyncio.wait_for(up._pump("sink:ga4", child.stdout), timeout=20)
    assert await child.wait() == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "sink:ga4        | [a log line over 1 MiB was cut]"
    # (the rest of the long line may follow, itself under the limit), then every later line
    assert out[-3:] == [f"sink:ga4        | line {i}" for i in range(3)]
    assert all(len(line) <= up._LINE_LIMIT + 20 for line in out)


async def test_children_that_ignore_sigterm_are_killed_and_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stubborn = await _child(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('ready', flush=True); time.sleep(60)"
    )
    polite = await _child("import time; print('ready', flush=True); time.sleep(60)")
    for child in (stubborn, polite):
        assert child.stdout is not None
        await child.stdout.readline()  # its handlers are in place
    killed = await up._stop_children([("sink:a", stubborn), ("sink:b", polite)], grace_s=1.0)
    assert killed == ["sink:a"]
    assert polite.returncode == -15
    assert "sink:a still running after 1s; killing it" in capsys.readouterr().err
