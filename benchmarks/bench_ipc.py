"""Local pub/sub over the local nucleus' IPC server, beside Mosquitto, in the same run.

Both sides carry the same 300-byte messages from one publisher to one subscriber on
this machine and count what the subscriber received:

* IPC, synchronous: the real ``GreengrassCoreIPCClientV2.publish_to_topic`` (waits for
  the nucleus' reply each time) -> windfleet's IPC server -> a subscribed real client;
* IPC, pipelined: ``publish_to_topic_async`` with every reply awaited at the end (what
  ``IpcBus.publish`` does);
* Mosquitto, QoS 0 and QoS 1: paho publisher -> Mosquitto -> paho subscriber (the
  baseline: what the components used before they spoke IPC).

Ratios are against Mosquitto QoS 1 measured in the same run.

    .venv/bin/python benchmarks/bench_ipc.py [--messages 5000]

Writes benchmarks/results/ipc.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

PAYLOAD = b"x" * 300
TOPIC = "bench/ipc"


class _Host:
    """Just enough nucleus for pub/sub: one principal allowed everything."""

    thing = "bench"

    def __init__(self) -> None:
        from windfleet.nucleus.authorization import Authorizer

        self.authorizer = Authorizer("bench")
        self.authorizer.set_component("bench", {"accessControl": {"aws.greengrass.ipc.pubsub": {
            "bench:1": {"operations": ["*"], "resources": ["*"]}}}})

    def ipc_call(self, component, operation, request, stream):  # noqa: ANN001 - NucleusHost
        from windfleet.nucleus.ipc import IpcError

        raise IpcError("ServiceError", f"{operation} not served by the benchmark host")


def _ipc(messages: int, sock: Path) -> dict:
    from awsiot.greengrasscoreipc import connect
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
    from awsiot.greengrasscoreipc.model import BinaryMessage, PublishMessage

    from windfleet.nucleus.ipc import IpcServer

    server = IpcServer(sock, _Host())
    server.start()
    token = server.issue_token("bench")
    try:
        sub = GreengrassCoreIPCClientV2(client=connect(ipc_socket=str(sock), authtoken=token), executor=None)
        pub = GreengrassCoreIPCClientV2(client=connect(ipc_socket=str(sock), authtoken=token), executor=None)
        received = [0]
        done = threading.Event()
        target = [0]

        def on_event(_event) -> None:
            received[0] += 1
            if received[0] >= target[0]:
                done.set()

        sub.subscribe_to_topic(topic=TOPIC, on_stream_event=on_event)
        message = PublishMessage(binary_message=BinaryMessage(message=PAYLOAD))
        out = {}
        for mode in ("sync", "pipelined"):
            received[0], target[0] = 0, messages
            done.clear()
            t0 = time.perf_counter()
            if mode == "sync":
                for _ in range(messages):
                    pub.publish_to_topic(topic=TOPIC, publish_message=message)
            else:
                futures = [pub.publish_to_topic_async(topic=TOPIC, publish_message=message) for _ in range(messages)]
                for future in futures:
                    future.result()
            done.wait(60)
            seconds = time.perf_counter() - t0
            out[f"ipc_{mode}"] = {"messages": messages, "received": received[0], "seconds": round(seconds, 3),
                                  "messages_per_s": round(received[0] / seconds, 1)}
        pub.close()
        sub.close()
        return out
    finally:
        server.close()


def _mosquitto(messages: int, data: Path) -> dict:
    import paho.mqtt.client as mqtt

    from windfleet.nucleus.broker import Broker, free_port

    broker = Broker(data, port=free_port()).start()
    try:
        user, password = broker.add_device("bench")
        broker.reload()
        time.sleep(0.5)
        topic = "windfleet/devices/bench/health"  # a topic the device account may use
        out = {}
        for qos in (0, 1):
            received = [0]
            done = threading.Event()

            def on_message(_c, _u, _m) -> None:
                received[0] += 1
                if received[0] >= messages:
                    done.set()

            sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{qos}")
            sub.username_pw_set(user, password)
            sub.on_message = on_message
            sub.connect(broker.host, broker.port)
            sub.subscribe(topic, qos=qos)
            sub.loop_start()
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{qos}")
            pub.username_pw_set(user, password)
            pub.max_inflight_messages_set(1000)
            pub.connect(broker.host, broker.port)
            pub.loop_start()
            time.sleep(0.5)
            t0 = time.perf_counter()
            infos = [pub.publish(topic, PAYLOAD, qos=qos) for _ in range(messages)]
            for info in infos:
                info.wait_for_publish(30)
            done.wait(60)
            seconds = time.perf_counter() - t0
            out[f"mosquitto_qos{qos}"] = {"messages": messages, "received": received[0],
                                          "seconds": round(seconds, 3),
                                          "messages_per_s": round(received[0] / seconds, 1)}
            pub.loop_stop()
            pub.disconnect()
            sub.loop_stop()
            sub.disconnect()
        return out
    finally:
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wf-bench-ipc-") as tmp:
        results = {**_mosquitto(args.messages, Path(tmp) / "broker"), **_ipc(args.messages, Path(tmp) / "ipc.sock")}
    baseline = results["mosquitto_qos1"]["messages_per_s"]
    for row in results.values():
        row["ratio_to_mosquitto_qos1"] = round(row["messages_per_s"] / baseline, 2) if baseline else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ipc.json").write_text(json.dumps({"payload_bytes": len(PAYLOAD), "results": results}, indent=2))
    print(f"{'path':<16} {'msg/s':>10} {'received':>9} {'x mosquitto qos1':>17}")
    for name, row in results.items():
        print(f"{name:<16} {row['messages_per_s']:>10.0f} {row['received']:>9} {row['ratio_to_mosquitto_qos1']:>17}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
