"""Publishes MQTT messages as a device would, with the Eclipse Paho client (paho-mqtt),
and reports on stdout, as one JSON object, what the server acknowledged.

The system test services/ingest/tests/proxy_clients.rs runs it against ingest's MQTT
proxy: `--messages` names a file of `topic<TAB>payload` lines, each published at QoS 1.
The report:

    {"connack": 0, "acked": [indices...], "refused": [[index, reason code]...],
     "disconnected": false}

`connack` is the CONNACK's return code (3.1.1) or reason code (5). When it is not 0 nothing
is published. A message counts as acknowledged only once its PUBACK arrived, which is
Paho's on_publish for QoS 1. The script stops when every message is answered, when the
connection drops (no reconnect: the test wants to know what was acknowledged before), or
after --timeout seconds.
"""

import argparse
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protocol", choices=["3.1.1", "5"], required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--messages", required=True, help="file of topic<TAB>payload lines")
    parser.add_argument("--inflight", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    with open(args.messages, encoding="utf-8") as file:
        messages = [line.rstrip("\n").split("\t", 1) for line in file if line.strip()]

    protocol = mqtt.MQTTv5 if args.protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=protocol)
    if args.username is not None:
        client.username_pw_set(args.username, args.password)
    client.max_inflight_messages_set(args.inflight)
    client.max_queued_messages_set(0)  # unbounded: publish() queues what cannot go yet

    if len(messages) >= 65535:
        parser.error("at most 65,534 messages: Paho's message ids would repeat")
    # Answers are kept by message id and matched to messages at the end: publish() takes
    # Paho's own locks, which its network thread may hold while it calls on_publish.
    lock = threading.Lock()
    report = {"connack": None, "acked": [], "refused": [], "disconnected": False}
    answers = []  # (mid, reason code value, failed)
    connected = threading.Event()
    finished = threading.Event()

    def on_connect(_client, _userdata, _flags, reason_code, _properties):
        report["connack"] = reason_code.value
        connected.set()
        if reason_code.is_failure:
            finished.set()

    def on_publish(_client, _userdata, mid, reason_code, _properties):
        with lock:
            answers.append((mid, reason_code.value, reason_code.is_failure))
            if len(answers) == len(messages):
                finished.set()

    def on_disconnect(_client, _userdata, _flags, _reason_code, _properties):
        report["disconnected"] = True
        connected.set()
        finished.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_disconnect = on_disconnect
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    deadline = time.monotonic() + args.timeout
    connected.wait(timeout=args.timeout)
    index_of_mid = {}
    if report["connack"] == 0 and not report["disconnected"]:
        for index, (topic, payload) in enumerate(messages):
            if finished.is_set():
                break
            index_of_mid[client.publish(topic, payload.encode("utf-8"), qos=1).mid] = index
        finished.wait(timeout=max(0.0, deadline - time.monotonic()))
    # Stop the network thread first: a disconnect would be reported as the server's.
    client.loop_stop()
    with lock:
        for mid, code, failed in answers:
            if failed:
                report["refused"].append([index_of_mid[mid], code])
            else:
                report["acked"].append(index_of_mid[mid])
        json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
