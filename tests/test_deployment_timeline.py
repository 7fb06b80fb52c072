"""The deployment timeline's parser, on traced log lines written by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import deployment_timeline as timeline

SUPERNODE = """\
@@ 100.000 pid=10 INFO :      Receiving: train message (ID: a)
@@ 100.100 pid=11 START lag=0.050 cmd=python /x/flwr-clientapp --runtime-api-address
@@ 101.000 pid=10 INFO :      Received successfully
@@ 102.000 pid=11 INFO :      Start `flwr-clientapp` process
@@ 102.500 pid=11 IMPORTBEGIN client_apps
@@ 102.600 pid=11 IMPORTBEGIN client_apps.qlora
@@ 102.700 pid=11 UNIXCONNECT /w/worker.sock
@@ 103.300 pid=10 INFO :      Sending: train message (ID: b)
@@ 103.400 pid=11 EXIT cpu=0.800 cmd=python /x/flwr-clientapp
@@ 104.000 pid=10 INFO :      Sent successfully
@@ 110.000 pid=10 INFO :      Receiving: evaluate message (ID: c)
"""

WORKER = """\
@@ 102.710 pid=20 [flower-llm] Running train for node 7
@@ 103.010 pid=20 [flower-llm] Ran train for node 7 in 0.30 s
"""

SERVERAPP = """\
@@ 99.500 pid=30 GRID_PUSH n=1 type=train began=99.000
@@ 104.500 pid=30 GRID_PULL n=1 began=104.400
"""


def test_one_message_is_split_into_its_segments(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "supernode.log").write_text(SUPERNODE)
    (tmp_path / "worker.log").write_text(WORKER)
    (tmp_path / "serverapp.log").write_text(SERVERAPP)

    # Execute
    messages = timeline.site_messages(tmp_path / "supernode.log", tmp_path / "worker.log")
    waves = timeline.waves(tmp_path / "serverapp.log")
    parts = timeline.segments(messages[0], waves[0])

    # Assert
    assert [m.kind for m in messages] == ["train", "evaluate"]
    assert messages[0].cpu == pytest.approx(0.8)
    assert messages[0].job == pytest.approx(0.3)
    assert waves[0].kind == "train" and waves[0].replies_in == pytest.approx(104.5)
    expected = {
        "pull-wait": 0.5,  # pushed 99.5 -> received 100.0
        "download": 1.0,
        "spawn": 0.05,  # forked at 100.1 - 0.05
        "interpreter": 0.05,
        "flwr-import": 1.9,
        "input+fab": 0.5,
        "app-import": 0.2,
        "to-worker": 0.01,
        "job": 0.3,
        "back": 0.29,
        "upload": 0.7,
    }
    assert parts.keys() == expected.keys()
    for name, seconds in expected.items():
        assert parts[name] == pytest.approx(seconds, abs=1e-6), name
