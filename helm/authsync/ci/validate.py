#!/usr/bin/env python3
"""Offline checks of the authsync chart, without a cluster or a `helm` binary.

Needs `pip install helm-python-sdk==0.2.2 pyyaml` (helm-python-sdk bundles Helm's Go SDK,
v4, as a shared library: it renders and lints like `helm template` / `helm lint`) and an
authsync binary (AUTHSYNC_BIN, default target/debug/authsync) to load the rendered config.

    python3 helm/authsync/ci/validate.py

Checks: helm lint (strict) for the defaults and every ci/*-values.yaml; every rendered
manifest parses as YAML; the rendered authsync.toml is accepted by `authsync config`;
the checksum/config annotation follows the config; the chart's guards reject bad values.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

import helm_python as helm
import yaml

CHART = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(CHART))
AUTHSYNC = os.environ.get("AUTHSYNC_BIN", os.path.join(REPO, "target", "debug", "authsync"))

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


def render(values: dict | None) -> dict[str, list[dict]]:
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name="demo", namespace="apps", is_install=True)
    docs: dict[str, list[dict]] = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs[path] = [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: dict[str, list[dict]], kind: str) -> dict:
    found = [d for ds in docs.values() for d in ds if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def authsync_accepts(toml: str, env: dict[str, str]) -> tuple[bool, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(toml)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSYNC_") and k != "DATABASE_URL"}
    clean.update(env)
    proc = subprocess.run([AUTHSYNC, "--config", f.name, "config"], env=clean,
                          capture_output=True, text=True)
    os.unlink(f.name)
    return proc.returncode == 0, proc.stdout + proc.stderr


def scenario(name: str, values: dict | None) -> dict[str, list[dict]]:
    docs = render(values)
    check(True, f"[{name}] renders; every manifest parses as YAML")
    lint = helm.lint(CHART, values, strict=True, namespace="apps")
    msgs = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
    check(not lint.get("errors") and not msgs, f"[{name}] helm lint --strict: {lint.get('errors') or msgs or 'clean'}")
    cm = by_kind(docs, "ConfigMap")
    dep = by_kind(docs, "Deployment")
    toml = cm["data"]["authsync.toml"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    # Plain env values (extraEnv) apply as they would in the pod; secret refs get dummies.
    env = {"AUTHSYNC_DATABASE_URL": "postgres://u:p@db:5432/authsync"}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    ok, out = authsync_accepts(toml, env)
    check(ok, f"[{name}] `authsync config` accepts the rendered authsync.toml" + ("" if ok else f":\n{out}\n{toml}"))
    check(container["args"][:3] == ["run", "--config", "/etc/authsync/authsync.toml"],
          f"[{name}] container runs `authsync run --config /etc/authsync/authsync.toml`")
    return docs


default_docs = scenario("defaults", None)
dep = by_kind(default_docs, "Deployment")
pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
check(pod["terminationGracePeriodSeconds"] == 40, "terminationGracePeriodSeconds defaults to 40")
check(c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz",
      "liveness /healthz, readiness /readyz")
check(c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}], "container port http 8080")
check(c["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"],
      "readOnlyRootFilesystem and runAsNonRoot")
check([e["name"] for e in c["env"]] == ["AUTHSYNC_DATABASE_URL"], "only the database URL env by default")
svc = by_kind(default_docs, "Service")
check(svc["spec"]["ports"][0]["name"] == "http" and svc["spec"]["ports"][0]["port"] == 8080, "service port http 8080")

for path in sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml"))):
    with open(path) as f:
        values = yaml.safe_load(f)
    docs = scenario(os.path.basename(path), values)
    if path.endswith("sasl-values.yaml"):
        c = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        names = [e["name"] for e in c["env"]]
        check("AUTHSYNC_KAFKA_PROPERTY_SASL_USERNAME" in names and "AUTHSYNC_KAFKA_PROPERTY_SASL_PASSWORD" in names,
              "SASL credentials come from the Secret")
        check("--create-topics" in c["args"], "run.createTopics adds --create-topics")
        check("@sha256:" in c["image"], "image digest is used")

# checksum/config follows the config.
a = by_kind(render(None), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
b = by_kind(render({"config": {"consumer": {"batch_size": 499}}}), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
c2 = by_kind(render({"replicaCount": 2}), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
check(a != b and a == c2, "checksum/config changes with the config, and only with it")

# Guards.
for label, values, needle in [
    ("grace period too short", {"terminationGracePeriodSeconds": 29}, "terminationGracePeriodSeconds"),
    ("grace vs raised drain timeout", {"config": {"consumer": {"drain_timeout_ms": 60000}}}, "drain_timeout_ms"),
    ("database.url in config", {"config": {"database": {"url": "postgres://u:p@db/x"}}}, "database.url"),
    ("password in kafka.properties", {"config": {"kafka": {"properties": {"sasl.password": "x"}}}}, "credential"),
    ("http.listen in config", {"config": {"http": {"listen": "0.0.0.0:1"}}}, "containerPort"),
    ("non-map section", {"config": {"log": "debug"}}, "must be a section"),
]:
    try:
        render(values)
        check(False, f"guard: {label} is rejected")
    except Exception as e:  # noqa: BLE001 - HelmRenderError
        check(needle in str(e), f"guard: {label} is rejected ({str(e).splitlines()[0][:120]})")

print(f"{len(failures)} failed" if failures else "all chart checks passed")
sys.exit(1 if failures else 0)
