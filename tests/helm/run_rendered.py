"""Runs the services' real binaries with what the chart rendered: the proof that every flag,
environment variable and config file key the chart sets is one the code reads.

Usage: run_rendered.py BIN_DIR RENDERED.yaml CHART_VALUES.yaml [OVERRIDES.yaml]

For each Deployment, the container's command and args are run from BIN_DIR with the
container's environment (a pod name for fieldRefs, "secret:<name>/<key>" for secretKeyRefs,
a closed local port for the OTLP endpoint) and its ConfigMaps written to a temporary
directory in place of their mount paths:

- stream-processor and ingest with --print-config: the config must load (unknown keys and
  bad values are refused by the services) and the printed config must hold what the
  environment carried (SASL credentials, the MQTT client id and credentials);
- model-server serving the bundled models (deploy/models, the layout of the vigil-models
  image) on a free port, without --rollout_kafka_brokers (no Kafka here; its flags are still
  parsed): `vigil rollout list --json` must show the rendered rollout file's rollouts,
  owned by the file and applied by the pod-named replica; SIGTERM must end it cleanly;
- device-simulator with the broker address pointed at a closed port: it must get as far as
  publishing (its arguments parsed); then it is killed.
"""

import atexit
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from check_rendered import merge  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
POD = "vigil-check-0"
failures: list[str] = []


def check(condition: bool, message: str) -> bool:
    if not condition:
        failures.append(message)
    return condition


def container_env(container: dict) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_BACKTRACE": "0"}
    for var in container.get("env", []):
        if "value" in var:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
        else:
            source = var["valueFrom"]
            if "fieldRef" in source:
                value = {"metadata.name": POD, "metadata.namespace": "vigil-check"}[source["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in source:
                value = f"secret:{source['secretKeyRef']['name']}/{source['secretKeyRef']['key']}"
            else:
                raise SystemExit(f"{container['name']}: no stand-in for {var['name']}'s {list(source)}")
        env[var["name"]] = value
    return env


class Output:
    """A child's merged stdout/stderr, read on a thread (so the pipe never fills) into a queue."""

    def __init__(self, process: subprocess.Popen):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []

        def pump() -> None:
            for line in process.stdout:
                self.lines.put(line.rstrip("\n"))
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, pattern: str, seconds: float) -> re.Match | None:
        """The first line matching `pattern` within `seconds`; None on timeout or exit."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            self.log.append(line)
            if match := re.search(pattern, line):
                return match
        return None

    def tail(self, n: int) -> str:
        return " | ".join(self.log[-n:])


def stop(process: subprocess.Popen, seconds: float) -> int | None:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def main() -> int:
    bin_dir, rendered = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    values = yaml.safe_load(pathlib.Path(sys.argv[3]).read_text())
    for override in sys.argv[4:]:
        merge(values, yaml.safe_load(pathlib.Path(override).read_text()) or {})
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    work = pathlib.Path(tempfile.mkdtemp(prefix="vigil-helm-run-"))
    atexit.register(shutil.rmtree, work, True)
    print(f"  {rendered.name}:")

    for deployment in deployments:
        began = time.monotonic()
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = deployment["spec"]["template"]["spec"]
        container = next(c for c in pod["containers"] if c["name"] == component)
        binary = bin_dir / pathlib.Path(container["command"][0]).name
        # ConfigMap mounts -> files in the work directory.
        mounts = {}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            configmap = volumes[mount["name"]].get("configMap")
            if configmap:
                directory = work / component / mount["name"]
                directory.mkdir(parents=True, exist_ok=True)
                for key, text in configmaps[configmap["name"]]["data"].items():
                    (directory / key).write_text(text)
                mounts[mount["mountPath"]] = directory
        args = list(container.get("args", []))
        for path, directory in mounts.items():
            args = [a.replace(path, str(directory)) for a in args]
        env = container_env(container)
        if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
            # No collector here: a closed local port refuses at once, so exports fail fast
            # instead of waiting on a name that does not resolve.
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:1"

        if component in ("stream-processor", "ingest"):
            result = subprocess.run([str(binary), *args, "--print-config"], env=env, capture_output=True, text=True, timeout=60)
            if not check(result.returncode == 0, f"{component}: refused the rendered config: {result.stderr.strip()[:2000]}"):
                continue
            config = tomllib.loads(result.stdout)
            sasl = values["kafka"]["sasl"]
            if sasl["enabled"]:
                for field in ("username", "password"):
                    want = f"secret:{sasl['existingSecret']}/{sasl[field + 'Key']}"
                    check(config["kafka"].get(f"sasl.{field}") == want, f"{component}: kafka sasl.{field} did not reach the config from the environment")
            if component == "ingest":
                check(config["mqtt"]["client_id"] == POD, f"ingest: mqtt.client_id is {config['mqtt']['client_id']!r}, not the pod name")
                auth = values["mqtt"]["auth"]
                if auth["enabled"]:
                    for field in ("username", "password"):
                        want = f"secret:{auth['existingSecret']}/{auth[field + 'Key']}"
                        check(config["mqtt"].get(field) == want, f"ingest: mqtt.{field} did not reach the config from the environment")
                if values["mqtt"]["tls"]["existingSecret"] and values["mqtt"]["tls"]["caKey"]:
                    check(config["mqtt"]["tls"].get("ca_file") == f"/etc/vigil/mqtt-tls/{values['mqtt']['tls']['caKey']}", "ingest: mqtt.tls.ca_file is not the mounted CA")
            print(f"    {component}: {binary.name} loaded the rendered config and environment (--print-config, {time.monotonic() - began:.1f}s)")

        elif component == "model-server":
            models = mounts.get("/etc/vigil/model-server")
            mount_path = values["modelServer"]["modelSource"]["mountPath"].rstrip("/")
            config_file = models / "models.config"
            config_file.write_text(config_file.read_text().replace(f'"{mount_path}/', f'"{REPO}/deploy/models/'))
            args = [a for a in args if not a.startswith("--rollout_kafka_brokers=")]
            args = [re.sub(r"^--(port|rest_api_port)=\d+$", r"--\1=0", a) for a in args]
            process = subprocess.Popen([str(binary), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output = Output(process)
            try:
                match = output.wait_for(r"Running gRPC ModelServer at [^:]+:(\d+)", 30)
                if not check(match is not None, f"model-server did not start: {output.tail(20)}"):
                    continue
                server = f"http://127.0.0.1:{match.group(1)}"
                listed = None
                for _ in range(50):  # the port answers once the models are loaded
                    result = subprocess.run([str(bin_dir / "vigil"), "rollout", "list", "--json", "--server", server],
                                            capture_output=True, text=True, timeout=60)
                    if result.returncode == 0:
                        listed = json.loads(result.stdout)["rollouts"]
                        break
                    time.sleep(0.2)
                if not check(listed is not None, f"model-server: vigil rollout list failed: {result.stderr.strip()}"):
                    continue
                want = values["modelServer"]["rollouts"]
                check(len(listed) == len(want), f"model-server serves {len(listed)} rollouts, the values declare {len(want)}")
                for spec in want:
                    got = next((r for r in listed if r["spec"]["model"] == spec["model"]), None)
                    if not check(got is not None, f"model-server: no rollout of {spec['model']}"):
                        continue
                    check(got["spec"]["stable_version"] == spec["stable"] and got["spec"]["canary_version"] == spec["canary"],
                          f"model-server: {spec['model']} rollout is {got['spec']['stable_version']} -> {got['spec']['canary_version']}")
                    check(float(got["spec"]["canary_weight_percent"]) == float(spec.get("canary_weight_percent", 0)),
                          f"model-server: {spec['model']} weight is {got['spec']['canary_weight_percent']}")
                    check(float(got["spec"]["shadow_percent"]) == float(spec.get("shadow_percent", 0)),
                          f"model-server: {spec['model']} shadow is {got['spec']['shadow_percent']}")
                    for key, value in spec.get("analysis", {}).items():
                        check(got["spec"]["analysis"] is not None and got["spec"]["analysis"].get(key) == value,
                              f"model-server: {spec['model']} analysis.{key} is not {value}")
                    check(got["source"] == "file", f"model-server: {spec['model']} rollout is not owned by the rollout file")
                    check(got["updated_by"] == POD, f"model-server: the rollout was applied by {got['updated_by']!r}, not the pod name (--replica_id)")
                    print(f"    model-server: serving {spec['model']} {spec['stable']} -> {spec['canary']}, phase {got['phase']}, weight {got['canary_weight_percent']}% ({time.monotonic() - began:.1f}s)")
                if not want:
                    print(f"    model-server: started with the rendered flags and files; no rollouts declared, none served ({time.monotonic() - began:.1f}s)")
            finally:
                code = stop(process, 30)
            check(code == 0, f"model-server: exit status {code} after SIGTERM")
            print(f"    model-server: stopped on SIGTERM, exit status {code} ({time.monotonic() - began:.1f}s)")

        elif component == "device-simulator":
            args = [re.sub(r"^--mqtt-url=.*", "--mqtt-url=mqtt://127.0.0.1:1", a) for a in args]
            args = [re.sub(r"^--admin-listen=.*", "--admin-listen=127.0.0.1:0", a) for a in args]
            process = subprocess.Popen([str(binary), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output = Output(process)
            try:
                started = output.wait_for(r"publishing", 30)
                check(started is not None, f"device-simulator did not start: {output.tail(10)}")
            finally:
                # Killed, not stopped: with no broker its SIGTERM drain waits out its 10 s
                # drain timeout, and only its arguments are checked here.
                process.kill()
                process.wait()
            if started:
                print(f"    device-simulator: started publishing with the rendered arguments ({time.monotonic() - began:.1f}s)")

    for failure in failures:
        print(f"{rendered.name}: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
