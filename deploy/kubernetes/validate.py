#!/usr/bin/env python3
"""Validates the clipserve Kubernetes manifests offline.

Every YAML document of every manifest is checked against the Kubernetes OpenAPI schemas for one fixed
Kubernetes version, in strict mode (unknown fields are errors, so a misspelt `readinesProbe` fails). The schemas
ship inside the kubernetes-validate package (pinned in deploy/requirements.txt); nothing is fetched.

On top of the schemas, the manifests are checked against each other: every object carries the label
app.kubernetes.io/name=clipserve, the Services and the PodDisruptionBudget select the Deployment's pods, the
HorizontalPodAutoscaler targets that Deployment, probes and Service target ports name ports the container
declares, and a directory's kustomization.yaml lists exactly the manifests beside it. The bulk-embedding Job
(bulk/embed-job.yaml) is checked against the serving manifests: it is Indexed and `--shard $(JOB_COMPLETION_INDEX)/N`
splits the input in exactly `completions` parts, its `--server` names the headless gRPC Service and one of its
ports, no Service or PodDisruptionBudget selects its pods, and every $(VAR) in its arguments is declared.

cert-manager objects (cert-manager.io/v1 Certificate, Issuer, ClusterIssuer: custom resources, absent from the
Kubernetes schemas) are checked by hand: their required fields, and that each Certificate's issuer is defined
beside it. A kustomization's JSON 6902 patches (the TLS overlay, tls/) are applied to the objects of the
directories it builds on, and the patched objects go through the same schema and consistency checks; a Deployment
serving TLS must read its files from a mounted Secret that a Certificate here writes, and its probes must reach
the plaintext health port (kubelet probes present no client certificate, and its gRPC probes speak no TLS).

    .venv/bin/python deploy/kubernetes/validate.py                 # the manifests beside this script and
                                                                   # in its subfolders (bulk/)
    .venv/bin/python deploy/kubernetes/validate.py FILE_OR_DIR...  # others (a directory: its *.yaml, *.yml)

Exit status 0 when everything passes, 1 when anything fails (each problem is printed), 2 on a usage error.
kustomization.yaml is not a Kubernetes API object: it is not schema-checked, only compared with its directory.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

KUBERNETES_VERSION = "1.30"
APP_LABEL = ("app.kubernetes.io/name", "clipserve")
KUSTOMIZATION_NAMES = {"kustomization.yaml", "kustomization.yml", "Kustomization"}
HERE = Path(__file__).resolve().parent


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def manifest_files(paths: list[Path], problems: Problems) -> tuple[list[Path], list[Path]]:
    """(manifests, kustomization files) named by `paths`; a directory contributes its *.yaml and *.yml files."""
    manifests: list[Path] = []
    kustomizations: list[Path] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml"))
            if not files:
                problems.add(str(path), "no *.yaml or *.yml files in this directory")
        elif path.is_file():
            files = [path]
        else:
            problems.add(str(path), "no such file or directory")
            continue
        for f in files:
            (kustomizations if f.name in KUSTOMIZATION_NAMES else manifests).append(f)
    return manifests, kustomizations


def load_documents(path: Path, problems: Problems) -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        problems.add(str(path), f"cannot be read as YAML: {e}")
        return []
    if not docs:
        problems.add(str(path), "holds no Kubernetes object")
    good = []
    for i, doc in enumerate(docs):
        where = f"{path} (document {i + 1})"
        if not isinstance(doc, dict):
            problems.add(where, f"is a {type(doc).__name__}, not a Kubernetes object")
        elif not isinstance(doc.get("apiVersion"), str) or not isinstance(doc.get("kind"), str):
            problems.add(where, "has no apiVersion and kind")
        elif not isinstance(doc.get("metadata"), dict) or not doc["metadata"].get("name"):
            problems.add(where, "has no metadata.name")
        else:
            good.append(doc)
    return good


def describe(path: Path, doc: dict[str, Any]) -> str:
    return f"{path}: {doc['kind']}/{doc['metadata']['name']}"


def all_schema_errors(doc: dict[str, Any], version: str, first: Exception) -> list[str]:
    """Every schema error of `doc`, not only the first one that kubernetes_validate.validate raises. Uses the same
    packaged schema files as that function; falls back to the first error if their layout is not the expected one."""
    try:
        import jsonschema
        from kubernetes_validate import utils
        from referencing import Registry, Resource

        full = [v for v in utils.all_versions() if utils.major_minor(v) <= utils.major_minor(version)][-1]
        folder = f"kubernetes-json-schema/v{full}-local-strict"
        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
        schema = utils.schema_contents(f"{folder}/{doc['kind'].lower()}-{group_version}.json", version)
        definitions = utils.schema_contents(f"{folder}/_definitions.json", version)
        registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
        validator = jsonschema.validators.Draft202012Validator(schema, registry=registry)
        errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.path])
        found = [f"at {'.'.join(str(p) for p in e.path) or '(top level)'}: {e.message}" for e in errors]
        if found:
            return found
    except Exception:  # only the detail of the report depends on this
        pass
    at = ".".join(str(p) for p in getattr(first, "path", [])) or "(top level)"
    return [f"at {at}: {getattr(first, 'message', first)}"]


def schema_check(path: Path, doc: dict[str, Any], version: str, problems: Problems) -> bool:
    import kubernetes_validate
    from kubernetes_validate import utils

    try:
        kubernetes_validate.validate(doc, version, strict=True)
        return True
    except utils.ValidationError as e:
        for error in all_schema_errors(doc, version, e):
            problems.add(describe(path, doc), f"does not match the Kubernetes {version} schema {error}")
    except utils.SchemaNotFoundError as e:
        problems.add(describe(path, doc), f"unknown to Kubernetes {version}: {e.message}")
    except utils.VersionNotSupportedError:
        raise SystemExit(f"kubernetes-validate {utils.__version__} has no schemas for Kubernetes {version}")
    return False


CERT_MANAGER = "cert-manager.io/v1"
CERT_MANAGER_KINDS = {"Certificate", "Issuer", "ClusterIssuer"}
ISSUER_TYPES = ("selfSigned", "ca", "acme", "vault", "venafi")


def is_cert_manager(doc: dict[str, Any]) -> bool:
    return doc.get("apiVersion") == CERT_MANAGER and doc.get("kind") in CERT_MANAGER_KINDS


def cert_manager_check(path: Path, doc: dict[str, Any], problems: Problems) -> bool:
    """The fields cert-manager requires of a Certificate, Issuer or ClusterIssuer (by hand: no schema here)."""
    where = describe(path, doc)
    spec = doc.get("spec")
    before = len(problems.items)
    if not isinstance(spec, dict):
        problems.add(where, "has no spec")
        return False
    if doc["kind"] == "Certificate":
        if not isinstance(spec.get("secretName"), str) or not spec["secretName"]:
            problems.add(where, "spec.secretName (the Secret cert-manager writes) is missing")
        ref = spec.get("issuerRef")
        if not isinstance(ref, dict) or not ref.get("name"):
            problems.add(where, "spec.issuerRef.name is missing")
        elif ref.get("kind", "Issuer") not in ("Issuer", "ClusterIssuer") or ref.get("group", "cert-manager.io") != "cert-manager.io":
            problems.add(where, f"spec.issuerRef {ref} is not a cert-manager Issuer or ClusterIssuer")
        names = [spec.get("commonName")] + list(spec.get("dnsNames") or []) + list(spec.get("ipAddresses") or [])
        if not any(names) and not spec.get("uris") and not spec.get("emailAddresses"):
            problems.add(where, "names no subject (commonName, dnsNames, ipAddresses, uris or emailAddresses)")
        for field in ("duration", "renewBefore"):
            if field in spec and not re.fullmatch(r"(\d+(\.\d+)?(h|m|s|ms))+", str(spec[field])):
                problems.add(where, f"spec.{field} {spec[field]!r} is not a Go duration such as 2160h")
        usages = spec.get("usages") or []
        known = {"digital signature", "key encipherment", "server auth", "client auth", "cert sign", "crl sign",
                 "signing", "content commitment", "key agreement", "data encipherment", "encipher only",
                 "decipher only", "any", "code signing", "email protection", "s/mime", "ipsec end system",
                 "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}
        for usage in usages:
            if usage not in known:
                problems.add(where, f"spec.usages: {usage!r} is not a cert-manager key usage")
        key = spec.get("privateKey") or {}
        if key.get("algorithm", "RSA") not in ("RSA", "ECDSA", "Ed25519"):
            problems.add(where, f"spec.privateKey.algorithm {key.get('algorithm')!r} is not RSA, ECDSA or Ed25519")
        if key.get("rotationPolicy", "Never") not in ("Never", "Always"):
            problems.add(where, f"spec.privateKey.rotationPolicy {key.get('rotationPolicy')!r} is not Never or Always")
    else:
        types = [t for t in ISSUER_TYPES if t in spec]
        if len(types) != 1:
            problems.add(where, f"needs exactly one issuer type of {', '.join(ISSUER_TYPES)} (has {types or 'none'})")
        elif types == ["ca"] and not (spec["ca"] or {}).get("secretName"):
            problems.add(where, "spec.ca.secretName (the CA's Secret) is missing")
    return len(problems.items) == before


def check_certificates(objects: list[tuple[Path, dict[str, Any]]], problems: Problems) -> None:
    """Every Certificate's issuer is defined among the objects, and a CA Issuer's Secret is written by one."""
    issuers = {(d["kind"], d["metadata"]["name"]): d for _, d in objects if is_cert_manager(d) and d["kind"] != "Certificate"}
    secrets = {d["spec"]["secretName"] for _, d in objects if is_cert_manager(d) and d["kind"] == "Certificate"}
    for path, doc in objects:
        if not is_cert_manager(doc):
            continue
        if doc["kind"] == "Certificate":
            ref = doc["spec"]["issuerRef"]
            if (ref.get("kind", "Issuer"), ref["name"]) not in issuers:
                problems.add(describe(path, doc), f"its issuer {ref.get('kind', 'Issuer')}/{ref['name']} is not defined here")
        elif "ca" in doc["spec"] and doc["spec"]["ca"]["secretName"] not in secrets:
            problems.add(describe(path, doc), f"its CA Secret {doc['spec']['ca']['secretName']} is written by no Certificate here")


def json_pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not a JSON pointer")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def apply_json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 add, replace, remove and test, as kustomize applies them; raises ValueError on a failed op."""
    import copy

    doc = copy.deepcopy(doc)
    for op in ops:
        parts = json_pointer(op["path"])
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(index, op["value"])
            elif kind == "replace":
                parent[index] = op["value"]
            elif kind == "remove":
                del parent[index]
            elif kind == "test":
                if parent[index] != op["value"]:
                    raise ValueError(f"test failed at {op['path']}")
            else:
                raise ValueError(f"unsupported op {kind!r}")
        else:
            if kind in ("replace", "remove", "test") and last not in parent:
                raise ValueError(f"{op['path']} does not exist (op {kind})")
            if kind in ("add", "replace"):
                parent[last] = op["value"]
            elif kind == "remove":
                del parent[last]
            elif kind == "test":
                if parent[last] != op["value"]:
                    raise ValueError(f"test failed at {op['path']}")
            else:
                raise ValueError(f"unsupported op {kind!r}")
    return doc


def target_matches(target: dict[str, Any], doc: dict[str, Any]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return (
        target.get("kind", doc["kind"]) == doc["kind"]
        and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def env_value(container: dict[str, Any], name: str) -> str | None:
    for e in container.get("env") or []:
        if e.get("name") == name:
            return e.get("value")
    return None


def check_tls(path: Path, deployment: dict[str, Any], certificates: set[str], problems: Problems) -> None:
    """A Deployment serving TLS reads its files from a mounted Secret written by a Certificate, and its probes
    reach the plaintext health port."""
    where = describe(path, deployment)
    pod = deployment["spec"]["template"]["spec"]
    secret_volumes = {v["name"]: v["secret"].get("secretName") for v in pod.get("volumes") or [] if "secret" in v}
    for c in pod["containers"]:
        cert = env_value(c, "CLIPSERVE_TLS_CERT")
        if cert is None:
            continue
        for var in ("CLIPSERVE_TLS_CERT", "CLIPSERVE_TLS_KEY", "CLIPSERVE_TLS_CLIENT_CA"):
            file = env_value(c, var)
            if file is None:
                if var == "CLIPSERVE_TLS_KEY":
                    problems.add(where, "CLIPSERVE_TLS_CERT without CLIPSERVE_TLS_KEY")
                continue
            mounts = [m for m in c.get("volumeMounts") or [] if file.startswith(m["mountPath"].rstrip("/") + "/")]
            secret = next((secret_volumes.get(m["name"]) for m in mounts if m["name"] in secret_volumes), None)
            if secret is None:
                problems.add(where, f"{var}={file} is not in a mounted Secret volume")
            elif secret not in certificates:
                problems.add(where, f"{var}={file}: Secret {secret} is written by no Certificate here")
            elif file.rsplit("/", 1)[-1] not in ("tls.crt", "tls.key", "ca.crt"):
                problems.add(where, f"{var}={file}: cert-manager Secrets hold tls.crt, tls.key and ca.crt")
        health = env_value(c, "CLIPSERVE_HEALTH_ADDR")
        health_port = int(health.rsplit(":", 1)[1]) if health else None
        named = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(probe_name) or {}
            if "grpc" in probe:
                problems.add(where, f"{c['name']}.{probe_name} is a gRPC probe, which speaks no TLS")
            if "httpGet" in probe:
                port = probe["httpGet"]["port"]
                port = named.get(port, port)
                if port != health_port and env_value(c, "CLIPSERVE_TLS_CLIENT_CA") is not None:
                    problems.add(where, f"{c['name']}.{probe_name} asks port {port}, not the plaintext health port "
                                        "(mutual TLS refuses the kubelet, which has no client certificate)")
                elif port != health_port and probe["httpGet"].get("scheme", "HTTP") != "HTTPS":
                    problems.add(where, f"{c['name']}.{probe_name} asks plain HTTP of a TLS port")


def labels_match(selector: dict[str, Any] | None, labels: dict[str, Any]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_template_labels(deployment: dict[str, Any]) -> dict[str, Any]:
    return (deployment["spec"]["template"].get("metadata") or {}).get("labels") or {}


def container_ports(deployment: dict[str, Any]) -> tuple[set[str], set[int]]:
    names: set[str] = set()
    numbers: set[int] = set()
    for c in deployment["spec"]["template"]["spec"].get("containers", []):
        for p in c.get("ports", []):
            numbers.add(p["containerPort"])
            if "name" in p:
                names.add(p["name"])
    return names, numbers


def port_declared(port: Any, ports: tuple[set[str], set[int]]) -> bool:
    return port in ports[0] if isinstance(port, str) else port in ports[1]


def cross_check(objects: list[tuple[Path, dict[str, Any]]], problems: Problems) -> None:
    key, value = APP_LABEL
    for path, doc in objects:
        if (doc["metadata"].get("labels") or {}).get(key) != value:
            problems.add(describe(path, doc), f"lacks the label {key}: {value}")

    deployments = [(p, d) for p, d in objects if d["kind"] == "Deployment"]
    for path, d in deployments:
        pod_labels = pod_template_labels(d)
        if pod_labels.get(key) != value:
            problems.add(describe(path, d), f"pod template lacks the label {key}: {value}")
        if not labels_match(d["spec"]["selector"].get("matchLabels"), pod_labels):
            problems.add(describe(path, d), "selector.matchLabels does not match the pod template labels")
        ports = container_ports(d)
        for c in d["spec"]["template"]["spec"]["containers"]:
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_name) or {}
                for handler in ("grpc", "httpGet", "tcpSocket"):
                    if handler in probe and not port_declared(probe[handler]["port"], ports):
                        problems.add(
                            describe(path, d),
                            f"{c['name']}.{probe_name}.{handler}.port {probe[handler]['port']!r} is not a declared port",
                        )
    if not deployments:
        return
    pod_label_sets = [pod_template_labels(d) for _, d in deployments]
    names = {d["metadata"]["name"] for _, d in deployments}

    for path, doc in objects:
        kind, spec = doc["kind"], doc.get("spec") or {}
        if kind == "Service":
            selected = [i for i, labels in enumerate(pod_label_sets) if labels_match(spec.get("selector"), labels)]
            if not selected:
                problems.add(describe(path, doc), "selector matches no Deployment's pods")
            for port in spec.get("ports", []):
                target = port.get("targetPort", port.get("port"))
                if selected and not any(port_declared(target, container_ports(deployments[i][1])) for i in selected):
                    problems.add(describe(path, doc), f"targetPort {target!r} is not a port of the selected pods")
        elif kind == "PodDisruptionBudget":
            match = (spec.get("selector") or {}).get("matchLabels")
            if not any(labels_match(match, labels) for labels in pod_label_sets):
                problems.add(describe(path, doc), "selector matches no Deployment's pods")
        elif kind == "HorizontalPodAutoscaler":
            ref = spec.get("scaleTargetRef") or {}
            if ref.get("kind") != "Deployment" or ref.get("name") not in names:
                problems.add(describe(path, doc), f"scaleTargetRef {ref} names no Deployment here")


def shard_count(arg: str) -> str | None:
    """The N of a `--shard I/N` argument (None when the argument is not --shard)."""
    if arg.startswith("--shard="):
        return arg.split("=", 1)[1]
    return None


def check_jobs(objects: list[tuple[Path, dict[str, Any]]], problems: Problems) -> None:
    """Jobs that run `clipserve embed`: their split of the input and the servers they send to."""
    services = {d["metadata"]["name"]: d for _, d in objects if d["kind"] == "Service"}
    selectors = [
        (describe(p, d), d["spec"].get("selector"))
        for p, d in objects
        if d["kind"] == "Service"
    ] + [
        (describe(p, d), (d["spec"].get("selector") or {}).get("matchLabels"))
        for p, d in objects
        if d["kind"] in ("PodDisruptionBudget", "Deployment")
    ]
    for path, job in ((p, d) for p, d in objects if d["kind"] == "Job"):
        spec = job["spec"]
        pod = spec["template"]
        labels = (pod.get("metadata") or {}).get("labels") or {}
        for who, selector in selectors:
            if labels_match(selector, labels):
                problems.add(describe(path, job), f"its pods are selected by {who} (they would be taken for servers)")
        if spec.get("backoffLimitPerIndex") is not None and pod["spec"].get("restartPolicy") != "Never":
            problems.add(describe(path, job), "backoffLimitPerIndex needs restartPolicy: Never")
        for c in pod["spec"]["containers"]:
            where = f"{describe(path, job)} container {c['name']}"
            declared = {e["name"] for e in c.get("env") or []}
            args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
            for a in args:
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                    if var not in declared:
                        problems.add(where, f"{a!r} uses $({var}), which the container does not declare in env")
            shard = next((shard_count(a) for a in args if shard_count(a) is not None), None)
            if shard is not None:
                m = re.fullmatch(r"\$\(JOB_COMPLETION_INDEX\)/(\d+)", shard)
                if spec.get("completionMode") != "Indexed":
                    problems.add(where, "--shard needs completionMode: Indexed (an index per pod)")
                if not m:
                    problems.add(where, f"--shard={shard}: expected $(JOB_COMPLETION_INDEX)/N")
                elif int(m.group(1)) != spec.get("completions"):
                    problems.add(
                        where,
                        f"--shard={shard} splits the input in {m.group(1)} parts but the Job has "
                        f"completions: {spec.get('completions')} (parts would be skipped or run twice)",
                    )
            for a in args:
                if not a.startswith("--server="):
                    continue
                for server in a.split("=", 1)[1].split(","):
                    m = re.fullmatch(r"https?://([^/:]+):(\d+)/?", server)
                    if not m:
                        problems.add(where, f"--server {server!r}: expected http://SERVICE:PORT")
                        continue
                    name, port = m.group(1).split(".")[0], int(m.group(2))
                    service = services.get(name)
                    if service is None:
                        problems.add(where, f"--server {server!r} names no Service here")
                    elif service["spec"].get("clusterIP") != "None":
                        problems.add(where, f"--server {server!r}: Service/{name} is not headless (one pod per connection)")
                    elif port not in [p.get("port") for p in service["spec"].get("ports", [])]:
                        problems.add(where, f"--server {server!r}: Service/{name} has no port {port}")


def check_kustomization(path: Path, version: str, problems: Problems, quiet: bool) -> None:
    try:
        k = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        problems.add(str(path), f"cannot be read as YAML: {e}")
        return
    listed = k.get("resources") or []
    for r in listed:
        if not (path.parent / r).exists():
            problems.add(str(path), f"lists {r}, which does not exist")
    beside = {p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml") and p.name not in KUSTOMIZATION_NAMES}
    for name in sorted(beside - {r.rstrip("/") for r in listed}):
        problems.add(str(path), f"does not list {name}")
    patches = k.get("patches") or []
    if not patches:
        return
    # An overlay: the objects it builds (its resources, directories included), patched, checked again.
    built: list[tuple[Path, dict[str, Any]]] = []
    for r in listed:
        source = path.parent / r
        files = sorted(f for f in source.iterdir() if f.suffix in (".yaml", ".yml") and f.name not in KUSTOMIZATION_NAMES) if source.is_dir() else [source]
        for f in files:
            # Read again (problems in them are reported where they are checked on their own).
            built += [(f, d) for d in load_documents(f, Problems())]
    for patch in patches:
        file = patch.get("path")
        target = patch.get("target") or {}
        if not file or not target:
            problems.add(str(path), f"patch {patch}: only JSON 6902 patches (a path and a target) are checked here")
            continue
        try:
            ops = yaml.safe_load((path.parent / file).read_text())
        except (OSError, yaml.YAMLError) as e:
            problems.add(str(path), f"patch {file} cannot be read: {e}")
            continue
        matched = 0
        for i, (p, d) in enumerate(built):
            if target_matches(target, d):
                matched += 1
                try:
                    built[i] = (p, apply_json_patch(d, ops))
                except (KeyError, IndexError, ValueError, TypeError) as e:
                    problems.add(str(path), f"patch {file} does not apply to {d['kind']}/{d['metadata']['name']}: {e!r}")
        if not matched:
            problems.add(str(path), f"patch {file}: its target {target} matches nothing the overlay builds")
    where = path.parent / "(built)"
    valid = []
    for p, d in built:
        # cert-manager objects were reported where they are checked on their own.
        if cert_manager_check(p, d, Problems()) if is_cert_manager(d) else schema_check(where, d, version, problems):
            valid.append((where if p.parent != path.parent else p, d))
    cross_check(valid, problems)
    check_certificates(valid, problems)
    certificates = {d["spec"]["secretName"] for _, d in valid if is_cert_manager(d) and d["kind"] == "Certificate"}
    for p, d in valid:
        if d["kind"] == "Deployment":
            check_tls(p, d, certificates, problems)
    if not quiet:
        print(f"ok   {path}: {len(valid)} objects built with {len(patches)} patch(es), checked again")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "paths", nargs="*", type=Path, help=f"manifest files or directories (default: {HERE} and its subfolders)"
    )
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION, help="default: %(default)s")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only problems and the summary")
    args = parser.parse_args()

    problems = Problems()
    default = [HERE] + sorted(d for d in HERE.iterdir() if d.is_dir() and any(d.glob("*.yaml")))
    manifests, kustomizations = manifest_files(args.paths or default, problems)
    objects: list[tuple[Path, dict[str, Any]]] = []
    for path in manifests:
        for doc in load_documents(path, problems):
            if is_cert_manager(doc):
                if cert_manager_check(path, doc, problems):
                    objects.append((path, doc))
                    if not args.quiet:
                        print(f"ok   {describe(path, doc)} (cert-manager fields, by hand)")
            elif schema_check(path, doc, args.kubernetes_version, problems):
                # Only schema-valid objects are compared with each other: their required fields are there.
                objects.append((path, doc))
                if not args.quiet:
                    print(f"ok   {describe(path, doc)} (Kubernetes {args.kubernetes_version} schema, strict)")
    cross_check(objects, problems)
    check_jobs(objects, problems)
    check_certificates(objects, problems)
    certificates = {d["spec"]["secretName"] for _, d in objects if is_cert_manager(d) and d["kind"] == "Certificate"}
    for path, doc in objects:
        if doc["kind"] == "Deployment":
            check_tls(path, doc, certificates, problems)
    for k in kustomizations:
        check_kustomization(k, args.kubernetes_version, problems, args.quiet)
        if not args.quiet:
            print(f"ok   {k}: kustomization (not a Kubernetes object; its resources were compared with its folder)")

    for p in problems.items:
        print(f"FAIL {p}", file=sys.stderr)
    if problems.items:
        print(f"{len(problems.items)} problem(s) in the manifests", file=sys.stderr)
        return 1
    print(f"{len(objects)} objects in {len(manifests)} files valid for Kubernetes {args.kubernetes_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
