"""Runs the services' real binaries with what the chart rendered: the proof that every flag,
environment variable and config file key the chart sets is one the code reads.

Usage: run_rendered.py BIN_DIR RENDERED.yaml CHART_VALUES.yaml [OVERRIDES.yaml]

For each Deployment and StatefulSet, the container's command and args are run from BIN_DIR with the
container's environment (a pod name for fieldRefs, "secret:<name>/<key>" for secretKeyRefs,
a closed local port for the OTLP endpoint) and its ConfigMaps written to a temporary
directory in place of their mount paths:

- stream-processor, alerts and ingest with --print-config: the config must load (unknown
  keys and bad values are refused by the services) and the printed config must hold what
  the environment carried (SASL credentials, the MQTT client id and credentials); for
  alerts also every alerts.config value and rule as the values give it (a field a rule
  leaves out at the service's default), admin_listen on the metrics port, and the rendered
  file's Kafka properties;
- alerts again, running: the rendered flags, environment and file, the brokers pointed at a
  closed local port (--kafka-brokers) and the Secret files its ssl.*.location properties
  name written as a throwaway certificate and key: the paths its probes use must answer on
  the admin port (/live 200; /ready 503, as it has not reached Kafka) with /metrics, and it
  must get as far as asking the brokers for metadata (its producer and consumer created
  with the rendered properties), then exit on that failure;
- model-server serving the bundled models (deploy/models, the layout of the vigil-models
  image) on free ports, its TLS and token Secrets written where they are mounted (a Secret
  the chart rendered, such as its generated certificate and token, as rendered; an existing
  one or cert-manager's as a throwaway CA, certificate and token), without the rollout
  state's Kafka (no Kafka here): with TLS on, `vigil rollout list` must work over TLS
  checking the certificate against the CA by the Service's name, the probes' paths must
  answer 200 over TLS and the REST port must not answer plain HTTP; with the token on, a
  management call must be refused as unauthenticated without it and pass the check with
  it; without
  --rollout_kafka_brokers, --rollout_kafka_property and MODEL_SERVER_ROLLOUT_KAFKA__*
  (the server refuses properties without brokers; the topic and group flags are still
  parsed): `vigil rollout list --json` must show the rendered rollout file's rollouts,
  owned by the file and applied by the pod-named replica; SIGTERM must end it cleanly;
- model-server again, with rollout state in Kafka: every rendered flag and variable, the
  brokers pointed at a closed local port and the Secret files its ssl.*.location
  properties name written as a throwaway self-signed certificate and key (openssl): it must
  get as far as asking the brokers for the state topic's metadata, which means the server
  accepted the properties and librdkafka created the producer and the reader with them
  (an unknown property, a bad value, an unreadable certificate or a mechanism the build
  lacks stops it earlier, naming the property); it then exits on the metadata timeout;
- device-simulator as the StatefulSet's last pod (HOSTNAME <name>-<replicas - 1>) with the
  broker address pointed at a closed port (mqtts:// if the rendered URL is) and the MQTT TLS
  Secret's files written where its variables point (a throwaway CA, certificate and PKCS#8
  key): it must take its replica index from the pod name, load the TLS files and the
  login, and get as far as connecting (the refused connection logged); then it is killed.
"""

import atexit
import base64
import http.client
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from check_rendered import merge, numbers_equal  # noqa: E402

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


ROLLOUT_KAFKA_ENV_PREFIX = "MODEL_SERVER_ROLLOUT_KAFKA__"


def without_rollout_kafka(args: list[str], env: dict) -> tuple[list[str], dict, str]:
    """The model server's args and env without the rollout state's Kafka, and what was dropped."""
    dropped_args = [a for a in args if a.startswith(("--rollout_kafka_brokers=", "--rollout_kafka_property="))]
    dropped_env = sorted(n for n in env if n.startswith(ROLLOUT_KAFKA_ENV_PREFIX))
    if not dropped_args and not dropped_env:
        return args, env, ""
    names = sorted({a.split("=", 1)[0] for a in dropped_args})
    note = (f"run without the rollout state's Kafka (none here; the server refuses its properties without brokers): "
            f"dropped {len(dropped_args)} flags ({', '.join(names)}) and {len(dropped_env)} variables ({', '.join(dropped_env) or 'none'})")
    return ([a for a in args if a not in dropped_args],
            {k: v for k, v in env.items() if k not in dropped_env}, note)


def stand_in_secret_files(args: list[str], pod: dict, container: dict, directory: pathlib.Path) -> list[str]:
    """Args whose ssl.*.location properties point into a Secret mount, pointed at stand-in
    files instead: one self-signed certificate (as CA and client certificate) and its key."""
    secret_mounts = secret_mounts_of(pod, container)
    out = []
    for arg in args:
        match = re.fullmatch(r"--rollout_kafka_property=(ssl\.[a-z.]+\.location)=(.*)", arg)
        mount = next((m for m in secret_mounts if match and match.group(2).startswith(m + "/")), None)
        if not mount:
            out.append(arg)
            continue
        target = stand_in_file(directory, match.group(1), match.group(2).removeprefix(mount + "/"))
        out.append(f"--rollout_kafka_property={match.group(1)}={target}")
    return out


def secret_mounts_of(pod: dict, container: dict) -> list[str]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return [m["mountPath"].rstrip("/") for m in container.get("volumeMounts", []) if "secret" in volumes.get(m["name"], {})]


def stand_in_file(directory: pathlib.Path, prop: str, relative: str) -> pathlib.Path:
    """directory/relative holding the stand-in key (ssl.key.location) or certificate (the
    others): one self-signed certificate and its key, made once per directory."""
    key_pem, cert_pem = directory / "stand-in.key", directory / "stand-in.crt"
    if not key_pem.exists():
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vigil-helm-check",
                        "-keyout", str(key_pem), "-out", str(cert_pem)], check=True, capture_output=True, timeout=60)
    target = directory / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(key_pem if prop == "ssl.key.location" else cert_pem, target)
    return target


MODEL_SERVER_TLS_DIR = "/etc/vigil/model-server-tls"
MODEL_SERVER_TOKEN_DIR = "/etc/vigil/model-server-token"


def stand_in_server_tls(directory: pathlib.Path, name: str, ca_key: str) -> None:
    """tls.crt, tls.key and the CA as a kubernetes.io/tls Secret holds them: a throwaway CA
    and a server certificate for `name` (openssl), for a Secret the chart does not render."""
    directory.mkdir(parents=True, exist_ok=True)
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=directory)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vigil-helm-check CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
        "-keyout", "ca.key", "-out", ca_key)
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", "tls.key", "-out", "tls.csr")
    (directory / "ext.cnf").write_text(f"subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", "tls.csr", "-CA", ca_key, "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "ext.cnf", "-out", "tls.crt")


def model_server_secret_files(pod: dict, container: dict, args: list[str], secrets: dict, values: dict,
                              service: str, work: pathlib.Path) -> tuple[list[str], list[str], str | None, str]:
    """The model server's TLS and token Secrets as files: a Secret the chart rendered (its
    generated certificate and token) is written as it is; an existing Secret (or one
    cert-manager makes) gets stand-ins. Returns the args pointed at them, the vigil CLI's TLS
    flags, the token file, and what was used."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    tls_flags, token, used = [], None, []
    ca_key = values["modelServer"]["security"]["tls"]["caKey"]
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if not secret or mount["mountPath"] not in (MODEL_SERVER_TLS_DIR, MODEL_SERVER_TOKEN_DIR):
            continue
        name = secret["secretName"]
        directory = work / "model-server" / mount["name"]
        directory.mkdir(parents=True, exist_ok=True)
        if name in secrets:
            for key, value in secrets[name]["data"].items():
                (directory / key).write_bytes(base64.b64decode(value))
            used.append(f"the rendered Secret {name}")
        elif mount["mountPath"] == MODEL_SERVER_TLS_DIR:
            stand_in_server_tls(directory, service, ca_key)
            used.append(f"a stand-in certificate for Secret {name}")
        else:
            for item in secret.get("items", []):
                (directory / item["path"]).write_text("stand-in-token-" + os.urandom(12).hex() + "\n")
            used.append(f"a stand-in token for Secret {name}")
        args = [a.replace(mount["mountPath"] + "/", f"{directory}/") for a in args]
        if mount["mountPath"] == MODEL_SERVER_TLS_DIR:
            tls_flags = ["--ca-file", str(directory / ca_key), "--tls-server-name", service]
    token = next((a.split("=", 1)[1] for a in args if a.startswith("--management_token_file=")), None)
    return args, tls_flags, token, ", ".join(used)


def http_get(url: str, ca_file: str | None = None) -> tuple[int | str, str]:
    """The status and body of a GET; a connection failure's text for the status. With
    `ca_file`, an https GET as the kubelet's HTTPS probe makes it: the certificate chain is
    checked here against the CA, the name is not (the probe dials the pod's address)."""
    context = None
    if ca_file is not None:
        context = ssl.create_default_context(cafile=ca_file)
        context.check_hostname = False
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        return f"no answer ({getattr(error, 'reason', error)!r})", ""


def check_alerts_running(binary: pathlib.Path, args: list[str], env: dict, pod: dict, container: dict,
                         work: pathlib.Path) -> None:
    """The alerts service running with the rendered flags, variables and file, at a closed
    broker port: its probes' paths answer, and its Kafka clients are created (see the module doc)."""
    began = time.monotonic()
    config_arg = next(a for a in args if a.startswith("--config="))
    config_path = pathlib.Path(config_arg.split("=", 1)[1])
    text = config_path.read_text()
    secret_mounts = secret_mounts_of(pod, container)
    files = []
    for prop, value in tomllib.loads(text)["kafka"].items():
        mount = next((m for m in secret_mounts if value.startswith(m + "/")), None)
        if prop.startswith("ssl.") and prop.endswith(".location") and mount:
            target = stand_in_file(work / "alerts" / "secrets", prop, value.removeprefix(mount + "/"))
            text = text.replace(json.dumps(value), json.dumps(str(target)))
            files.append(prop)
    stand_in = config_path.with_name("alerts-stand-in-files.toml")
    stand_in.write_text(text)
    args = [f"--config={stand_in}" if a == config_arg else a for a in args]
    args += ["--kafka-brokers=127.0.0.1:1", "--admin-listen=127.0.0.1:0"]
    process = subprocess.Popen([str(binary), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Output(process)
    try:
        serving = output.wait_for(r"serving /live, /ready, /metrics address=127\.0\.0\.1:(\d+)", 30)
        if check(serving is not None, f"alerts did not serve its admin port: {output.tail(10)}"):
            base = f"http://127.0.0.1:{serving.group(1)}"
            for probe, want in (("startupProbe", 200), ("livenessProbe", 200), ("readinessProbe", 503)):
                path = container[probe]["httpGet"]["path"]
                status, _ = http_get(base + path)
                check(status == want, f"alerts: its {probe} path {path} answers {status}, not {want}, before Kafka is reached "
                                      f"({output.tail(3)[:1000]})")
            status, metrics = http_get(base + "/metrics")
            check(status == 200 and "alerts_scores_consumed_total" in metrics, f"alerts: /metrics answers {status} without alerts_scores_consumed_total")
        reached = output.wait_for(r"^Error: (Kafka: )?Meta data fetch error", 60)
        check(reached is not None,
              f"alerts: did not get as far as asking the (closed) brokers for metadata, so its Kafka clients were not created "
              f"with the rendered properties: {output.tail(6)[:2000]}")
    finally:
        code = stop(process, 30)
    check(code not in (0, None), f"alerts: exit status {code} at a closed broker port")
    if serving and reached:
        print(f"    alerts: probes answered (/live 200, /ready 503 before Kafka), Kafka clients created with the rendered properties"
              f"{' and stand-in ' + ', '.join(files) if files else ''}; stopped at the closed broker port as expected ({time.monotonic() - began:.1f}s)")


def check_rollout_kafka_clients(binary: pathlib.Path, args: list[str], env: dict, pod: dict, container: dict,
                                work: pathlib.Path) -> None:
    """The model server with every rendered rollout Kafka flag and variable gets as far as the
    brokers (a closed local port): its Kafka clients were created with those properties."""
    began = time.monotonic()
    args = [re.sub(r"^--rollout_kafka_brokers=.*", "--rollout_kafka_brokers=127.0.0.1:1", a) for a in args]
    args = stand_in_secret_files(args, pod, container, work / "model-server" / "secrets")
    properties = sorted(a.split("=", 2)[1] for a in args if a.startswith("--rollout_kafka_property="))
    variables = sorted(n for n in env if n.startswith(ROLLOUT_KAFKA_ENV_PREFIX))
    try:
        result = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        check(False, "model-server with the rollout Kafka flags did not stop within 90 s at a closed broker port")
        return
    last = (result.stderr.strip().splitlines() or [""])[-1]
    reached = "reading the metadata of rollout state topic" in last
    check(result.returncode != 0 and reached,
          f"model-server: the rollout Kafka clients were not created with the rendered properties {properties} "
          f"and variables {variables}: exit status {result.returncode}, {last[:1000]!r}")
    if reached:
        print(f"    model-server: rollout Kafka clients created with {len(properties)} properties ({', '.join(properties) or 'none'}) "
              f"and {len(variables)} variables ({', '.join(variables) or 'none'}); stopped at the closed broker port as expected "
              f"({time.monotonic() - began:.1f}s)")


def check_simulator_running(binary: pathlib.Path, statefulset: dict, args: list[str], env: dict, work: pathlib.Path) -> None:
    """The simulator as the StatefulSet's last pod, at a closed broker port (see the module doc)."""
    began = time.monotonic()
    replicas = statefulset["spec"]["replicas"]
    env = {**env, "HOSTNAME": f"{statefulset['metadata']['name']}-{replicas - 1}"}
    url = next(a.split("=", 1)[1] for a in args if a.startswith("--mqtt-url="))
    scheme = "mqtts" if url.startswith(("mqtts://", "ssl://")) else "mqtt"
    args = [re.sub(r"^--mqtt-url=.*", f"--mqtt-url={scheme}://127.0.0.1:1", a) for a in args]
    args = [re.sub(r"^--admin-listen=.*", "--admin-listen=127.0.0.1:0", a) for a in args]
    tls_vars = sorted(n for n in env if n.startswith("SIMULATOR_TLS_"))
    if tls_vars:
        directory = work / "device-simulator" / "mqtt-tls"
        stand_in_server_tls(directory, "vigil-helm-check-broker", "ca.crt")
        # The client certificate: the stand-in's, its key as PKCS#8 (what the simulator reads).
        subprocess.run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", "tls.key", "-out", "tls.pkcs8.key"],
                       check=True, capture_output=True, timeout=60, cwd=directory)
        stand_ins = {"SIMULATOR_TLS_CA_FILE": "ca.crt", "SIMULATOR_TLS_CERT_FILE": "tls.crt", "SIMULATOR_TLS_KEY_FILE": "tls.pkcs8.key"}
        for var in tls_vars:
            check(env[var].startswith("/etc/vigil/mqtt-tls/"), f"device-simulator: {var} is {env[var]}, not in the MQTT TLS Secret's mount")
            env[var] = str(directory / stand_ins[var])
    process = subprocess.Popen([str(binary), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Output(process)
    try:
        started = output.wait_for(r"publishing", 30)
        if check(started is not None, f"device-simulator did not start: {output.tail(10)}"):
            line = output.log[-1]
            want = f"Replica {{ index: {replicas - 1}, count: {replicas} }}" if replicas > 1 else "replica=None"
            check(want in line, f"device-simulator: as pod {env['HOSTNAME']} it is not {want}: {line}")
        connecting = output.wait_for(r"mqtt connection failed", 30)
        check(connecting is not None, f"device-simulator did not get as far as connecting to the broker: {output.tail(10)}")
    finally:
        # Killed, not stopped: with no broker its SIGTERM drain waits out its 10 s drain
        # timeout, and only what it loaded is checked here.
        process.kill()
        process.wait()
    if started and connecting:
        login = "SIMULATOR_MQTT_USERNAME" in env
        print(f"    device-simulator: as pod {env['HOSTNAME']} of {replicas}, publishing its share of the fleet"
              f"{' with the login from the Secret' if login else ''}{' and stand-in TLS files (' + ', '.join(tls_vars) + ')' if tls_vars else ''};"
              f" reached the (closed) broker port over {scheme}:// ({time.monotonic() - began:.1f}s)")


# What the alerts service takes for a rule field left out (services/alerts/src/config.rs:
# Option fields are absent from --print-config, allowed_lateness_seconds is 0).
ALERTS_RULE_DEFAULTS = {"allowed_lateness_seconds": 0}


def check_alerts_config(values: dict, config: dict, configmaps: dict, mounts: dict, args: list[str]) -> None:
    """alerts --print-config against the values and the rendered alerts.toml."""
    al = values["alerts"]
    for key, want in al["config"].items():
        if key != "rules":
            check(numbers_equal(config.get(key), want), f"alerts: {key} is {config.get(key)!r} after loading, the values say {want!r}")
    check(config.get("admin_listen") == f"0.0.0.0:{al['ports']['metrics']}", f"alerts: admin_listen is {config.get('admin_listen')!r}")
    loaded = config.get("rules", [])
    check(len(loaded) == len(al["config"]["rules"]), f"alerts: {len(loaded)} rules loaded, the values declare {len(al['config']['rules'])}")
    for index, (want, got) in enumerate(zip(al["config"]["rules"], loaded)):
        for key in sorted(set(want) | set(got)):
            expected = want.get(key, ALERTS_RULE_DEFAULTS.get(key))
            check(numbers_equal(got.get(key), expected), f"alerts: rules[{index}] ({want['name']}).{key} loaded as {got.get(key)!r}, the values say {expected!r}")
    # The Kafka table: the rendered file's, plus the SASL login from the environment.
    config_file = next(d / pathlib.Path(a.split("=", 1)[1]).name for a in args if a.startswith("--config=")
                       for d in mounts.values() if a.split("=", 1)[1].startswith(str(d)))
    rendered = tomllib.loads(config_file.read_text())["kafka"]
    sasl = values["kafka"]["sasl"]
    if sasl["enabled"]:
        rendered = {**rendered, **{f"sasl.{f}": f"secret:{sasl['existingSecret']}/{sasl[f + 'Key']}" for f in ("username", "password")}}
    check(config.get("kafka") == rendered, f"alerts: kafka after loading {config.get('kafka')} != the rendered file's {rendered} (and SASL from the environment)")
    print(f"    alerts: {len(loaded)} rules ({', '.join(r['name'] for r in loaded)}) and {len(config.get('kafka', {}))} Kafka properties "
          f"({', '.join(sorted(config.get('kafka', {})))}) loaded as the values and the rendered file say")


def main() -> int:
    bin_dir, rendered = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    values = yaml.safe_load(pathlib.Path(sys.argv[3]).read_text())
    for override in sys.argv[4:]:
        merge(values, yaml.safe_load(pathlib.Path(override).read_text()) or {})
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    deployments = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
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
            # Path by path (with the slash): /etc/vigil/model-server is a prefix of its TLS mount.
            args = [a.replace(path + "/", f"{directory}/") for a in args]
        env = container_env(container)
        if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
            # No collector here: a closed local port refuses at once, so exports fail fast
            # instead of waiting on a name that does not resolve.
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:1"

        if component in ("stream-processor", "alerts", "ingest"):
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
            if component == "alerts":
                check_alerts_config(values, config, configmaps, mounts, args)
                check_alerts_running(binary, args, env, pod, container, work)

        elif component == "model-server":
            models = mounts.get("/etc/vigil/model-server")
            mount_path = values["modelServer"]["modelSource"]["mountPath"].rstrip("/")
            config_file = models / "models.config"
            config_file.write_text(config_file.read_text().replace(f'"{mount_path}/', f'"{REPO}/deploy/models/'))
            # Free ports: gRPC on 0; REST on 127.0.0.1:0 (--rest_api_port=0 would turn REST off).
            args = [re.sub(r"^--port=\d+$", "--port=0", a) for a in args]
            args = [re.sub(r"^--rest_api_port=\d+$", "--rest_api_address=127.0.0.1:0", a) for a in args]
            service = next(d["metadata"]["name"] for d in docs if d["kind"] == "Service"
                           and d["metadata"]["labels"]["app.kubernetes.io/component"] == "model-server" and d["spec"].get("clusterIP") != "None")
            secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
            args, tls_flags, token, used = model_server_secret_files(pod, container, args, secrets, values, service, work)
            if used:
                print(f"    model-server: TLS and token files from {used}")
            kafka_args, kafka_env = args, env
            args, env, dropped = without_rollout_kafka(args, env)
            if dropped:
                print(f"    model-server: {dropped}; checked with them below")
            process = subprocess.Popen([str(binary), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output = Output(process)
            try:
                match = output.wait_for(r"Running gRPC ModelServer at [^:]+:(\d+)", 30)
                if not check(match is not None, f"model-server did not start: {output.tail(20)}"):
                    continue
                rest = output.wait_for(r"Exporting HTTP/REST API at [^:]+:(\d+)", 30)
                scheme = "https" if tls_flags else "http"
                server = f"{scheme}://127.0.0.1:{match.group(1)}"
                vigil_rollout = [str(bin_dir / "vigil"), "rollout", "--server", server, *tls_flags]
                listed = None
                for _ in range(50):  # the port answers once the models are loaded
                    result = subprocess.run([*vigil_rollout, "list", "--json"], capture_output=True, text=True, timeout=60)
                    if result.returncode == 0:
                        listed = json.loads(result.stdout)["rollouts"]
                        break
                    time.sleep(0.2)
                if not check(listed is not None, f"model-server: vigil rollout list failed: {result.stderr.strip()}"):
                    continue
                if tls_flags:
                    print(f"    model-server: vigil rollout list over TLS, the certificate checked against the CA for {service}")
                    ca_file = tls_flags[1]
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        get = container[probe].get("httpGet")
                        if check(get is not None and get.get("scheme") == "HTTPS" and rest is not None, f"model-server: {probe} is not an HTTPS GET"):
                            status, _ = http_get(f"https://127.0.0.1:{rest.group(1)}{get['path']}", ca_file)
                            check(status == 200, f"model-server: its {probe} path {get['path']} answers {status} over TLS, not 200")
                    status, _ = http_get(f"http://127.0.0.1:{rest.group(1)}/live") if rest else ("no REST port", "")
                    check(status != 200, "model-server: its REST port answers plain HTTP while TLS is on")
                    print(f"    model-server: its probes' paths answered 200 over TLS on the REST port; plain HTTP there: {str(status)[:60]}")
                if token:
                    # A management call (to a model that is not served, so it changes nothing):
                    # refused without the token, past the credentials check with it.
                    abort = [*vigil_rollout, "abort", "helm-check-no-such-model", "--reason", "helm check"]
                    without = subprocess.run(abort, capture_output=True, text=True, timeout=60)
                    check(without.returncode != 0 and without.stderr.startswith("error: unauthenticated"),
                          f"model-server: a management call without the token was not refused as unauthenticated: {without.stderr.strip()[:500]}")
                    with_token = subprocess.run([*abort, "--token-file", token], capture_output=True, text=True, timeout=60)
                    refused = ("unauthenticated", "permission denied")
                    check(not any(r in with_token.stderr for r in refused),
                          f"model-server: a management call with the Secret's token was refused: {with_token.stderr.strip()[:500]}")
                    print(f"    model-server: a management call without the token: unauthenticated; with it: past the check "
                          f"({with_token.stderr.strip().splitlines()[0][:100] if with_token.stderr.strip() else 'ok'})")
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
            if any(a.startswith("--rollout_kafka_brokers=") for a in kafka_args):
                check_rollout_kafka_clients(binary, kafka_args, kafka_env, pod, container, work)

        elif component == "device-simulator":
            check_simulator_running(binary, deployment, args, env, work)

    for failure in failures:
        print(f"{rendered.name}: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
