"""Asserts what the Vigil chart renders is what its values ask for, and safe.

Usage: check_rendered.py RENDERED.yaml CHART_VALUES.yaml [OVERRIDES.yaml]

The effective values are the chart's values.yaml with the overrides merged in the way Helm
merges them (a null removes a key). Checks, each failing with the object it is about:

- every Deployment (and the simulator's StatefulSet): pod runAsNonRoot and seccomp RuntimeDefault, no service account token;
  every container (init containers too): resource requests and limits, runAsNonRoot,
  readOnlyRootFilesystem, no privilege escalation, all capabilities dropped; every main
  container: startup, liveness and readiness probes, /tmp on an emptyDir, the binary at
  /usr/local/bin/<crate>, the image <registry>/vigil-<component>:<tag>;
- the model server: gRPC health probes (HTTPS GETs with TLS on), the rollout Kafka flags
  exactly when enabled,
  --replica_id from the pod name; every flag and MODEL_SERVER_* variable it is given is
  declared in services/model-server/src/config.rs; the processor's, alerts' and ingest's flags in their cli.rs or, the common ones
  (--config, ...), in shared/admin/src/service.rs;
- the model server's rollout Kafka security: on kafka.brokers, the --rollout_kafka_property
  flags are kafka's security (security.protocol, sasl.mechanism, ssl.*.location) and
  kafka.properties, then rolloutState.kafka.properties, less bootstrap.servers and the
  properties the server sets itself; the SASL login as MODEL_SERVER_ROLLOUT_KAFKA__SASL_*
  from kafka.sasl's Secret; the kafka.tls Secret mounted where ssl.*.location points. On a
  listener of its own, or with rollout state off, none of kafka's (off: no property at all);
  the properties the server sets itself named alike in config.rs, the values schema and
  the template that leaves them out;
- the headless model server Service, and the processor's model.endpoints pointing at it;
- the model server's security: with TLS on, --ssl_cert_file/--ssl_key_file from the
  Secret mounted as a directory; a generated Secret's certificate checked with openssl
  (chains to its CA, names both Services in every DNS form, is its key's); a cert-manager
  Certificate for the same names and issuer; nothing rendered for an existing Secret; the
  processor dialing https with model.tls_ca_file and only the CA of the Secret mounted;
  the ServiceMonitor scraping https verified by that CA. The token file from its Secret (a
  generated one: 48 random letters and digits), allowed subjects as flags with the client
  CA; with either off, none of its flags or objects;
- the rollout file: the rollouts of the values, field by field (versions, weight, shadow,
  analysis bounds);
- OpenTelemetry variables in every container exactly when otel.endpoint is set, except
  alerts (it sends no traces): never there;
- alerts: HTTP /live (startup, liveness) and /ready (readiness) on its metrics port (the
  Service's, admin_listen's), the ConfigMap's alerts.toml as --config, no ALERTS_CONFIG,
  only the ALERTS_* variables services/alerts reads (the SASL login) and extraEnv; alerts.toml
  has every AlertsConfig field of services/alerts/src/config.rs and nothing else, each value
  as alerts.config gives it, its [[rules]] the values' rules field for field (each field one
  of RuleConfig's); its NetworkPolicy admits only the scrapers to the metrics port and lets
  it out to DNS and Kafka, not the collector; its PodDisruptionBudget selects its pods;
- Kafka SASL variables from the named Secret (PROCESSOR_, INGEST_, ALERTS_), the security
  protocol and TLS file paths in each service's config file;
- the processor's gRPC ReplayService: grpc_listen on streamProcessor.ports.grpc, which its
  container and Service expose as "grpc"; its NetworkPolicy admits
  networkPolicy.streamProcessor.replayFrom to that port and nothing else to it;
- the device simulator: a StatefulSet (pods started in parallel, a headless governing
  Service selecting them) of deviceSimulator.replicas pods, SIMULATOR_REPLICAS set and no
  fixed index (each pod's HOSTNAME ordinal, which cli.rs reads); its flags and SIMULATOR_*
  variables declared in its cli.rs; the login from mqtt.auth's Secret exactly when it is
  on; over an mqtts:// URL the mqtt.tls Secret mounted and its files named, else neither;
- replicas vs autoscaling, NetworkPolicy ingress of the model server, ServiceMonitor ports.
"""

import base64
import copy
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
COMPONENT_VALUES = {
    "model-server": "modelServer",
    "stream-processor": "streamProcessor",
    "alerts": "alerts",
    "ingest": "ingest",
    "device-simulator": "deviceSimulator",
}

# Components whose services export traces (telemetry::Tracing); alerts does not.
TRACED = {"model-server", "stream-processor", "ingest", "device-simulator"}
SASL_ENV_PREFIX = {"stream-processor": "PROCESSOR_", "ingest": "INGEST_", "alerts": "ALERTS_"}

failures: list[str] = []


def check(condition: bool, message: str) -> bool:
    if not condition:
        failures.append(message)
    return condition


def merge(base: dict, override: dict) -> dict:
    """Helm's coalescing: maps merge key by key, a null deletes, anything else replaces."""
    for key, value in override.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def flag_args(container: dict) -> dict:
    """--name=value arguments as {name: value}."""
    out = {}
    for arg in container.get("args", []):
        match = re.fullmatch(r"--([A-Za-z0-9_-]+)(?:=(.*))?", arg, re.S)
        if match:
            out[match.group(1)] = match.group(2)
    return out


def flag_values(container: dict, name: str) -> list[str]:
    """Every value of a repeatable --name=value argument, in order."""
    prefix = f"--{name}="
    return [a[len(prefix):] for a in container.get("args", []) if a.startswith(prefix)]


def librdkafka_string(value) -> str:
    """A values-file scalar as the string the chart gives librdkafka (vigil.stringMap)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# What the model server sets on its rollout Kafka clients and refuses from anyone else
# (MANAGED_KAFKA_PROPERTIES in services/model-server/src/config.rs).
ROLLOUT_MANAGED_PROPERTIES = {"bootstrap.servers", "group.id", "enable.auto.commit", "enable.partition.eof",
                              "enable.idempotence", "linger.ms"}
ROLLOUT_KAFKA_ENV_PREFIX = "MODEL_SERVER_ROLLOUT_KAFKA__"


def numbers_equal(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(numbers_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def check_managed_properties_agree() -> None:
    """The properties the server refuses are the ones the schema refuses and the template omits."""
    source = (REPO / "services/model-server/src/config.rs").read_text()
    match = re.search(r"MANAGED_KAFKA_PROPERTIES: \[&str; \d+\]\s*=\s*\[([^\]]*)\]", source)
    server = set(re.findall(r'"([^"]+)"', match.group(1))) if match else set()
    schema = json.loads((REPO / "helm/vigil/values.schema.json").read_text())
    refused = set(schema["properties"]["modelServer"]["properties"]["rolloutState"]["properties"]["kafka"]["properties"]
                  ["properties"].get("propertyNames", {}).get("not", {}).get("enum", []))
    template = (REPO / "helm/vigil/templates/model-server/_files.tpl").read_text()
    match = re.search(r'\(omit \$props ([^)]*)\)', template)
    omitted = set(re.findall(r'"([^"]+)"', match.group(1))) if match else set()
    for name, found in (("services/model-server/src/config.rs MANAGED_KAFKA_PROPERTIES", server),
                        ("values.schema.json modelServer.rolloutState.kafka.properties propertyNames", refused),
                        ("templates/model-server/_files.tpl omit", omitted)):
        check(found == ROLLOUT_MANAGED_PROPERTIES,
              f"the rollout Kafka properties the server sets itself: {name} has {sorted(found)}, this check {sorted(ROLLOUT_MANAGED_PROPERTIES)}")


def check_rollout_kafka_security(values: dict, deployment: dict, container: dict) -> None:
    """The rollout clients' librdkafka properties, SASL login and TLS files (see the module doc)."""
    where = "model-server container"
    rollout = values["modelServer"]["rolloutState"]["kafka"]
    kafka = values["kafka"]
    shared = rollout["enabled"] and not rollout["brokers"]
    sasl = shared and kafka["sasl"]["enabled"]
    tls_files = shared and kafka["tls"]["enabled"] and bool(kafka["tls"]["existingSecret"])

    # The --rollout_kafka_property flags, each KEY=VALUE once.
    actual: dict[str, str] = {}
    for flag in flag_values(container, "rollout_kafka_property"):
        key, equals, value = flag.partition("=")
        check(bool(equals) and bool(key), f"{where}: --rollout_kafka_property={flag} is not KEY=VALUE")
        check(key not in actual, f"{where}: --rollout_kafka_property {key} given twice")
        actual[key] = value
    expected: dict[str, str] = {}
    if shared:
        protocol = {(True, True): "SASL_SSL", (True, False): "SASL_PLAINTEXT", (False, True): "SSL"}.get(
            (kafka["sasl"]["enabled"], kafka["tls"]["enabled"]))
        if protocol:
            expected["security.protocol"] = protocol
        if kafka["sasl"]["enabled"]:
            expected["sasl.mechanism"] = kafka["sasl"]["mechanism"]
        if tls_files:
            for field, prop in (("caKey", "ssl.ca.location"), ("certKey", "ssl.certificate.location"), ("keyKey", "ssl.key.location")):
                if kafka["tls"][field]:
                    expected[prop] = f"/etc/vigil/kafka-tls/{kafka['tls'][field]}"
        expected.update({k: librdkafka_string(v) for k, v in kafka["properties"].items()})
    if rollout["enabled"]:
        expected.update({k: librdkafka_string(v) for k, v in rollout["properties"].items()})
    expected = {k: v for k, v in expected.items() if k not in ROLLOUT_MANAGED_PROPERTIES}
    if sasl and "security.protocol" not in kafka["properties"]:
        # Said outright, not only through the comparison below: the login needs both.
        check(actual.get("security.protocol") == expected["security.protocol"]
              and actual.get("sasl.mechanism") == kafka["sasl"]["mechanism"],
              f"{where}: rollout state on kafka.brokers with kafka.sasl, but no --rollout_kafka_property security.protocol="
              f"{expected['security.protocol']} and sasl.mechanism={kafka['sasl']['mechanism']}")
    check(actual == expected, f"{where}: --rollout_kafka_property flags {actual} != {expected}")
    managed = sorted(set(actual) & ROLLOUT_MANAGED_PROPERTIES)
    check(not managed, f"{where}: --rollout_kafka_property {managed}: the model server sets (and refuses) these itself")

    # MODEL_SERVER_ROLLOUT_KAFKA__* variables: kafka.sasl's login on kafka.brokers, else only
    # what modelServer.extraEnv names (a listener of its own).
    env = env_of(container)
    rendered = {n for n in env if n.startswith(ROLLOUT_KAFKA_ENV_PREFIX)}
    extra = {e["name"] for e in values["modelServer"]["extraEnv"] if e["name"].startswith(ROLLOUT_KAFKA_ENV_PREFIX)}
    want = set(extra)
    if sasl:
        for field in ("USERNAME", "PASSWORD"):
            name = f"{ROLLOUT_KAFKA_ENV_PREFIX}SASL_{field}"
            want.add(name)
            ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef", {})
            check(ref.get("name") == kafka["sasl"]["existingSecret"] and ref.get("key") == kafka["sasl"][f"{field.lower()}Key"],
                  f"{where}: {name} is not key {kafka['sasl'][f'{field.lower()}Key']} of Secret {kafka['sasl']['existingSecret']}")
    check(rendered == want, f"{where}: rollout Kafka variables {sorted(rendered)} != {sorted(want)}")
    if not rollout["enabled"]:
        check(not rendered and not actual, f"{where}: rollout state is off but rollout Kafka properties or variables are set")

    # The kafka.tls Secret mounted exactly when the rollout clients read its files.
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    tls_mount = mounts.get("/etc/vigil/kafka-tls")
    if tls_files:
        secret = volumes.get((tls_mount or {}).get("name"), {}).get("secret", {}).get("secretName")
        check(secret == kafka["tls"]["existingSecret"],
              f"{where}: rollout state on kafka.brokers with kafka.tls, but Secret {kafka['tls']['existingSecret']} is not mounted at /etc/vigil/kafka-tls")
    else:
        check(tls_mount is None, f"{where}: /etc/vigil/kafka-tls is mounted but the rollout clients do not use kafka.tls")
    for key, value in actual.items():
        if key.endswith(".location"):
            check(any(value.startswith(path.rstrip("/") + "/") for path in mounts),
                  f"{where}: --rollout_kafka_property {key}={value} is not in a mounted directory")


def struct_fields(source: str, name: str) -> list[str]:
    """The `pub` field names of `pub struct <name> { ... }` in Rust source."""
    match = re.search(rf"pub struct {name} \{{(.*?)\n\}}", source, re.S)
    return re.findall(r"^\s*pub (\w+):", match.group(1), re.M) if match else []


def check_processor_grpc(values: dict, deployment: dict, configmap: dict, by_kind: dict) -> None:
    port = values["streamProcessor"]["ports"]["grpc"]
    config = tomllib.loads(configmap["data"]["stream-processor.toml"])
    check(config.get("grpc_listen") == f"0.0.0.0:{port}",
          f"stream-processor.toml: grpc_listen is {config.get('grpc_listen')!r}, not 0.0.0.0:{port}")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    check({"name": "grpc", "containerPort": port, "protocol": "TCP"} in container.get("ports", []),
          f"stream-processor container: no port grpc {port}")
    labels = deployment["spec"]["selector"]["matchLabels"]
    services = [s for s in by_kind.get("Service", {}).values() if s["spec"].get("selector") == labels]
    grpc = [p for s in services for p in s["spec"]["ports"] if p["name"] == "grpc"]
    check(len(grpc) == 1 and grpc[0]["port"] == port and grpc[0]["targetPort"] == "grpc",
          f"stream-processor Service: gRPC ports {grpc}, want one on {port} to the container's grpc")
    if values["networkPolicy"]["enabled"]:
        policy = next(p for p in by_kind["NetworkPolicy"].values()
                      if p["spec"]["podSelector"].get("matchLabels") == labels)
        peers = [peer for rule in policy["spec"].get("ingress") or []
                 if any(p.get("port") == "grpc" for p in rule.get("ports", [])) for peer in rule.get("from", [])]
        want = values["networkPolicy"]["streamProcessor"]["replayFrom"]
        check(peers == want, f"stream-processor NetworkPolicy: gRPC admitted from {peers}, want {want}")
        print(f"    stream-processor gRPC :{port}: ReplayService open to {len(want)} peer selector(s)")


def check_ingest_devices(values: dict, deployment: dict, configmap: dict, by_kind: dict) -> None:
    """The MQTT proxy and HTTP ports: config, container ports, the device Service, the
    Secrets mounted where the config reads them, the NetworkPolicy and the HPA's metric."""
    ingest = values["ingest"]
    config = tomllib.loads(configmap["data"]["ingest.toml"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
    labels = deployment["spec"]["selector"]["matchLabels"]
    devices = next((s for s in by_kind.get("Service", {}).values()
                    if s["spec"].get("selector") == labels and s["metadata"]["name"].endswith("-devices")), None)
    want_mqtt = values["mqtt"]["url"] if ingest["mqttBridge"]["enabled"] else ""
    check(config["mqtt"]["url"] == want_mqtt, f"ingest.toml: mqtt.url is {config['mqtt']['url']!r}, want {want_mqtt!r}")
    served = []
    for key, section, enabled, secret, secret_key, volume, directory, file_key in (
        ("mqtt", "mqtt_proxy", ingest["mqttProxy"]["enabled"], ingest["mqttProxy"]["usersSecret"],
         ingest["mqttProxy"]["usersKey"], "proxy-users", "/etc/vigil/ingest-users", "users_file"),
        ("http", "http", ingest["http"]["enabled"], ingest["http"]["tokenSecret"],
         ingest["http"]["tokenKey"], "http-token", "/etc/vigil/ingest-token", "token_file"),
    ):
        port = ingest["ports"][key]
        listen = config[section].get("listen", "")
        check(listen == (f"0.0.0.0:{port}" if enabled else ""), f"ingest.toml: {section}.listen is {listen!r}")
        has_port = {"name": key, "containerPort": port, "protocol": "TCP"} in container.get("ports", [])
        check(has_port == enabled, f"ingest container: port {key} {'missing' if enabled else 'present while off'}")
        service_ports = [p for p in (devices or {"spec": {"ports": []}})["spec"]["ports"] if p["name"] == key]
        check(len(service_ports) == int(enabled), f"ingest device Service: {key} ports {service_ports}")
        if enabled and secret:
            check(mounts.get(volume) == directory and volumes.get(volume, {}).get("secret", {}).get("secretName") == secret,
                  f"ingest: Secret {secret} is not mounted at {directory}")
            check(config[section].get(file_key) == f"{directory}/{secret_key}",
                  f"ingest.toml: {section}.{file_key} is not the mounted Secret's {secret_key}")
        else:
            check(file_key not in config[section] and volume not in mounts, f"ingest: {volume} mounted while unused")
        if enabled:
            served.append(f"{key} :{port}")
    tls = ingest["deviceTls"]
    for section, enabled in (("mqtt_proxy", ingest["mqttProxy"]["enabled"]), ("http", ingest["http"]["enabled"])):
        want = None
        if enabled and tls["existingSecret"]:
            want = {"cert_file": f"/etc/vigil/device-tls/{tls['certKey']}", "key_file": f"/etc/vigil/device-tls/{tls['keyKey']}",
                    "client_certificates": tls["clientCertificates"]}
            if tls["clientCertificates"] != "none":
                want["client_ca_file"] = f"/etc/vigil/device-tls/{tls['caKey']}"
        check(config[section].get("tls") == want, f"ingest.toml: {section}.tls is {config[section].get('tls')}, want {want}")
    if tls["existingSecret"] and served:
        check(mounts.get("device-tls") == "/etc/vigil/device-tls"
              and volumes.get("device-tls", {}).get("secret", {}).get("secretName") == tls["existingSecret"],
              f"ingest: deviceTls Secret {tls['existingSecret']} is not mounted at /etc/vigil/device-tls")
        served = [f"{port} over TLS" for port in served]
    check((devices is not None) == bool(served), "ingest device Service: present exactly when a device port is on")
    if devices is not None:
        check(devices["spec"]["type"] == ingest["deviceService"]["type"], "ingest device Service: not deviceService.type")
    if values["networkPolicy"]["enabled"] and served:
        policy = next(p for p in by_kind["NetworkPolicy"].values() if p["spec"]["podSelector"].get("matchLabels") == labels)
        rules = [r for r in policy["spec"].get("ingress") or [] if any(p.get("port") in ("mqtt", "http") for p in r["ports"])]
        want = values["networkPolicy"]["ingest"]["devicesFrom"]
        check(len(rules) == 1 and rules[0].get("from", []) == want,
              f"ingest NetworkPolicy: device ports admitted by {rules}, want from {want or 'anywhere'}")
    hpa = next((h for h in by_kind.get("HorizontalPodAutoscaler", {}).values()
                if h["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]), None)
    target = ingest["mqttProxy"].get("targetConnectionsPerPod")
    if hpa is not None:
        pods = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        want = [] if target is None or not ingest["mqttProxy"]["enabled"] else [
            {"type": "Pods", "pods": {"metric": {"name": "ingest_proxy_connections"},
                                      "target": {"type": "AverageValue", "averageValue": str(target)}}}]
        check(pods == want, f"ingest HPA: Pods metrics {pods}, want {want}")
    if served:
        print(f"    ingest device ports: {', '.join(served)} on a {ingest['deviceService']['type']} Service")


def check_alerts(values: dict, deployment: dict, configmap: dict | None, by_kind: dict) -> None:
    """The alerts Deployment, its config file, NetworkPolicy and PodDisruptionBudget (see the module doc)."""
    al = values["alerts"]
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "alerts")
    where = "alerts container"

    # Probes: HTTP on the admin port, which is the Service's and admin_listen's.
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    check(ports == {"metrics": al["ports"]["metrics"]}, f"{where}: ports {ports} != metrics {al['ports']['metrics']}")
    for probe, path in (("startupProbe", "/live"), ("livenessProbe", "/live"), ("readinessProbe", "/ready")):
        get = container.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path and get.get("port") in ("metrics", al["ports"]["metrics"]),
              f"{where}: {probe} is not HTTP {path} on the metrics port: {container.get(probe)}")
    service = next((s for s in by_kind.get("Service", {}).values()
                    if s["metadata"]["labels"]["app.kubernetes.io/component"] == "alerts"), None)
    if check(service is not None, "alerts: no Service for its metrics"):
        check(service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"], "alerts: the Service does not select its pods")
        check([(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("metrics", al["ports"]["metrics"], "metrics")],
              f"alerts: Service ports {service['spec']['ports']} are not metrics {al['ports']['metrics']}")
        check(service["metadata"]["labels"].get("vigil.io/metrics") == "true", "alerts: the Service is not labelled for the ServiceMonitor")

    # --config names the ConfigMap's alerts.toml; the environment is only what the code reads.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    config_args = flag_values(container, "config")
    check(len(config_args) == 1 and container["args"] == [f"--config={config_args[0]}"],
          f"{where}: args {container.get('args')} are not one --config=FILE")
    if config_args:
        directory, _, file = config_args[0].rpartition("/")
        mount = mounts.get(directory, {})
        check(volumes.get(mount.get("name"), {}).get("configMap", {}).get("name") == (configmap or {}).get("metadata", {}).get("name")
              and file in (configmap or {}).get("data", {}),
              f"{where}: --config={config_args[0]} is not the alerts ConfigMap's file")
    env = env_of(container)
    extra = {e["name"] for e in al["extraEnv"]}
    sasl = {f"ALERTS_KAFKA__SASL_{f}" for f in ("USERNAME", "PASSWORD")} if values["kafka"]["sasl"]["enabled"] else set()
    check(set(env) == sasl | extra, f"{where}: variables {sorted(env)} != {sorted(sasl | extra)} (the SASL login and extraEnv only)")
    check("ALERTS_CONFIG" not in env, f"{where}: ALERTS_CONFIG is set; it is the --config flag's variable")
    source = (REPO / "services/alerts/src/config.rs").read_text()
    if sasl:
        check('prefix: "ALERTS_"' in source and 'pass_through: &["kafka"]' in source,
              f"{where}: services/alerts/src/config.rs does not read ALERTS_KAFKA__<PROPERTY> variables")

    # alerts.toml: every AlertsConfig field, each as the values give it; the rules field for field.
    if not check(configmap is not None and "alerts.toml" in configmap.get("data", {}), "alerts: no ConfigMap with alerts.toml"):
        return
    config = tomllib.loads(configmap["data"]["alerts.toml"])
    fields = struct_fields(source, "AlertsConfig")
    rule_fields = struct_fields(source, "RuleConfig")
    check(bool(fields) and bool(rule_fields), "alerts: no AlertsConfig / RuleConfig fields found in services/alerts/src/config.rs")
    check(sorted(config) == sorted(fields), f"alerts.toml keys {sorted(config)} != AlertsConfig's fields {sorted(fields)}")
    check(config.get("admin_listen") == f"0.0.0.0:{al['ports']['metrics']}", f"alerts.toml: admin_listen is {config.get('admin_listen')!r}, not the metrics port")
    for key, value in al["config"].items():
        if key != "rules":
            check(numbers_equal(config.get(key), value), f"alerts.toml: {key} = {config.get(key)!r}, values say {value!r}")
    rules = config.get("rules", [])
    check(len(rules) == len(al["config"]["rules"]), f"alerts.toml has {len(rules)} rules, the values {len(al['config']['rules'])}")
    for index, (want, got) in enumerate(zip(al["config"]["rules"], rules)):
        check(sorted(got) == sorted(want), f"alerts.toml rules[{index}] has keys {sorted(got)}, the values {sorted(want)}")
        check(set(got) <= set(rule_fields), f"alerts.toml rules[{index}]: {sorted(set(got) - set(rule_fields))} are not RuleConfig fields")
        for key, value in want.items():
            check(numbers_equal(got.get(key), value) and isinstance(got.get(key), str) == isinstance(value, str),
                  f"alerts.toml rules[{index}] ({want.get('name')}): {key} = {got.get(key)!r}, values say {value!r}")
        condition = [k for k in ("min_anomalies", "min_readings", "mean_score_above", "max_score_above") if k in got]
        check(bool(condition), f"alerts.toml rules[{index}] ({got.get('name')}) has no condition")
        print(f"    alerts rule {got.get('name')}: {got.get('window_seconds')} s windows"
              f"{', every ' + str(got['advance_seconds']) + ' s' if 'advance_seconds' in got else ' (tumbling)'}, "
              + ", ".join(f"{k} {got[k]}" for k in condition))

    # NetworkPolicy: scrapers in on the metrics port only; out to DNS and Kafka, not the collector.
    np = values["networkPolicy"]
    if np["enabled"]:
        policy = next((p for p in by_kind.get("NetworkPolicy", {}).values()
                       if p["metadata"]["labels"]["app.kubernetes.io/component"] == "alerts"), None)
        if check(policy is not None, "networkPolicy.enabled but no alerts NetworkPolicy"):
            spec = policy["spec"]
            check(spec["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"], "the alerts NetworkPolicy does not select its pods")
            check(sorted(spec["policyTypes"]) == ["Egress", "Ingress"], "the alerts NetworkPolicy does not restrict both directions")
            want_in = [{"from": np["metrics"]["from"], "ports": [{"port": "metrics", "protocol": "TCP"}]}] if np["metrics"]["from"] else []
            check((spec.get("ingress") or []) == want_in, f"alerts NetworkPolicy ingress {spec.get('ingress')} != {want_in}")

            def rule(ports: list, to: list, protocols=("TCP",)) -> dict:
                out = {"ports": [{"port": p, "protocol": proto} for p in ports for proto in protocols]}
                return {**out, "to": to} if to else out
            egress = spec.get("egress") or []
            dns = {"ports": [{"port": np["dns"]["port"], "protocol": "UDP"}, {"port": np["dns"]["port"], "protocol": "TCP"}]}
            if np["dns"]["to"]:
                dns["to"] = np["dns"]["to"]
            kafka = rule(np["kafka"]["ports"], np["kafka"]["to"])
            check(egress == [dns, *np["extraEgress"], kafka], f"alerts NetworkPolicy egress {egress} != DNS, extraEgress, Kafka")
            if values["otel"]["endpoint"]:
                check(rule(np["otel"]["ports"], np["otel"]["to"]) not in egress, "the alerts NetworkPolicy lets it out to the collector; it sends no traces")

    # PodDisruptionBudget.
    pdbs = [p for p in by_kind.get("PodDisruptionBudget", {}).values()
            if p["metadata"]["labels"]["app.kubernetes.io/component"] == "alerts"]
    if al["podDisruptionBudget"]["enabled"]:
        check(len(pdbs) == 1 and pdbs[0]["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"],
              "alerts: podDisruptionBudget.enabled but no PodDisruptionBudget selecting its pods")
    else:
        check(not pdbs, "alerts: podDisruptionBudget.enabled is false but one is rendered")


MODEL_SERVER_TLS_DIR = "/etc/vigil/model-server-tls"
MODEL_SERVER_TOKEN_DIR = "/etc/vigil/model-server-token"


def openssl(*args: str, stdin: bytes | None = None) -> str:
    result = subprocess.run(["openssl", *args], input=stdin, capture_output=True, timeout=30)
    check(result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr.decode().strip()}")
    return result.stdout.decode()


def check_generated_certificate(secret: dict, ca_key: str, names: list[str]) -> None:
    """The chart's own certificate: chains to its CA, names every Service name, and is the key's."""
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    if not check({"tls.crt", "tls.key", ca_key} <= set(data), f"Secret {secret['metadata']['name']}: keys {sorted(data)}"):
        return
    with tempfile.TemporaryDirectory() as work:
        files = {}
        for key, value in data.items():
            files[key] = pathlib.Path(work) / key
            files[key].write_bytes(value)
        verified = openssl("verify", "-CAfile", str(files[ca_key]), str(files["tls.crt"]))
        check(verified.strip().endswith(": OK"), f"Secret {secret['metadata']['name']}: tls.crt does not chain to {ca_key}")
        san = openssl("x509", "-in", str(files["tls.crt"]), "-noout", "-ext", "subjectAltName")
        for name in names:
            check(f"DNS:{name}," in san.strip() + ",", f"Secret {secret['metadata']['name']}: the certificate does not name {name} ({san.strip()})")
        cert_key = openssl("x509", "-in", str(files["tls.crt"]), "-noout", "-pubkey")
        key_key = openssl("pkey", "-in", str(files["tls.key"]), "-pubout")
        check(cert_key == key_key, f"Secret {secret['metadata']['name']}: tls.key is not tls.crt's key")


def check_model_server_security(values: dict, deployments: dict, configmaps: dict, by_kind: dict) -> None:
    """modelServer.security: TLS and the token as flags, mounts, Secrets or a Certificate,
    probes that can speak TLS, and the processor and ServiceMonitor dialing TLS with the CA."""
    ms = values["modelServer"]
    security = ms["security"]
    deployment = deployments["model-server"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    where = "model-server container"
    flags = flag_args(container)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    release = deployment["metadata"]["name"].removesuffix("-model-server")
    services = [s["metadata"]["name"] for s in by_kind.get("Service", {}).values()
                if s["metadata"]["labels"]["app.kubernetes.io/component"] == "model-server"]
    namespace = "vigil"
    names = [f"{svc}{suffix}" for svc in sorted(services) for suffix in ("", f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.cluster.local")]
    tls = security["tls"]
    secrets = by_kind.get("Secret", {})
    certificates = by_kind.get("Certificate", {})
    if tls["enabled"]:
        check(flags.get("ssl_cert_file") == f"{MODEL_SERVER_TLS_DIR}/tls.crt" and flags.get("ssl_key_file") == f"{MODEL_SERVER_TLS_DIR}/tls.key",
              f"{where}: TLS is on but --ssl_cert_file/--ssl_key_file are {flags.get('ssl_cert_file')}, {flags.get('ssl_key_file')}")
        check("ssl_config_file" not in flags, f"{where}: --ssl_config_file beside the PEM files")
        secret_name = tls["existingSecret"] if tls["source"] == "secret" else f"{release}-model-server-tls"
        mount = mounts.get(MODEL_SERVER_TLS_DIR)
        volume = volumes.get(mount["name"]) if mount else None
        check(volume is not None and volume.get("secret", {}).get("secretName") == secret_name and "subPath" not in mount,
              f"{where}: {MODEL_SERVER_TLS_DIR} is not Secret {secret_name} mounted as a directory")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe].get("httpGet", {})
            check(get.get("scheme") == "HTTPS" and get.get("port") == "http", f"{where}: {probe} is not an HTTPS GET of the REST port ({container[probe]})")
        check(container["readinessProbe"]["httpGet"]["path"] == "/ready", f"{where}: readiness is not /ready")
        if tls["source"] == "generated":
            if check(secret_name in secrets, f"TLS source generated but no Secret {secret_name}"):
                check(secrets[secret_name]["type"] == "kubernetes.io/tls", f"Secret {secret_name} is not kubernetes.io/tls")
                check_generated_certificate(secrets[secret_name], tls["caKey"], names)
            check(not certificates, "TLS source generated but a Certificate is rendered")
        elif tls["source"] == "certManager":
            certificate = next(iter(certificates.values()), None)
            if check(certificate is not None and len(certificates) == 1, "TLS source certManager but not one Certificate"):
                spec = certificate["spec"]
                check(spec["secretName"] == secret_name, f"Certificate secretName {spec['secretName']} != {secret_name}")
                check(set(names) <= set(spec["dnsNames"]), f"Certificate dnsNames {spec['dnsNames']} miss some of {names}")
                check(spec["issuerRef"] == tls["certManager"]["issuerRef"], f"Certificate issuerRef {spec['issuerRef']}")
            check(secret_name not in secrets, f"TLS from cert-manager, but the chart renders Secret {secret_name} too")
        else:
            check(secret_name not in secrets and not certificates, f"TLS from the existing Secret {secret_name}, but the chart renders one")
        if "stream-processor" in deployments:
            processor = tomllib.loads(configmaps["stream-processor"]["data"]["stream-processor.toml"])
            ca_file = f"{MODEL_SERVER_TLS_DIR}/{tls['caKey']}"
            check(processor["model"].get("tls_ca_file") == ca_file, f"processor model.tls_ca_file is {processor['model'].get('tls_ca_file')}, not {ca_file}")
            sp_pod = deployments["stream-processor"]["spec"]["template"]["spec"]
            sp_mount = next((m for m in sp_pod["containers"][0].get("volumeMounts", []) if m["mountPath"] == MODEL_SERVER_TLS_DIR), None)
            sp_volume = next((v for v in sp_pod.get("volumes", []) if sp_mount and v["name"] == sp_mount["name"]), {})
            items = sp_volume.get("secret", {}).get("items", [])
            check(sp_volume.get("secret", {}).get("secretName") == secret_name and [i["key"] for i in items] == [tls["caKey"]],
                  f"stream-processor: the model server's Secret is not mounted with only its CA ({sp_volume})")
        for monitor in by_kind.get("ServiceMonitor", {}).values():
            if monitor["metadata"]["labels"]["app.kubernetes.io/component"] == "model-server":
                endpoint = monitor["spec"]["endpoints"][0]
                check(endpoint.get("scheme") == "https" and endpoint.get("tlsConfig", {}).get("ca", {}).get("secret") == {"name": secret_name, "key": tls["caKey"]},
                      f"ServiceMonitor {monitor['metadata']['name']}: does not scrape https verified by the model server's CA")
                check(endpoint["tlsConfig"].get("serverName") in names, f"ServiceMonitor {monitor['metadata']['name']}: serverName is not a certificate name")
    else:
        for flag in ("ssl_cert_file", "ssl_key_file", "ssl_client_ca_file", "ssl_config_file"):
            check(flag not in flags, f"{where}: TLS is off but --{flag} is set")
        check(MODEL_SERVER_TLS_DIR not in mounts, f"{where}: TLS is off but a TLS Secret is mounted")
        check(not certificates and not any(n.endswith("-model-server-tls") for n in secrets), "TLS is off but a TLS Secret or Certificate is rendered")
    subjects = security["allowedSubjects"]
    check(flag_values(container, "management_allowed_subject") == subjects, f"{where}: --management_allowed_subject {flag_values(container, 'management_allowed_subject')} != {subjects}")
    if subjects:
        check(flags.get("ssl_client_ca_file") == f"{MODEL_SERVER_TLS_DIR}/{tls['caKey']}", f"{where}: allowed subjects without --ssl_client_ca_file")
    else:
        check("ssl_client_ca_file" not in flags, f"{where}: --ssl_client_ca_file without allowed subjects")
    token = security["managementToken"]
    if token["enabled"]:
        secret_name = token["existingSecret"] or f"{release}-model-server-token"
        check(flags.get("management_token_file") == f"{MODEL_SERVER_TOKEN_DIR}/{token['key']}", f"{where}: --management_token_file is {flags.get('management_token_file')}")
        mount = mounts.get(MODEL_SERVER_TOKEN_DIR)
        volume = volumes.get(mount["name"]) if mount else None
        check(volume is not None and volume.get("secret", {}).get("secretName") == secret_name, f"{where}: the token Secret {secret_name} is not mounted")
        if not token["existingSecret"]:
            if check(secret_name in secrets, f"no token Secret {secret_name}"):
                value = base64.b64decode(secrets[secret_name]["data"].get(token["key"], "")).decode()
                check(re.fullmatch(r"[A-Za-z0-9]{48}", value) is not None, f"Secret {secret_name}: the token is not 48 random letters and digits")
        else:
            check(secret_name not in secrets, f"the token comes from the existing Secret {secret_name}, but the chart renders one")
    else:
        check("management_token_file" not in flags, f"{where}: the token is off but --management_token_file is set")
    print(f"    model-server security: TLS {'from ' + tls['source'] if tls['enabled'] else 'off'}, management token "
          f"{('from ' + (token['existingSecret'] or 'a generated Secret')) if token['enabled'] else 'off'}, {len(subjects)} allowed subjects")


def check_simulator(values: dict, statefulset: dict, by_kind: dict) -> None:
    """The device simulator's StatefulSet (see the module doc)."""
    sim, mqtt = values["deviceSimulator"], values["mqtt"]
    spec = statefulset["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    where = "device-simulator"
    source = (REPO / "services/device-simulator/src/cli.rs").read_text()
    check(container["args"][0] == "run" and "Run {" in source, f"{where}: not its run subcommand")
    flags = flag_args(container)
    for flag in flags:
        check(re.search(rf"\b{flag.replace('-', '_')}: ", source) is not None,
              f"{where}: --{flag} is not an argument in services/device-simulator/src/cli.rs")
    url = sim["mqttUrl"] or mqtt["url"]
    check(flags.get("mqtt-url") == url, f"{where}: --mqtt-url is {flags.get('mqtt-url')}, not {url}")
    check(flags.get("mqtt-version") == sim["mqttVersion"], f"{where}: --mqtt-version is not {sim['mqttVersion']}")
    check(numbers_equal(float(flags.get("trace-share", "nan")), sim["traceShare"]), f"{where}: --trace-share is not {sim['traceShare']}")

    # Replicas: pods that start together, each taking its ordinal (HOSTNAME) as its index.
    check(spec.get("podManagementPolicy") == "Parallel", f"{where}: podManagementPolicy is not Parallel")
    governing = by_kind.get("Service", {}).get(spec.get("serviceName"))
    if check(governing is not None, f"{where}: serviceName {spec.get('serviceName')} is not a rendered Service"):
        check(governing["spec"].get("clusterIP") == "None", f"{where}: its governing Service is not headless")
        check(governing["spec"]["selector"] == spec["selector"]["matchLabels"], f"{where}: its Service does not select its pods")
    env = env_of(container)
    check(env.get("SIMULATOR_REPLICAS", {}).get("value") == str(sim["replicas"]), f"{where}: SIMULATOR_REPLICAS is not {sim['replicas']}")
    check("SIMULATOR_REPLICA_INDEX" not in env and "replica-index" not in flags,
          f"{where}: sets a replica index, which would be the same in every pod (the ordinal is in HOSTNAME)")
    check(pod.get("hostname") is None and pod.get("setHostnameAsFQDN") is not True,
          f"{where}: the pod's hostname is overridden, so HOSTNAME does not end in its ordinal")

    # The login from mqtt.auth's Secret; the TLS files from mqtt.tls's over an mqtts:// URL.
    auth = mqtt["auth"]
    for var, key in (("SIMULATOR_MQTT_USERNAME", "usernameKey"), ("SIMULATOR_MQTT_PASSWORD", "passwordKey")):
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
        if auth["enabled"]:
            check(ref == {"name": auth["existingSecret"], "key": auth[key]}, f"{where}: {var} is not key {auth[key]} of Secret {auth['existingSecret']}")
        else:
            check(var not in env, f"{where}: mqtt.auth is off but {var} is set")
    tls = mqtt["tls"]
    use_tls = url.startswith(("mqtts://", "ssl://")) and bool(tls["existingSecret"])
    files = {"SIMULATOR_TLS_CA_FILE": tls["caKey"], "SIMULATOR_TLS_CERT_FILE": tls["certKey"], "SIMULATOR_TLS_KEY_FILE": tls["keyKey"]}
    for var, key in files.items():
        want = f"/etc/vigil/mqtt-tls/{key}" if use_tls and key else None
        check(env.get(var, {}).get("value") == want, f"{where}: {var} is {env.get(var, {}).get('value')}, not {want}")
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/etc/vigil/mqtt-tls"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if use_tls:
        check(len(mounts) == 1 and volumes.get(mounts[0]["name"], {}).get("secret", {}).get("secretName") == tls["existingSecret"],
              f"{where}: Secret {tls['existingSecret']} is not mounted at /etc/vigil/mqtt-tls")
    else:
        check(not mounts, f"{where}: the MQTT TLS Secret is mounted without an mqtts:// URL")
    for var in env:
        if var.startswith("SIMULATOR_") and var not in {e["name"] for e in sim["extraEnv"]}:
            check(f'env = "{var}"' in source, f"{where}: {var} is not a variable services/device-simulator/src/cli.rs reads")
    print(f"    device-simulator: a StatefulSet of {sim['replicas']} pod(s), MQTT {sim['mqttVersion']} to {url}"
          f"{', logged in from ' + auth['existingSecret'] if auth['enabled'] else ''}"
          f"{', TLS files from ' + tls['existingSecret'] if use_tls else ''}")


def main() -> int:
    rendered_path, chart_values = sys.argv[1], sys.argv[2]
    values = yaml.safe_load(pathlib.Path(chart_values).read_text())
    for override in sys.argv[3:]:
        merge(values, yaml.safe_load(pathlib.Path(override).read_text()) or {})
    docs = [d for d in yaml.safe_load_all(pathlib.Path(rendered_path).read_text()) if d]
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc

    def component_of(doc: dict) -> str:
        return doc["metadata"]["labels"]["app.kubernetes.io/component"]

    # The simulator is a StatefulSet (its pods' ordinals split the fleet); the rest Deployments.
    workloads = {component_of(d): d for kind in ("Deployment", "StatefulSet") for d in by_kind.get(kind, {}).values()}
    configmaps = {component_of(d): d for d in by_kind.get("ConfigMap", {}).values()}
    enabled = {c for c, key in COMPONENT_VALUES.items() if values[key]["enabled"]}
    check(set(workloads) == enabled, f"Deployments and StatefulSets {sorted(workloads)} != enabled components {sorted(enabled)}")
    for component, workload in workloads.items():
        want = "StatefulSet" if component == "device-simulator" else "Deployment"
        check(workload["kind"] == want, f"{component} is a {workload['kind']}, not a {want}")

    registry = values["image"]["registry"].rstrip("/")
    for component, deployment in workloads.items():
        v = values[COMPONENT_VALUES[component]]
        name = f"{deployment['kind']} {deployment['metadata']['name']}"
        pod = deployment["spec"]["template"]["spec"]
        check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot is not true")
        check(pod.get("securityContext", {}).get("seccompProfile", {}).get("type") == "RuntimeDefault",
              f"{name}: pod seccompProfile is not RuntimeDefault")
        check(pod.get("automountServiceAccountToken") is False, f"{name}: the service account token is mounted")
        # Service links would inject <SERVICE>_PORT variables into the services' env prefixes.
        check(pod.get("enableServiceLinks") is False, f"{name}: enableServiceLinks is not false")
        volumes = {vol["name"]: vol for vol in pod.get("volumes", [])}
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name} container {container['name']}"
            resources = container.get("resources", {})
            check(bool(resources.get("requests")) and bool(resources.get("limits")), f"{where}: no resource requests and limits")
            sc = container.get("securityContext", {})
            check(sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true")
            check(sc.get("runAsUser", 0) != 0, f"{where}: runs as UID 0")
            check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem is not true")
            check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation is not false")
            check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: capabilities are not all dropped")
        main_containers = [c for c in pod["containers"] if c["name"] == component]
        if not check(len(main_containers) == 1, f"{name}: no container named {component}"):
            continue
        container = main_containers[0]
        where = f"{name} container {component}"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            check(probe in container, f"{where}: no {probe}")
        tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        check(len(tmp) == 1 and "emptyDir" in volumes.get(tmp[0]["name"], {}), f"{where}: /tmp is not an emptyDir")
        check(container.get("command") == [f"/usr/local/bin/{component}"], f"{where}: command is {container.get('command')}")
        tag = v["image"]["tag"] or values["image"]["tag"] or None
        image = container["image"]
        check(re.fullmatch(rf"{re.escape(registry)}/vigil-{component}:{re.escape(str(tag)) if tag else '[^:/]+'}", image) is not None,
              f"{where}: image {image} is not {registry}/vigil-{component}:<tag>")
        if v.get("autoscaling", {}).get("enabled"):
            check("replicas" not in deployment["spec"], f"{name}: sets replicas while an HPA scales it")
            check(any(h["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
                      for h in by_kind.get("HorizontalPodAutoscaler", {}).values()), f"{name}: autoscaling on but no HPA")
        elif component == "device-simulator":
            check(deployment["spec"].get("replicas") == v["replicas"], f"{name}: replicas is not {v['replicas']}")
        else:
            check(deployment["spec"].get("replicas") == v["replicaCount"], f"{name}: replicas is not {v['replicaCount']}")

        env = env_of(container)
        otel = values["otel"]["endpoint"]
        otel_vars = sorted(n for n in env if n.startswith("OTEL_"))
        if otel and component in TRACED:
            check(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", {}).get("value") == otel, f"{where}: OTEL_EXPORTER_OTLP_ENDPOINT is not {otel}")
            # The name each service gives itself (telemetry::Tracing::from_env in its cli.rs).
            check(env.get("OTEL_SERVICE_NAME", {}).get("value") == f"vigil-{component}", f"{where}: OTEL_SERVICE_NAME is not vigil-{component}")
        elif component not in TRACED:
            check(not otel_vars, f"{where}: sends no traces but {otel_vars} are set")
        else:
            check(not otel_vars, f"{where}: otel.endpoint is empty but {otel_vars} are set")

        if component in SASL_ENV_PREFIX:
            prefix = SASL_ENV_PREFIX[component]
            sasl = values["kafka"]["sasl"]
            for field in ("USERNAME", "PASSWORD"):
                var = env.get(f"{prefix}KAFKA__SASL_{field}")
                if sasl["enabled"]:
                    ref = (var or {}).get("valueFrom", {}).get("secretKeyRef", {})
                    check(ref.get("name") == sasl["existingSecret"] and ref.get("key") == sasl[f"{field.lower()}Key"],
                          f"{where}: {prefix}KAFKA__SASL_{field} is not from Secret {sasl['existingSecret']}")
                else:
                    check(var is None, f"{where}: kafka.sasl is off but {prefix}KAFKA__SASL_{field} is set")
            check(container["readinessProbe"].get("httpGet", {}).get("path") == "/ready", f"{where}: readiness is not /ready")

    # The model server: probes, flags, rollout state, the rollout file.
    ms = values["modelServer"]
    if "model-server" in workloads:
        container = workloads["model-server"]["spec"]["template"]["spec"]["containers"][0]
        where = "model-server container"
        if not ms["security"]["tls"]["enabled"]:
            for probe in ("startupProbe", "readinessProbe"):
                check(container[probe].get("grpc", {}).get("port") == ms["ports"]["grpc"], f"{where}: {probe} is not gRPC health on {ms['ports']['grpc']}")
        flags = flag_args(container)
        source = (REPO / "services/model-server/src/config.rs").read_text()
        for flag in flags:
            check(f'long = "{flag}"' in source, f"{where}: --{flag} is not a flag in services/model-server/src/config.rs")
        for var in env_of(container):
            if var.startswith(ROLLOUT_KAFKA_ENV_PREFIX):
                check(f'ROLLOUT_KAFKA_ENV_PREFIX: &str = "{ROLLOUT_KAFKA_ENV_PREFIX}"' in source,
                      f"{where}: {var}: services/model-server/src/config.rs reads no {ROLLOUT_KAFKA_ENV_PREFIX}<KEY> variables")
            elif var.startswith("MODEL_SERVER_"):
                check(f'env = "{var}"' in source, f"{where}: {var} is not read by services/model-server/src/config.rs")
        check(flags.get("enable_grpc_healthcheck_service") == "true", f"{where}: gRPC health is not enabled")
        replica = env_of(container).get("MODEL_SERVER_REPLICA_ID", {}).get("valueFrom", {}).get("fieldRef", {})
        check(replica.get("fieldPath") == "metadata.name", f"{where}: --replica_id (MODEL_SERVER_REPLICA_ID) is not the pod name")
        kafka = ms["rolloutState"]["kafka"]
        expected = {}
        if kafka["enabled"]:
            expected = {
                "rollout_kafka_brokers": kafka["brokers"] or values["kafka"]["brokers"],
                "rollout_state_topic": kafka["stateTopic"],
                "rollout_events_topic": kafka["eventsTopic"],
                "rollout_leader_group": kafka["leaderGroup"],
            }
        actual = {k: v for k, v in flags.items()
                  if k.startswith("rollout_") and "config_file" not in k and k != "rollout_kafka_property"}
        check(actual == expected, f"{where}: rollout state flags {actual} != {expected}")
        check_rollout_kafka_security(values, workloads["model-server"], container)
        check_managed_properties_agree()

        headless = [s for s in by_kind.get("Service", {}).values()
                    if component_of(s) == "model-server" and s["spec"].get("clusterIP") == "None"]
        if check(len(headless) == 1, "no headless model server Service"):
            service = headless[0]
            pod_labels = workloads["model-server"]["spec"]["selector"]["matchLabels"]
            check(service["spec"]["selector"] == pod_labels, "the headless Service does not select the model server pods")
            check(service["spec"].get("publishNotReadyAddresses", False) is False, "the headless Service publishes unready pods")
            if "stream-processor" in configmaps and not values["streamProcessor"]["modelEndpoints"]:
                processor = tomllib.loads(configmaps["stream-processor"]["data"]["stream-processor.toml"])
                scheme = "https" if ms["security"]["tls"]["enabled"] else "http"
                want = [f"{scheme}://{service['metadata']['name']}:{ms['ports']['grpc']}"]
                check(processor["model"]["endpoints"] == want, f"processor model.endpoints {processor['model']['endpoints']} != {want}")
        check_model_server_security(values, workloads, configmaps, by_kind)

        files = configmaps["model-server"]["data"]
        rollouts = tomllib.loads(files["rollouts.toml"]).get("rollouts", [])
        check(len(rollouts) == len(ms["rollouts"]), f"rollouts.toml has {len(rollouts)} rollouts, the values {len(ms['rollouts'])}")
        for want, got in zip(ms["rollouts"], rollouts):
            for key in ("model", "stable", "canary", "canary_weight_percent", "shadow_percent"):
                if key in want:
                    check(numbers_equal(got.get(key), want[key]), f"rollouts.toml {want['model']}: {key} = {got.get(key)!r}, values say {want[key]!r}")
            check(("analysis" in got) == ("analysis" in want), f"rollouts.toml {want['model']}: analysis present differs from the values")
            for key, value in want.get("analysis", {}).items():
                check(numbers_equal(got.get("analysis", {}).get(key), value),
                      f"rollouts.toml {want['model']}: analysis.{key} = {got.get('analysis', {}).get(key)!r}, values say {value!r}")
            print(f"    rollout {got.get('model')}: stable {got.get('stable')} -> canary {got.get('canary')} at {got.get('canary_weight_percent', 0)}%"
                  f", shadow {got.get('shadow_percent', 0)}%, analysis {'on' if 'analysis' in got else 'off'}")
        for model in ms["models"]:
            check(f'name: "{model["name"]}"' in files["models.config"], f"models.config does not serve {model['name']}")

    # The other binaries' flags exist in their command lines.
    if "device-simulator" in workloads:
        check_simulator(values, workloads["device-simulator"], by_kind)
    # The Kafka services declare their own flags; the common ones (--config, --kafka-brokers,
    # --admin-listen, --print-config) are the shared scaffold's.
    common = (REPO / "shared/admin/src/service.rs").read_text()
    common = common[common.index("pub struct CommonFlags"):]
    common = common[:common.index("\n}\n")]
    for component in ("stream-processor", "alerts", "ingest"):
        if component in workloads:
            container = workloads[component]["spec"]["template"]["spec"]["containers"][0]
            source = (REPO / f"services/{component}/src/cli.rs").read_text() + common
            for flag in flag_args(container):
                check(re.search(rf"\b{flag.replace('-', '_')}: ", source) is not None,
                      f"{component}: --{flag} is not an argument in services/{component}/src/cli.rs or the common flags")

    # Kafka security in the rendered config files.
    protocol = {(True, True): "SASL_SSL", (True, False): "SASL_PLAINTEXT", (False, True): "SSL"}.get(
        (values["kafka"]["sasl"]["enabled"], values["kafka"]["tls"]["enabled"]))
    for component, key in (("stream-processor", "stream-processor.toml"), ("alerts", "alerts.toml"), ("ingest", "ingest.toml")):
        if component not in configmaps:
            continue
        config = tomllib.loads(configmaps[component]["data"][key])
        kafka = config["kafka"]
        check(kafka.get("bootstrap.servers") == values["kafka"]["brokers"], f"{key}: bootstrap.servers is not kafka.brokers")
        check(kafka.get("security.protocol") == (values["kafka"]["properties"].get("security.protocol") or protocol),
              f"{key}: security.protocol is {kafka.get('security.protocol')}, want {protocol}")
        check(all(isinstance(v, str) for v in kafka.values()), f"{key}: a librdkafka property is not a string")
        tls = values["kafka"]["tls"]
        if tls["enabled"] and tls["existingSecret"] and tls["caKey"]:
            check(kafka.get("ssl.ca.location") == f"/etc/vigil/kafka-tls/{tls['caKey']}", f"{key}: ssl.ca.location is not the mounted CA")
            mounts = workloads[component]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
            check(any(m["mountPath"] == "/etc/vigil/kafka-tls" for m in mounts), f"{component}: the Kafka TLS Secret is not mounted")

    if "alerts" in workloads:
        check_alerts(values, workloads["alerts"], configmaps.get("alerts"), by_kind)

    if "stream-processor" in workloads:
        check_processor_grpc(values, workloads["stream-processor"], configmaps["stream-processor"], by_kind)

    if "ingest" in workloads:
        check_ingest_devices(values, workloads["ingest"], configmaps["ingest"], by_kind)

    # NetworkPolicy: the processor may call the model server.
    if values["networkPolicy"]["enabled"] and "model-server" in workloads and "stream-processor" in workloads:
        policy = next((p for p in by_kind.get("NetworkPolicy", {}).values() if component_of(p) == "model-server"), None)
        if check(policy is not None, "networkPolicy.enabled but no model server NetworkPolicy"):
            processor_labels = workloads["stream-processor"]["spec"]["selector"]["matchLabels"]
            check(any(peer.get("podSelector", {}).get("matchLabels") == processor_labels
                      for rule in policy["spec"]["ingress"] for peer in rule.get("from", [])),
                  "the model server NetworkPolicy does not admit the stream processor")
    elif not values["networkPolicy"]["enabled"]:
        check("NetworkPolicy" not in by_kind, "networkPolicy.enabled is false but NetworkPolicies are rendered")

    # ServiceMonitors: one per component, naming a port of a Service they select.
    monitors = by_kind.get("ServiceMonitor", {})
    if values["serviceMonitor"]["enabled"]:
        check({component_of(m) for m in monitors.values()} == enabled, "not one ServiceMonitor per enabled component")
        for monitor in monitors.values():
            selector = monitor["spec"]["selector"]["matchLabels"]
            selected = [s for s in by_kind.get("Service", {}).values()
                        if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())]
            ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
            check(len(selected) == 1, f"ServiceMonitor {monitor['metadata']['name']} selects {len(selected)} Services, not 1")
            for endpoint in monitor["spec"]["endpoints"]:
                check(endpoint["port"] in ports, f"ServiceMonitor {monitor['metadata']['name']}: port {endpoint['port']} is not on its Service")
    else:
        check(not monitors, "serviceMonitor.enabled is false but ServiceMonitors are rendered")

    for failure in failures:
        print(f"{pathlib.Path(rendered_path).name}: {failure}", file=sys.stderr)
    if not failures:
        print(f"  {pathlib.Path(rendered_path).name}: {len(workloads)} Deployments and StatefulSets, their config files and Services are as the values ask")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
