#!/usr/bin/env python3
"""Static checks of deploy/: what can be verified without a Docker engine.

Usage (from anywhere; needs PyYAML, and jsonschema for --compose-schema):
    python3 deploy/check_deploy.py [--compose-schema compose-spec.json]

With PyPI's `dockerfile` package installed, every Dockerfile is also parsed by BuildKit's
own parser (which that package wraps).

Exit 0 when every check passes; otherwise each problem is printed and the exit status is 1.

Dockerfiles (deploy/docker/*.Dockerfile):
- every service Dockerfile's builder stage is the same text but for `ARG CRATE=<crate>`,
  the crate is a workspace member with a binary of that name, and its runtime stage copies
  that binary to /usr/local/bin/<crate>, runs as USER 65532:65532 and has it as ENTRYPOINT;
- every base image has an explicit tag and none is `latest`;
- .dockerignore keeps out nothing a Dockerfile copies or the workspace build needs.

Compose (deploy/compose/docker-compose.yml):
- the file validates against the Compose Specification JSON schema, when one is given;
- every `depends_on` names a service, every bind-mounted file and build context exists;
- every image is pinned (a tag that is not `latest`);
- every environment variable given to a Vigil service is one that service reads: the
  MODEL_SERVER_*/SIMULATOR_*/VIGIL_* names declared with clap `env = "..."`, and the
  INGEST_*/PROCESSOR_* names that map onto fields of the service's config structs (read
  from services/*/src/config.rs), plus OTEL_* (shared/telemetry) and RUST_LOG;
- every `host:port` the stack refers to (service environment, Prometheus targets, the
  Grafana data source, the Kafka Connect sink config) names a compose service and a port
  it publishes or, for Kafka, listens on.

Dashboard (deploy/grafana/dashboards/vigil.json):
- every metric it uses is declared in a services/*/src/metrics.rs (or is one of the
  process_* metrics shared/admin registers for every service), and every label it
  matches on or groups by is one of that metric's labels (the declarations are read from
  the Rust source; grafana/check_dashboard.py checks the same names against live scrapes).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"

SERVICE_DOCKERFILES = ["model-server", "stream-processor", "ingest", "device-simulator", "alerts", "vigil"]

# Which services are Vigil's, and how each reads its environment.
VIGIL_ENV = {
    "model-server": {"clap": ["services/model-server/src/config.rs"]},
    "device-simulator": {"clap": ["services/device-simulator/src/cli.rs"]},
    "vigil": {"clap": ["services/vigil/src/rollout.rs"]},
    "stream-processor": {
        "layered": ("PROCESSOR_", "services/stream-processor/src/config.rs", "ProcessorConfig",
                    {"kafka", "consumer", "producer"}),
        "clap": ["services/stream-processor/src/cli.rs"],
    },
    "ingest": {
        "layered": ("INGEST_", "services/ingest/src/config.rs", "IngestConfig", {"kafka"}),
        "clap": ["services/ingest/src/cli.rs"],
    },
    "alerts": {
        "layered": ("ALERTS_", "services/alerts/src/config.rs", "AlertsConfig", {"kafka"}),
        "clap": ["services/alerts/src/cli.rs"],
    },
}
ALWAYS_READ = re.compile(r"^(OTEL_[A-Z_]+|RUST_LOG)$")

problems: list[str] = []


def problem(text: str) -> None:
    problems.append(text)


# ------------------------------------------------------------------ Dockerfiles
def image_pinned(image: str) -> bool:
    image = image.split("@", 1)[0]
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest")


def builder_stage(text: str) -> str:
    start = text.index("ARG RUST_IMAGE=")
    end = text.index("# ---- runtime")
    return text[start:end]


def workspace_members() -> list[str]:
    cargo = (ROOT / "Cargo.toml").read_text()
    members = re.search(r"members\s*=\s*\[(.*?)\]", cargo, re.S)
    return re.findall(r'"([^"]+)"', members.group(1)) if members else []


def crate_has_binary(crate: str) -> bool:
    for member in workspace_members():
        manifest = ROOT / member / "Cargo.toml"
        if not manifest.is_file():
            continue
        text = manifest.read_text()
        name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M)
        if name and name.group(1) == crate:
            return (ROOT / member / "src" / "main.rs").is_file() or f'name = "{crate}"' in text.split("[[bin]]", 1)[-1]
    return False


def check_dockerfiles() -> None:
    reference = None
    for crate in SERVICE_DOCKERFILES:
        path = DEPLOY / "docker" / f"{crate}.Dockerfile"
        if not path.is_file():
            problem(f"{path.relative_to(ROOT)}: missing")
            continue
        text = path.read_text()
        rel = path.relative_to(ROOT)
        stage = builder_stage(text)
        if f"ARG CRATE={crate}\n" not in stage:
            problem(f"{rel}: the builder stage does not set ARG CRATE={crate}")
        normalised = stage.replace(f"ARG CRATE={crate}\n", "ARG CRATE=<crate>\n")
        if reference is None:
            reference = (rel, normalised)
        elif normalised != reference[1]:
            problem(f"{rel}: builder stage differs from {reference[0]}'s (keep them identical but for CRATE)")
        if not crate_has_binary(crate):
            problem(f"{rel}: no workspace member {crate!r} with a binary of that name")
        runtime = text[text.index("# ---- runtime"):]
        for needed in (f"COPY --from=builder /out/{crate} /usr/local/bin/{crate}\n",
                       "USER 65532:65532\n",
                       f'ENTRYPOINT ["/usr/local/bin/{crate}"]\n'):
            if needed not in runtime:
                problem(f"{rel}: runtime stage lacks `{needed.strip()}`")
    try:  # BuildKit's own Dockerfile parser, from PyPI's `dockerfile` package, when installed
        import dockerfile as buildkit_parser
    except ImportError:
        buildkit_parser = None
    for path in sorted((DEPLOY / "docker").glob("*.Dockerfile")) + [DEPLOY / "connect" / "Dockerfile"]:
        text = path.read_text()
        if buildkit_parser is not None:
            try:
                buildkit_parser.parse_string(text)
            except buildkit_parser.GoParseError as error:
                problem(f"{path.relative_to(ROOT)}: {error}")
        args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
        for image in re.findall(r"^FROM (\S+)", text, re.M):
            resolved = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
            if "${" in resolved or not image_pinned(resolved):
                problem(f"{path.relative_to(ROOT)}: base image {resolved} is not pinned to a tag")
        for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+) \S+$", text, re.M):
            if source != "." and not (ROOT / source).exists():
                problem(f"{path.relative_to(ROOT)}: COPY source {source} does not exist")


def check_dockerignore() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    needed = ["Cargo.toml", "Cargo.lock", "proto", "deploy/models/car-anomaly"] + workspace_members()
    for path in needed:
        for pattern in patterns:
            bare = pattern.lstrip("/")
            if bare.startswith("**/"):
                continue
            if path == bare or path.startswith(bare.rstrip("/") + "/"):
                problem(f".dockerignore: {pattern!r} excludes {path}, which the image builds need")


# ------------------------------------------------------------------ environment names
def clap_env_names(files: list[str]) -> set[str]:
    names = set()
    for file in files:
        names |= set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', (ROOT / file).read_text()))
    return names


def struct_fields(source: str) -> dict[str, dict[str, str]]:
    """{struct: {field: type}} of the `pub struct`s in a Rust file (enough for config structs)."""
    structs = {}
    for match in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", source, re.S):
        fields = dict(re.findall(r"^\s*pub (\w+):\s*([^,\n]+),", match.group(2), re.M))
        structs[match.group(1)] = fields
    return structs


def layered_env_ok(name: str, prefix: str, source_file: str, root: str, pass_through: set[str]) -> str | None:
    """None when `name` maps onto a config field, else why not."""
    structs = struct_fields((ROOT / source_file).read_text())
    path = name[len(prefix):].lower().split("__")
    struct = root
    for i, key in enumerate(path):
        fields = structs.get(struct)
        if fields is None:
            return f"{struct} has no fields to hold {'.'.join(path[i:])}"
        if key not in fields:
            return f"{struct} has no field {key!r}"
        if i == 0 and key in pass_through:
            return None if len(path) == 2 else f"{key} takes {prefix}{key.upper()}__<PROPERTY>"
        struct = re.sub(r"^(Option|Vec)<(.*)>$", r"\2", fields[key].strip())
    return None


def check_environment(services: dict) -> None:
    for service, how in VIGIL_ENV.items():
        definition = services.get(service)
        if definition is None:
            problem(f"compose: no service {service}")
            continue
        env = definition.get("environment") or {}
        allowed = clap_env_names(how.get("clap", []))
        for name in env:
            if name in allowed or ALWAYS_READ.match(name):
                continue
            layered = how.get("layered")
            if layered and name.startswith(layered[0]):
                why = layered_env_ok(name, *layered)
                if why is None:
                    continue
                problem(f"compose: {service}: {name}: {why} ({layered[1]})")
                continue
            problem(f"compose: {service}: {name} is read by nothing in the service")


# ------------------------------------------------------------------ compose
def published_ports(definition: dict) -> set[int]:
    ports = set()
    for entry in definition.get("ports", []) or []:
        text = str(entry["target"] if isinstance(entry, dict) else entry).split("/")[0]
        ports.add(int(text.rsplit(":", 1)[-1]))
    for entry in definition.get("expose", []) or []:
        ports.add(int(str(entry).split("/")[0]))
    return ports


def offered_addresses(services: dict) -> set[tuple[str, int]]:
    offered = {(name, port) for name, d in services.items() for port in published_ports(d)}
    for name, definition in services.items():
        env = definition.get("environment") or {}
        for listener in str(env.get("KAFKA_ADVERTISED_LISTENERS", "")).split(","):
            match = re.match(r"\w+://([\w.-]+):(\d+)$", listener.strip())
            if match and match.group(1) == name:
                offered.add((name, int(match.group(2))))
        # Kafka's own listeners (the controller's too), reachable on the compose network.
        for listener in str(env.get("KAFKA_LISTENERS", "")).split(","):
            match = re.match(r"\w+://[\w.-]*:(\d+)$", listener.strip())
            if match:
                offered.add((name, int(match.group(1))))
    return offered


ADDRESS = re.compile(r"(?:(?:https?|mqtts?|tcp)://)?([a-z][a-z0-9-]*):(\d{2,5})\b")


def check_references(text: str, where: str, services: dict, offered: set[tuple[str, int]]) -> None:
    for host, port in ADDRESS.findall(text):
        if host in ("localhost",):
            continue
        if host not in services:
            if host in ("http", "https", "mqtt", "tcp"):
                continue
            problem(f"{where}: {host}:{port} names no compose service")
        elif (host, int(port)) not in offered:
            problem(f"{where}: {host}:{port}: {host} publishes or listens on no port {port}")


def check_compose(schema_path: Path | None) -> None:
    data = yaml.safe_load(COMPOSE.read_text())
    if schema_path:
        import jsonschema

        schema = json.loads(schema_path.read_text())
        validator = jsonschema.Draft7Validator(schema)
        for error in sorted(validator.iter_errors(data), key=lambda e: list(e.path)):
            problem(f"compose schema: {'/'.join(map(str, error.path))}: {error.message}")
    services = data.get("services", {})
    base = COMPOSE.parent
    offered = offered_addresses(services)
    for name, definition in services.items():
        for dependency in definition.get("depends_on", {}) or {}:
            if dependency not in services:
                problem(f"compose: {name} depends on {dependency}, which is no service")
        image = definition.get("image")
        if image:
            resolved = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", image)
            if not image_pinned(resolved):
                problem(f"compose: {name}: image {image} is not pinned to a tag")
        build = definition.get("build")
        if build:
            context = base / (build if isinstance(build, str) else build.get("context", "."))
            if not context.is_dir():
                problem(f"compose: {name}: build context {context} does not exist")
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                problem(f"compose: {name}: Dockerfile {dockerfile} does not exist")
        for volume in definition.get("volumes", []) or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")) and not (base / source).exists():
                problem(f"compose: {name}: mounted {source} does not exist")
        env = definition.get("environment") or {}
        for key, value in env.items():
            check_references(str(value), f"compose: {name}: {key}", services, offered)
        command = definition.get("command")
        if command:
            check_references(" ".join(command) if isinstance(command, list) else str(command),
                             f"compose: {name}: command", services, offered)
    check_environment(services)
    prometheus = yaml.safe_load((base / "prometheus" / "prometheus.yml").read_text())
    for job in prometheus.get("scrape_configs", []):
        for static in job.get("static_configs", []):
            for target in static.get("targets", []):
                check_references(target, f"prometheus.yml: {job['job_name']}", services, offered)
    datasources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    for source in datasources.get("datasources", []):
        check_references(source.get("url", ""), "grafana datasource", services, offered)
    sink = json.loads((DEPLOY / "connect" / "elasticsearch-sink.json").read_text())
    check_references(sink.get("connection.url", ""), "elasticsearch-sink.json", services, offered)
    topics = set(re.findall(r"^create ([\w.-]+) ", (base / "kafka" / "create-topics.sh").read_text(), re.M))
    for topic in sink.get("topics", "").split(","):
        if topic and topic not in topics:
            problem(f"elasticsearch-sink.json: topic {topic} is not created by kafka/create-topics.sh")
    dlq = sink.get("errors.deadletterqueue.topic.name")
    if dlq and dlq not in topics:
        problem(f"elasticsearch-sink.json: dead-letter topic {dlq} is not created by kafka/create-topics.sh")
    for source_file, constants in (("services/ingest/src/config.rs", ("DEFAULT_READINGS_TOPIC", "DEFAULT_DEAD_LETTER_TOPIC")),
                                   ("services/stream-processor/src/config.rs",
                                    ("DEFAULT_SCORES_TOPIC", "DEFAULT_ANOMALIES_TOPIC", "DEFAULT_DEAD_LETTER_TOPIC"))):
        text = (ROOT / source_file).read_text()
        for constant in constants:
            match = re.search(rf'{constant}: &str = "([^"]+)"', text)
            if not match:
                problem(f"{source_file}: no {constant}")
            elif match.group(1) not in topics:
                problem(f"kafka/create-topics.sh does not create {match.group(1)} ({constant} in {source_file})")
    model_server = (ROOT / "services/model-server/src/config.rs").read_text()
    for flag in ("rollout_state_topic", "rollout_events_topic"):
        match = re.search(rf'long = "{flag}".*?default_value = "([^"]+)"', model_server, re.S)
        if not match or match.group(1) not in topics:
            problem(f"kafka/create-topics.sh does not create the model server's default --{flag}")


# ------------------------------------------------------------------ dashboard
TARGET_LABELS = {"job", "instance", "service"}  # added by Prometheus / prometheus.yml


def call_arguments(text: str, open_paren: int) -> list[str]:
    """The top-level, comma-separated arguments of the call whose "(" is at `open_paren`."""
    depth, start, args = 0, open_paren + 1, []
    for i in range(open_paren, len(text)):
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                args.append(text[start:i])
                return [a.strip() for a in args if a.strip()]
        elif ch == "," and depth == 1:
            args.append(text[start:i])
            start = i + 1
    return args


# The process collector shared/admin registers in every service's registry
# (admin::register_process_metrics, prometheus' ProcessCollector): no labels of their own.
PROCESS_METRICS = ("process_cpu_seconds_total", "process_open_fds", "process_max_fds",
                   "process_virtual_memory_bytes", "process_resident_memory_bytes",
                   "process_start_time_seconds", "process_threads")


def declared_metrics() -> dict[str, set[str]]:
    """{metric family: label names} from every services/*/src/metrics.rs, and the process
    metrics shared/admin registers for every service."""
    declared = {}
    if "ProcessCollector::for_self()" in (ROOT / "shared/admin/src/lib.rs").read_text():
        declared.update({name: set() for name in PROCESS_METRICS})
    for path in sorted(ROOT.glob("services/*/src/metrics.rs")):
        source = path.read_text()
        # prometheus' constructors (`IntCounterVec::new(...)`), or shared/admin's
        # MetricsRegistrar, which makes and registers in one call (`metrics.counter_vec(...)`).
        for match in re.finditer(r"\b(\w+)::(new|with_opts)\(|\.(counter|counter_vec|gauge|gauge_vec|float_gauge|"
                                 r"float_gauge_vec|histogram|histogram_vec)\(", source):
            kind = match.group(1) or match.group(3)
            if kind not in ("IntCounter", "IntGauge", "Gauge", "Counter", "Histogram", "IntCounterVec",
                            "IntGaugeVec", "GaugeVec", "CounterVec", "HistogramVec", "counter", "counter_vec",
                            "gauge", "gauge_vec", "float_gauge", "float_gauge_vec", "histogram", "histogram_vec"):
                continue
            args = call_arguments(source, match.end() - 1)
            if not args:
                continue
            name = re.search(r'"([a-zA-Z_:][a-zA-Z0-9_:]*)"', args[0])
            if not name:
                continue
            labels = set()
            if kind.endswith(("Vec", "_vec")) and len(args) >= 2:
                label_arg = args[-1]
                if not label_arg.startswith("&["):  # a `let labels = &[...]` defined earlier
                    bound = re.search(rf"let {re.escape(label_arg)}\s*=\s*(&\[[^\]]*\])", source)
                    label_arg = bound.group(1) if bound else ""
                labels = set(re.findall(r'"(\w+)"', label_arg))
            declared[name.group(1)] = labels
    return declared


def check_dashboard() -> None:
    sys.path.insert(0, str(DEPLOY / "grafana"))
    import check_dashboard as dash

    path = DEPLOY / "grafana" / "dashboards" / "vigil.json"
    dashboard = json.loads(path.read_text())
    declared = declared_metrics()
    if not declared:
        problem("no metric declarations found in services/*/src/metrics.rs")
        return
    where = path.relative_to(ROOT)
    for name in sorted(dash.dashboard_metrics(dashboard)):
        if dash.family(name) not in declared:
            problem(f"{where}: {name} is declared in no services/*/src/metrics.rs (nor is it a process metric of shared/admin)")
    exprs, queries = dash.dashboard_expressions(dashboard)
    for expr in exprs + queries:
        text = re.sub(r"\$\{[^}]*\}|\$\w+", "X", expr)
        text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
        for selector in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", text):
            name = dash.family(selector.group(1))
            if name not in declared:
                continue
            allowed = declared[name] | TARGET_LABELS | ({"le"} if selector.group(1).endswith("_bucket") else set())
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector.group(2)):
                if label not in allowed:
                    problem(f"{where}: {selector.group(1)} has no label {label!r} ({expr})")
        for grouping in re.finditer(r"\bby\s*\(([^)]*)\)\s*\(", text):
            labels = {label.strip() for label in grouping.group(1).split(",") if label.strip()}
            inner_args = call_arguments(text, grouping.end() - 1)
            inner = inner_args[-1] if inner_args else ""
            names = {dash.family(n) for n in dash.metrics_in_promql(inner)} & set(declared)
            if not names:
                continue
            allowed = set().union(*(declared[n] for n in names)) | TARGET_LABELS
            if any(n.endswith("_bucket") for n in dash.metrics_in_promql(inner)):
                allowed.add("le")
            for label in labels - allowed:
                problem(f"{where}: grouping by {label!r}, which none of {sorted(names)} has ({expr})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compose-schema", type=Path, help="the Compose Specification's compose-spec.json")
    args = parser.parse_args(argv)
    check_dockerfiles()
    check_dockerignore()
    check_compose(args.compose_schema)
    check_dashboard()
    for text in problems:
        print(text)
    print(f"deploy checks: {len(problems)} problem(s)" if problems else "deploy checks: all passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
