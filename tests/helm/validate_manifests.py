"""Validates every manifest `helm template` rendered against the Kubernetes API schemas.

Usage: validate_manifests.py KUBERNETES_VERSION RENDERED.yaml...

Each document is checked with kubernetes-validate in strict mode (unknown fields are
errors) for the given Kubernetes version. ServiceMonitor (a Prometheus Operator CRD) and
Certificate (cert-manager's) have no Kubernetes schema: they are checked against
tests/helm/schemas/servicemonitor-v1.json and certificate-v1.json instead, and the output
says so for each one. Any other kind without a schema fails: no
document is skipped.
"""

import json
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).resolve().parent
# Kinds that are not in the Kubernetes API schemas, and the schema each is checked against.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): HERE / "schemas" / "servicemonitor-v1.json",
    ("cert-manager.io/v1", "Certificate"): HERE / "schemas" / "certificate-v1.json",
}


def main() -> int:
    version, files = sys.argv[1], sys.argv[2:]
    failures = 0
    for path in files:
        documents = [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]
        if not documents:
            print(f"{path}: no documents rendered", file=sys.stderr)
            failures += 1
        counts: dict[str, int] = {}
        for doc in documents:
            kind, api, name = doc.get("kind"), doc.get("apiVersion"), doc.get("metadata", {}).get("name")
            what = f"{pathlib.Path(path).name}: {kind} {name}"
            crd = CRD_SCHEMAS.get((api, kind))
            try:
                if crd is not None:
                    jsonschema.Draft7Validator(json.loads(crd.read_text())).validate(doc)
                    print(f"    {kind} {name}: a CRD, not in the Kubernetes schemas; valid against {crd.relative_to(HERE.parent.parent)}")
                else:
                    kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                print(f"{what}: no schema for {api} {kind} in Kubernetes {version}, and no CRD schema here", file=sys.stderr)
                failures += 1
                continue
            except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as error:
                cause = getattr(error, "caused_by", error)
                where = getattr(cause, "json_path", "")
                print(f"{what}: INVALID at {where}: {str(error).splitlines()[0]}", file=sys.stderr)
                failures += 1
                continue
            counts[kind] = counts.get(kind, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        print(f"  {pathlib.Path(path).name}: {sum(counts.values())} valid against Kubernetes {version} ({summary})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
