"""The nucleus' IoT Core spooler semantics, and the nucleus options that set them.

Developer guide, "Greengrass nucleus" configuration ``mqtt.spooler`` (maxSizeInBytes,
keepQos0WhenOffline, storageType) and the nucleus' ``Spool.queueCapacityCheck``:
a full spooler drops queued QoS 0 messages first, then refuses; QoS 0 while offline
is refused unless keepQos0WhenOffline.
"""

from __future__ import annotations

import pytest

from windfleet.nucleus.iotcore import IotCoreConnection, SpoolFull
from windfleet.nucleus.runtime import NUCLEUS, DeviceRuntime


def offline(max_bytes: int = 100, keep_qos0: bool = False) -> IotCoreConnection:
    # never started: the connection stays offline, which is what these rules are about
    return IotCoreConnection("gw1", "127.0.0.1:9", max_bytes=max_bytes, keep_qos0_when_offline=keep_qos0)


def test_qos0_while_offline_is_refused_unless_kept():
    with pytest.raises(SpoolFull, match="QoS 0"):
        offline().publish("t", b"x", 0)
    kept = offline(keep_qos0=True)
    kept.publish("t", b"x", 0)
    assert kept.spooled() == 1


def test_a_full_spooler_drops_qos0_first_then_refuses():
    conn = offline(max_bytes=40, keep_qos0=True)
    conn.publish("t", b"a" * 10, 0)                 # 11 bytes
    conn.publish("t", b"b" * 10, 1)                 # 22
    conn.publish("t", b"c" * 10, 1)                 # 33: full enough that the next needs room
    conn.publish("t", b"d" * 10, 1)                 # 44 > 40: the QoS 0 message makes room
    assert conn.counters["dropped_qos0"] == 1 and conn.spooled() == 3
    with pytest.raises(SpoolFull, match="spooler full"):
        conn.publish("t", b"e" * 20, 1)
    assert conn.counters["refused_spool_full"] == 1 and conn.spooled() == 3


def test_nucleus_configuration_sets_the_spooler(tmp_path):
    runtime = DeviceRuntime("gw1", tmp_path / "root", broker="127.0.0.1:9")
    runtime.iot = offline()
    runtime.configuration[NUCLEUS] = {"mqtt": {"spooler": {"maxSizeInBytes": 4096, "keepQos0WhenOffline": True,
                                                           "storageType": "Disk"}}}
    runtime.apply_nucleus_options()
    assert runtime.iot.max_bytes == 4096 and runtime.iot.keep_qos0_when_offline is True
    runtime.iot.publish("t", b"x" * 1000, 0)  # kept while offline, fits the larger spooler
    log = (tmp_path / "root" / "logs" / "greengrass.log").read_text()
    assert "DiskSpooler" in log  # Disk without the plugin: memory, and it says so
    runtime.configuration[NUCLEUS] = {}
    runtime.apply_nucleus_options()
    assert runtime.iot.max_bytes == 2_621_440 and runtime.iot.keep_qos0_when_offline is False
