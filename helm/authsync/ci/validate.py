#!/usr/bin/env python3
"""Offline checks of the authsync chart, without a cluster or a `helm` binary.

Needs `pip install helm-python-sdk==0.2.2 pyyaml` (helm-python-sdk bundles Helm's Go SDK,
v4, as a shared library: it renders and lints like `helm template` / `helm lint`) and an
authsync binary (AUTHSYNC_BIN, default target/debug/authsync) to load the rendered config.

    python3 helm/authsync/ci/validate.py

Checks, for the defaults and every ci/*-values.yaml: helm lint (strict, which also applies
values.schema.json); every manifest parses as YAML; the rendered authsync.toml is accepted
by `authsync config`; the migration hook (Job, its ConfigMap and ServiceAccount) carries the
pre-install/pre-upgrade hook annotations, runs `authsync migrate` with the worker's env,
volumes and config file, and does not depend on anything created after the hooks; the PDB
selects the worker pods. Per value set: Kafka SASL/TLS env and mounts, KEDA (ScaledObject,
TriggerAuthentication, no `replicas`), ServiceMonitor only with the
monitoring.coreos.com/v1 capability. Then: checksum/config follows the config; the schema
rejects ill-typed values; the chart's guards reject bad combinations.
"""

from __future__ import annotations

import glob
import json
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

# Capabilities of a cluster running the Prometheus Operator and KEDA.
CRDS = ["monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor",
        "monitoring.coreos.com/v1/PrometheusRule",
        "keda.sh/v1alpha1", "keda.sh/v1alpha1/ScaledObject"]
REPO = os.path.dirname(os.path.dirname(CHART))
# Every manifest rendered by a scenario, checked against the Kubernetes / CRD schemas at the end.
scenario_docs: dict[str, list[dict]] = {}
HOOK = "helm.sh/hook"


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


def render_raw(values: dict | None, api_versions: list[str] | None = None) -> dict[str, str]:
    chart = helm.Chart.load(CHART)
    if not api_versions:
        return chart.render(values, name="demo", namespace="apps", is_install=True)
    # helm-python-sdk 0.2.2's Chart.render() has no parameter for extra API versions
    # (`helm template --api-versions`), but the native render options accept them.
    from helm_python import _native
    opts = {"name": "demo", "namespace": "apps", "is_install": True, "api_versions": api_versions}
    out = _native.call_string("helm_render", chart._raw(), json.dumps(values) if values is not None else None,
                              json.dumps(opts))
    return json.loads(out)


def render(values: dict | None, api_versions: list[str] | None = None) -> list[dict]:
    """Every rendered object (NOTES.txt excluded)."""
    docs: list[dict] = []
    for path, text in render_raw(values, api_versions).items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def component(d: dict) -> str:
    return (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component", "")


def kinds(docs: list[dict], kind: str, hooks: bool | None = False, ingest: bool = False) -> list[dict]:
    """Objects of `kind`; hooks=False: release objects only, True: hooks only, None: both.
    The ingest's objects (component: ingest) only when `ingest`."""
    return [d for d in docs if d.get("kind") == kind and (component(d) == "ingest") == ingest and
            (hooks is None or (HOOK in (d["metadata"].get("annotations") or {})) == hooks)]


def one(docs: list[dict], kind: str, hooks: bool = False, ingest: bool = False) -> dict:
    found = kinds(docs, kind, hooks, ingest)
    assert len(found) == 1, f"expected one {kind} (hook={hooks}), got {len(found)}"
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


def rejected(values: dict, needle: str, label: str, api_versions: list[str] | None = None) -> None:
    try:
        render(values, api_versions)
        check(False, f"{label} is rejected")
    except Exception as e:  # noqa: BLE001 - HelmRenderError / HelmValuesError
        msg = " ".join(str(e).split())
        check(needle in msg, f"{label} is rejected ({msg[:140]})" + ("" if needle in msg else f" - expected {needle!r}"))


def scenario(name: str, values: dict | None, api_versions: list[str] | None = None) -> list[dict]:
    docs = render(values, api_versions)
    scenario_docs[name] = docs
    check(True, f"[{name}] renders; every manifest parses as YAML")
    lint = helm.lint(CHART, values, strict=True, namespace="apps")
    msgs = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
    check(not lint.get("errors") and not msgs, f"[{name}] helm lint --strict (with values.schema.json): {lint.get('errors') or msgs or 'clean'}")
    merged = helm.Chart.load(CHART).merge_values(values)

    cms = [d for d in kinds(docs, "ConfigMap") if "authsync.toml" in (d.get("data") or {})]
    check(len(cms) == 1, f"[{name}] one ConfigMap holds authsync.toml")
    cm = cms[0]
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    toml = cm["data"]["authsync.toml"]
    # Plain env values (kafka.*, extraEnv) apply as they would in the pod; secret refs get dummies.
    env = {"AUTHSYNC_DATABASE_URL": "postgres://u:p@db:5432/authsync"}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    ok, out = authsync_accepts(toml, env)
    check(ok, f"[{name}] `authsync config` accepts the rendered authsync.toml and env" + ("" if ok else f":\n{out}\n{toml}"))
    check(container["args"][:3] == ["run", "--config", "/etc/authsync/authsync.toml"],
          f"[{name}] container runs `authsync run --config /etc/authsync/authsync.toml`")
    check(container["env"][0]["name"] == "AUTHSYNC_DATABASE_URL"
          and container["env"][0]["valueFrom"]["secretKeyRef"]["key"] == merged["database"]["existingSecretKey"],
          f"[{name}] database URL from the Secret")
    check(container["livenessProbe"]["httpGet"]["path"] == "/healthz"
          and container["readinessProbe"]["httpGet"]["path"] == "/readyz",
          f"[{name}] liveness /healthz, readiness /readyz")
    pod_specs = [d["spec"]["template"]["spec"] for d in docs if d.get("kind") in ("Deployment", "Job")]
    check(pod_specs and all(p.get("enableServiceLinks") is False for p in pod_specs),
          f"[{name}] every pod (worker, ingest, migration Job) has enableServiceLinks: false "
          "(service-link variables such as AUTHSYNC_KAFKA_PORT would be rejected as settings)")
    drain_ms = merged["config"].get("consumer", {}).get("drain_timeout_ms", 25000)
    check(pod["terminationGracePeriodSeconds"] * 1000 >= drain_ms + 5000,
          f"[{name}] terminationGracePeriodSeconds ({pod['terminationGracePeriodSeconds']}) > drain timeout ({drain_ms} ms) + 5 s")
    check("checksum/config" in dep["spec"]["template"]["metadata"]["annotations"], f"[{name}] checksum/config annotation")
    # Volume mounts all resolve to volumes.
    vols = {v["name"]: v for v in pod["volumes"]}
    check(all(m["name"] in vols for m in container["volumeMounts"]), f"[{name}] every volumeMount has a volume")

    # KEDA owns the replica count when enabled.
    keda = merged["keda"]["enabled"]
    check(("replicas" in dep["spec"]) != keda,
          f"[{name}] Deployment {'omits' if keda else 'sets'} replicas (keda.enabled={keda})")
    check(len(kinds(docs, "ScaledObject")) == (1 if keda else 0), f"[{name}] ScaledObject only with keda.enabled")

    # PodDisruptionBudget.
    pdbs = kinds(docs, "PodDisruptionBudget")
    if merged["pdb"]["enabled"]:
        check(len(pdbs) == 1 and pdbs[0]["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
              and (("maxUnavailable" in pdbs[0]["spec"]) != ("minAvailable" in pdbs[0]["spec"])),
              f"[{name}] PDB selects the worker pods, with one of maxUnavailable / minAvailable")
    else:
        check(not pdbs, f"[{name}] no PDB when pdb.enabled=false")

    # ServiceMonitor: never without the CRD's API; with it only when enabled.
    check(not kinds(render(values) if api_versions else docs, "ServiceMonitor"), f"[{name}] no ServiceMonitor without monitoring.coreos.com/v1")
    with_crds = render(values, CRDS)
    sms = kinds(with_crds, "ServiceMonitor")
    want_sm = merged["serviceMonitor"]["enabled"]
    check(len(sms) == (1 if want_sm else 0),
          f"[{name}] with monitoring.coreos.com/v1: ServiceMonitor {'rendered' if want_sm else 'absent (not enabled)'}")
    if want_sm:
        sm, svc = sms[0], one(with_crds, "Service")
        ep = sm["spec"]["endpoints"][0]
        check(all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
              and ep["port"] == svc["spec"]["ports"][0]["name"] and ep["path"] == "/metrics",
              f"[{name}] ServiceMonitor selects the Service and scrapes port {ep['port']} /metrics")

    # Migration hook.
    hooks = [d for d in docs if HOOK in (d["metadata"].get("annotations") or {})]
    if merged["migration"]["enabled"]:
        job = one(docs, "Job", hooks=True)
        ann = job["metadata"]["annotations"]
        check(ann[HOOK] == "pre-install,pre-upgrade"
              and ann["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
              and "helm.sh/hook-weight" in ann,
              f"[{name}] migration Job: hook pre-install,pre-upgrade, weight, delete policy before-hook-creation,hook-succeeded")
        jpod = job["spec"]["template"]["spec"]
        jc = jpod["containers"][0]
        check(jc["args"][:3] == ["migrate", "--config", "/etc/authsync/authsync.toml"] and jc["image"] == container["image"]
              and jc.get("command") == container.get("command") and jpod["restartPolicy"] == "Never",
              f"[{name}] migration Job runs `authsync migrate --config ...` with the worker's image")
        check(jc["env"] == container["env"] and jc.get("envFrom") == container.get("envFrom"),
              f"[{name}] migration Job has exactly the worker's env (database URL and Kafka Secrets)")
        check(jc["volumeMounts"] == container["volumeMounts"], f"[{name}] migration Job has the worker's volume mounts")
        hook_cm_name = next(v for v in jpod["volumes"] if v["name"] == "config")["configMap"]["name"]
        check(hook_cm_name != cm["metadata"]["name"], f"[{name}] migration Job does not mount the release ConfigMap (absent at pre-install)")
        hook_cms = [d for d in hooks if d["kind"] == "ConfigMap" and d["metadata"]["name"] == hook_cm_name]
        check(len(hook_cms) == 1 and hook_cms[0]["data"] == cm["data"],
              f"[{name}] the Job's config is a hook ConfigMap with the worker's authsync.toml")
        weight = int(ann["helm.sh/hook-weight"])
        check(all(int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) < weight
                  and d["metadata"]["annotations"][HOOK] == ann[HOOK] for d in hooks if d is not job),
              f"[{name}] hook ConfigMap / ServiceAccount come before the Job (lower hook-weight)")
        release_sas = [d["metadata"]["name"] for d in kinds(docs, "ServiceAccount")]
        check(jpod["serviceAccountName"] not in release_sas,
              f"[{name}] migration Job does not use the release's ServiceAccount (absent at pre-install): {jpod['serviceAccountName']}")
        if merged["serviceAccount"]["create"]:
            check(any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == jpod["serviceAccountName"] for d in hooks),
                  f"[{name}] ... it uses a hook ServiceAccount")
        jv = [v for v in jpod["volumes"] if v["name"] != "config"]
        wv = [v for v in pod["volumes"] if v["name"] != "config"]
        check(jv == wv, f"[{name}] migration Job has the worker's other volumes (tmp, Kafka TLS, extra)")
        check(jc["securityContext"] == container["securityContext"], f"[{name}] migration Job keeps the securityContext")
        check(not any(HOOK in (d["metadata"].get("annotations") or {}) for d in docs if d["kind"] in ("Deployment", "Service")),
              f"[{name}] only the migration objects are hooks")
    else:
        check(not hooks, f"[{name}] no hooks when migration.enabled=false")
    return docs


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------------------------------
# Defaults.
default_docs = scenario("defaults", None)
dep = one(default_docs, "Deployment")
pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
check(dep["spec"]["replicas"] == 1, "replicas defaults to 1")
check(pod["terminationGracePeriodSeconds"] == 40, "terminationGracePeriodSeconds defaults to 40")
check(c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}], "container port http 8080")
check(c["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"],
      "readOnlyRootFilesystem and runAsNonRoot")
check([e["name"] for e in c["env"]] == ["AUTHSYNC_DATABASE_URL"], "only the database URL env by default")
svc = one(default_docs, "Service")
check(svc["spec"]["ports"][0]["name"] == "http" and svc["spec"]["ports"][0]["port"] == 8080, "service port http 8080")
check(one(default_docs, "PodDisruptionBudget")["spec"] == {
    "maxUnavailable": 1, "selector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]}},
      "PDB enabled by default with maxUnavailable 1")
check(not kinds(render(None, CRDS), "ServiceMonitor"), "ServiceMonitor off by default even with the CRD present")
check(not kinds(default_docs, "ScaledObject", None) and not kinds(default_docs, "TriggerAuthentication", None),
      "no KEDA objects by default")
job = one(default_docs, "Job", hooks=True)
check(job["metadata"]["annotations"]["helm.sh/hook-weight"] == "-5"
      and job["spec"]["template"]["spec"]["serviceAccountName"] == "demo-authsync-migrate",
      "default migration Job: hook-weight -5, hook ServiceAccount demo-authsync-migrate")
toml = one(default_docs, "ConfigMap")["data"]["authsync.toml"]
check("[merge]" in toml and "fetch_wait_max_ms = 2" in toml, "config has the [merge] section and consumer.fetch_wait_max_ms")
notes = render_raw(None)["authsync/templates/NOTES.txt"]
check("migrat" in notes and "demo-authsync" in notes, "NOTES.txt renders")

rejected({"config": {"ingest": {"signing_key": "a-literal-key-in-a-configmap-0123456789"}}},
         "pattern", "a literal secret in config.ingest.signing_key")
rejected({"config": {"ingest": {"listen": "0.0.0.0:1"}}}, "listen", "config.ingest.listen set by hand")

# ---------------------------------------------------------------------------------------
# ci/*-values.yaml.
for path in sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml"))):
    base = os.path.basename(path)
    with open(path) as f:
        values = yaml.safe_load(f)
    docs = scenario(base, values)
    c = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(c)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    if base == "ingest-values.yaml":
        idep = one(docs, "Deployment", ingest=True)
        ic = idep["spec"]["template"]["spec"]["containers"][0]
        ienv = env_of(ic)
        check(ic["args"][:3] == ["ingest", "--config", "/etc/authsync/authsync.toml"],
              f"[{base}] the ingest Deployment runs `authsync ingest`")
        check("CLERK_WEBHOOK_SECRET" in ienv and "AUTHSYNC_SOURCE_KEY" in ienv and "AUTHSYNC_SOURCE_KEY" in env
              and "CLERK_WEBHOOK_SECRET" not in env,
              f"[{base}] webhook secrets only in the ingest pods, the source key in both")
        check(ic["readinessProbe"]["httpGet"]["path"] == "/readyz" and ic["ports"][0]["containerPort"] == 8081,
              f"[{base}] ingest probes and port")
        isvc = one(docs, "Service", ingest=True)
        wsvc = one(docs, "Service")
        ilabels = idep["spec"]["template"]["metadata"]["labels"]
        check(all(ilabels.get(k) == v for k, v in isvc["spec"]["selector"].items())
              and not all(ilabels.get(k) == v for k, v in wsvc["spec"]["selector"].items())
              and not all(ilabels.get(k) == v for k, v in one(docs, "Deployment")["spec"]["selector"]["matchLabels"].items()),
              f"[{base}] the ingest Service selects ingest pods; the worker's selectors do not")
        ing = one(docs, "Ingress", ingest=True)
        paths = [p for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
        check([p["path"] for p in paths] == ["/hooks/"] and ing["spec"]["tls"][0]["secretName"] == "hooks-tls",
              f"[{base}] the Ingress exposes only /hooks/")
        toml = one(docs, "ConfigMap")["data"]["authsync.toml"]
        check("[trust.sources.clerk-prod]" in toml and "[ingest.endpoints.okta-prod]" in toml
              and 'listen = "[::]:8081"' in toml,
              f"[{base}] trust sources and ingest endpoints render as named tables")
    else:
        check(not kinds(docs, "Deployment", ingest=True), f"[{base}] no ingest Deployment unless enabled")
    if base == "sasl-values.yaml":
        check("AUTHSYNC_KAFKA_PROPERTY_SASL_USERNAME" in env and "AUTHSYNC_KAFKA_PROPERTY_SASL_PASSWORD" in env,
              f"[{base}] SASL credentials come from the Secret")
        check("--create-topics" in c["args"], f"[{base}] run.createTopics adds --create-topics")
        check("@sha256:" in c["image"], f"[{base}] image digest is used")
    if base == "production-values.yaml":
        check(env["AUTHSYNC_KAFKA_PROPERTY_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
              and env["AUTHSYNC_KAFKA_PROPERTY_SASL_MECHANISM"]["value"] == "SCRAM-SHA-512",
              f"[{base}] security.protocol and sasl.mechanism passed as AUTHSYNC_KAFKA_PROPERTY_*")
        check(env["AUTHSYNC_KAFKA_PROPERTY_SASL_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "authsync-kafka-scram", "key": "user"}
              and env["AUTHSYNC_KAFKA_PROPERTY_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "authsync-kafka-scram", "key": "password"},
              f"[{base}] SASL username / password from the Secret's configured keys")
        ca = env["AUTHSYNC_KAFKA_PROPERTY_SSL_CA_LOCATION"]["value"]
        check(os.path.dirname(ca) == mounts.get("kafka-ca")
              and vols["kafka-ca"]["secret"] == {"secretName": "kafka-cluster-ca-cert", "items": [{"key": "ca.crt", "path": os.path.basename(ca)}]},
              f"[{base}] CA Secret mounted and AUTHSYNC_KAFKA_PROPERTY_SSL_CA_LOCATION={ca} points at it")
        cert = env["AUTHSYNC_KAFKA_PROPERTY_SSL_CERTIFICATE_LOCATION"]["value"]
        key = env["AUTHSYNC_KAFKA_PROPERTY_SSL_KEY_LOCATION"]["value"]
        check(os.path.dirname(cert) == os.path.dirname(key) == mounts.get("kafka-client-cert")
              and vols["kafka-client-cert"]["secret"]["secretName"] == "authsync-kafka-client-tls"
              and env["AUTHSYNC_KAFKA_PROPERTY_SSL_KEY_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "key-password",
              f"[{base}] client certificate / key mounted from the Secret, key password from it")
        check(not any("password" in str(v).lower() for v in one(docs, "ConfigMap")["data"].values()),
              f"[{base}] no credential in the ConfigMap")
        rendered = one(docs, "ConfigMap")["data"]["authsync.toml"]
        check(rendered.count("[[identity.role_sets.rules]]") == 3 and rendered.count("[[identity.role_sets]]") == 2
              and 'mode = "force"' in rendered and 'connections = ["auth0:con_acmeSaml"]' in rendered,
              f"[{base}] identity role sets render as TOML arrays of tables (and the binary loads them)")
        check(rendered.count("[[identity.connections]]") == 1 and 'link = false' in rendered
              and 'organization = "3f0c6a8e-4c1d-4b8e-9a55-1b2c3d4e5f60"' in rendered,
              f"[{base}] identity connections render as a TOML array of tables")
        pdb = one(docs, "PodDisruptionBudget")["spec"]
        check(pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow",
              f"[{base}] PDB maxUnavailable 1, unhealthyPodEvictionPolicy AlwaysAllow")
        sm = one(render(values, CRDS), "ServiceMonitor")
        check(sm["metadata"]["labels"].get("release") == "kube-prometheus-stack" and sm["spec"]["endpoints"][0]["interval"] == "15s",
              f"[{base}] ServiceMonitor carries the Prometheus selector label and interval")
        job = one(docs, "Job", hooks=True)
        hook_sa = one(docs, "ServiceAccount", hooks=True)
        check(job["spec"]["ttlSecondsAfterFinished"] == 86400 and job["spec"]["activeDeadlineSeconds"] == 900
              and job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "256Mi"
              and hook_sa["metadata"]["annotations"].get("eks.amazonaws.com/role-arn"),
              f"[{base}] migration Job settings; hook ServiceAccount keeps the ServiceAccount annotations")
    if base == "keda-values.yaml":
        docs_k = docs
        so = one(docs_k, "ScaledObject")
        spec = so["spec"]
        check(spec["scaleTargetRef"]["name"] == one(docs_k, "Deployment")["metadata"]["name"],
              f"[{base}] ScaledObject targets the Deployment")
        check(spec["minReplicaCount"] == 2 and spec["maxReplicaCount"] == 8,
              f"[{base}] min 2, max = config.topics.partitions (8) by default")
        trig = spec["triggers"]
        check([t["metadata"]["topic"] for t in trig] == ["idp.logins.v2", "idp.merges.v2"] and all(t["type"] == "kafka" for t in trig),
              f"[{base}] kafka triggers on the login and merge topics")
        m = trig[0]["metadata"]
        check(m["consumerGroup"] == "authsync-keda" and m["bootstrapServers"] == "b-1.kafka:9096,b-2.kafka:9096"
              and m["lagThreshold"] == "500" and m["activationLagThreshold"] == "10" and m["offsetResetPolicy"] == "earliest"
              and m["allowIdleConsumers"] == "false" and m["excludePersistentLag"] == "true",
              f"[{base}] trigger metadata: group = config.kafka.group_id, brokers, thresholds as strings, allowIdleConsumers false")
        check(all(isinstance(v, str) for t in trig for v in t["metadata"].values()), f"[{base}] all trigger metadata are strings")
        check(m["sasl"] == "scram_sha256" and m["tls"] == "enable", f"[{base}] KEDA sasl=scram_sha256 tls=enable from kafka.*")
        ta = one(docs_k, "TriggerAuthentication")
        params = {r["parameter"]: r for r in ta["spec"].get("secretTargetRef", [])}
        check(all(t["authenticationRef"]["name"] == ta["metadata"]["name"] for t in trig)
              and params["username"]["name"] == "kafka-sasl" and params["password"]["key"] == "password"
              and ta["spec"]["configMapTargetRef"] == [{"parameter": "ca", "name": "kafka-ca-bundle", "key": "ca.pem"}],
              f"[{base}] TriggerAuthentication with the SASL Secret and the CA ConfigMap, referenced by the triggers")
        check(spec["fallback"]["replicas"] == 4 and "scaleDown" in spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
              f"[{base}] fallback and HPA behavior passed through")
        check(vols["kafka-ca"]["configMap"]["name"] == "kafka-ca-bundle"
              and env["AUTHSYNC_KAFKA_PROPERTY_SSL_CA_LOCATION"]["value"].startswith(mounts["kafka-ca"] + "/"),
              f"[{base}] CA from a ConfigMap mounted and passed as ssl.ca.location")
        check(one(docs_k, "Job", hooks=True)["spec"]["template"]["spec"]["serviceAccountName"] == "authsync-existing"
              and not kinds(docs_k, "ServiceAccount", None),
              f"[{base}] serviceAccount.create=false: no ServiceAccount, the Job uses the existing one")

# ---------------------------------------------------------------------------------------
# Variations.
docs = render({"keda": {"enabled": True, "mergeTrigger": False, "maxReplicaCount": 3}})
so = one(docs, "ScaledObject")
check("replicas" not in one(docs, "Deployment")["spec"] and so["spec"]["maxReplicaCount"] == 3
      and [t["metadata"]["topic"] for t in so["spec"]["triggers"]] == ["auth.login.v1"]
      and so["spec"]["triggers"][0]["metadata"]["sasl"] == "none" and "authenticationRef" not in so["spec"]["triggers"][0]
      and not kinds(docs, "TriggerAuthentication"),
      "KEDA plaintext: one login trigger, explicit maxReplicaCount, no TriggerAuthentication")
docs = render({"keda": {"enabled": True, "authenticationRef": "shared-kafka-auth"},
               "config": {"kafka": {"properties": {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}}}})
t = one(docs, "ScaledObject")["spec"]["triggers"][0]
check(t["authenticationRef"]["name"] == "shared-kafka-auth" and t["metadata"]["sasl"] == "plaintext"
      and t["metadata"]["tls"] == "enable" and not kinds(docs, "TriggerAuthentication"),
      "KEDA: security settings from config.kafka.properties; existing TriggerAuthentication used as is")
docs = render({"migration": {"enabled": False}, "pdb": {"enabled": False}, "service": {"enabled": False},
               "serviceMonitor": {"enabled": True}}, None)
check(not kinds(docs, "Job", None) and not kinds(docs, "PodDisruptionBudget") and not kinds(docs, "Service"),
      "migration, PDB and Service can be turned off")
docs = render({"pdb": {"minAvailable": "50%"}})
check(one(docs, "PodDisruptionBudget")["spec"].get("minAvailable") == "50%"
      and "maxUnavailable" not in one(docs, "PodDisruptionBudget")["spec"], "pdb.minAvailable replaces maxUnavailable")
docs = render({"serviceMonitor": {"enabled": True, "namespace": "monitoring"}}, CRDS)
sm = one(docs, "ServiceMonitor")
check(sm["metadata"]["namespace"] == "monitoring" and sm["spec"]["namespaceSelector"]["matchNames"] == ["apps"],
      "ServiceMonitor in another namespace selects the release namespace")

# checksum/config follows the config.
a = one(render(None), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
b = one(render({"config": {"consumer": {"batch_size": 499}}}), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
c2 = one(render({"replicaCount": 2}), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
check(a != b and a == c2, "checksum/config changes with the config, and only with it")

# ---------------------------------------------------------------------------------------
# Monitoring objects, NetworkPolicy, topology spread, KEDA floor, migration deadline, SASL.
check(open(os.path.join(CHART, "files", "alerts.yaml")).read()
      == open(os.path.join(REPO, "deploy", "prometheus", "alerts.yaml")).read(),
      "files/alerts.yaml is the same as deploy/prometheus/alerts.yaml")
check(open(os.path.join(CHART, "files", "dashboard.json")).read()
      == open(os.path.join(REPO, "deploy", "grafana", "authsync.json")).read(),
      "files/dashboard.json is the same as deploy/grafana/authsync.json")
check(not kinds(render({"prometheusRule": {"enabled": True}}), "PrometheusRule"),
      "PrometheusRule needs the monitoring.coreos.com/v1 API")
full_values = {"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                                  "runbookBaseUrl": "https://git.example.com/authsync/-/blob/main/"},
               "serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True},
               "ingest": {"enabled": True}, "keda": {"enabled": True},
               "networkPolicy": {"allowExternalEgress": False,
                                 "egressTo": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}],
                                               "ports": [{"port": 5432}, {"port": 9092}]}],
                                 "ingressFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
               "config": {"kafka": {"group_id": "auth-prod"}}}
full = scenario("everything on", full_values, CRDS)
rule = one(full, "PrometheusRule")
exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
check(rule["metadata"]["labels"].get("release") == "kube-prometheus-stack"
      and all('job="authsync"' not in e for e in exprs)
      and any('up{job="demo-authsync",namespace="apps"}' in e for e in exprs)
      and sum('job="demo-authsync",namespace="apps"' in e for e in exprs) >= 15
      and all('consumergroup="authsync"' not in e for e in exprs)
      and sum('consumergroup="auth-prod"' in e for e in exprs) == 2,
      "PrometheusRule: every selector names this release's job (the Service) and namespace, and its consumer group")
urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]]
check(all(u.startswith("https://git.example.com/authsync/-/blob/main/docs/OPERATIONS.md#") for u in urls),
      "PrometheusRule: runbook links carry prometheusRule.runbookBaseUrl")
check(one(full, "Service")["metadata"]["name"] == "demo-authsync",
      "the ServiceMonitor's job (the Service's name) is the rules' job")
dash = [d for d in kinds(full, "ConfigMap") if d["metadata"]["name"] == "demo-authsync-dashboard"]
check(len(dash) == 1 and dash[0]["metadata"]["labels"].get("grafana_dashboard") == "1"
      and json.loads(dash[0]["data"]["authsync.json"])["title"]
      == json.load(open(os.path.join(REPO, "deploy", "grafana", "authsync.json")))["title"],
      "dashboard ConfigMap: the dashboard JSON, labelled for Grafana's sidecar")
nps = {d["metadata"]["name"]: d["spec"] for d in kinds(full, "NetworkPolicy")}
w, i = nps.get("demo-authsync", {}), nps.get("demo-authsync-ingest", {})
check(set(nps) == {"demo-authsync", "demo-authsync-ingest"}
      and w["ingress"][0]["ports"] == [{"port": 8080, "protocol": "TCP"}]
      and i["ingress"][0]["ports"] == [{"port": 8081, "protocol": "TCP"}]
      and w["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
      and i["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ingest"
      and w["ingress"][0]["from"] == full_values["networkPolicy"]["ingressFrom"]
      and w["policyTypes"] == ["Ingress", "Egress"]
      and {"port": 53, "protocol": "UDP"} in w["egress"][0]["ports"]
      and w["egress"][1] == full_values["networkPolicy"]["egressTo"][0],
      "NetworkPolicy per component: only its HTTP port in; DNS and egressTo out when egress is closed")
d_np = {d["metadata"]["name"]: d["spec"] for d in kinds(default_docs, "NetworkPolicy")}
check(list(d_np) == ["demo-authsync"] and d_np["demo-authsync"]["policyTypes"] == ["Ingress"]
      and "from" not in d_np["demo-authsync"]["ingress"][0],
      "NetworkPolicy by default: HTTP port from anywhere (probes, Prometheus), egress open")
check(not kinds(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy"), "networkPolicy.enabled false removes it")
d_dep = one(default_docs, "Deployment")
spread = d_dep["spec"]["template"]["spec"].get("topologySpreadConstraints") or []
check([(t["topologyKey"], t["maxSkew"], t["whenUnsatisfiable"]) for t in spread]
      == [("topology.kubernetes.io/zone", 1, "ScheduleAnyway"), ("kubernetes.io/hostname", 1, "ScheduleAnyway")]
      and all(t["labelSelector"]["matchLabels"] == d_dep["spec"]["selector"]["matchLabels"] for t in spread),
      "default topology spread: zones then nodes, maxSkew 1, ScheduleAnyway, this Deployment's pods")
ingest_dep = one(full, "Deployment", ingest=True)
check(all(t["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ingest"
          for t in ingest_dep["spec"]["template"]["spec"]["topologySpreadConstraints"]),
      "the ingest pods spread by their own labels")
own = [{"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app": "x"}}}]
check(one(render({"topologySpreadConstraints": own}), "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"] == own
      and "topologySpreadConstraints" not in one(render({"defaultTopologySpread": False}), "Deployment")["spec"]["template"]["spec"],
      "topologySpreadConstraints replace the default; defaultTopologySpread false removes it")
check(one(default_docs, "Job", hooks=True)["spec"]["activeDeadlineSeconds"] < 300,
      "migration Job deadline (270 s) is within helm's default --timeout (300 s)")
check('listen = "[::]:8080"' in one(default_docs, "ConfigMap")["data"]["authsync.toml"], "http.listen is [::]:<containerPort> (IPv6 and IPv4)")
rejected({"keda": {"enabled": True, "minReplicaCount": 0}}, "allowScaleToZero", "KEDA minReplicaCount 0 without allowScaleToZero")
check(one(render({"keda": {"enabled": True, "minReplicaCount": 0, "allowScaleToZero": True}}), "ScaledObject")["spec"]["minReplicaCount"] == 0,
      "KEDA minReplicaCount 0 with allowScaleToZero")
for mech in ["GSSAPI", "OAUTHBEARER"]:
    rejected({"kafka": {"securityProtocol": "SASL_SSL", "sasl": {"mechanism": mech}}}, "/kafka/sasl/mechanism",
             f"schema: kafka.sasl.mechanism {mech} (no provider in the binary)")
    rejected({"config": {"kafka": {"properties": {"security.protocol": "SASL_SSL", "sasl.mechanism": mech}}}},
             "not supported", f"guard: config.kafka.properties sasl.mechanism {mech}")
rejected({"kafka": {"securityProtocol": "SASL_SSL"}}, "needs kafka.sasl.mechanism", "guard: SASL without a mechanism (librdkafka's default is GSSAPI)")

# ---------------------------------------------------------------------------------------
# Every rendered manifest against the Kubernetes schemas (kubernetes-validate, strict: unknown
# fields fail) and the custom resources against their CRDs' schemas (ci/crds.mjs).
import kubernetes_validate  # noqa: E402 - only this section needs it

K8S_VERSION = "1.33"
custom: list[dict] = []
for name, docs in scenario_docs.items():
    bad = []
    for d in docs:
        if "." in d["apiVersion"].split("/")[0] and not d["apiVersion"].startswith(("apps/", "batch/", "policy/", "networking.k8s.io/")):
            custom.append(d)
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except Exception as e:  # noqa: BLE001 - ValidationError and friends
            bad.append(f"{d['kind']}/{d['metadata']['name']}: {' '.join(str(e).split())[:200]}")
    check(not bad, f"[{name}] {len(docs)} manifests valid against the Kubernetes {K8S_VERSION} schemas (strict){': ' + '; '.join(bad) if bad else ''}")
with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(custom, f)
crd = subprocess.run(["node", os.path.join(CHART, "ci", "crds.mjs"), f.name], capture_output=True, text=True)
print(crd.stdout.rstrip())
kinds_seen = sorted({d["kind"] for d in custom})
check(crd.returncode == 0 and kinds_seen == ["PrometheusRule", "ScaledObject", "ServiceMonitor", "TriggerAuthentication"],
      f"custom resources valid against their CRD schemas ({', '.join(kinds_seen)}){crd.stderr[-300:]}")

# ---------------------------------------------------------------------------------------
# promtool: the plain rule file and its tests, then the rules as rendered for a release.
def promtool(*args: str, cwd: str | None = None) -> tuple[bool, str]:
    r = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd)
    return r.returncode == 0, " ".join((r.stdout + r.stderr).split())[-300:]


prom_dir = os.path.join(REPO, "deploy", "prometheus")
ok, out = promtool("check", "rules", "alerts.yaml", cwd=prom_dir)
check(ok, f"promtool check rules deploy/prometheus/alerts.yaml: {out}")
ok, out = promtool("test", "rules", "alerts_test.yaml", cwd=prom_dir)
check(ok, f"promtool test rules deploy/prometheus/alerts_test.yaml: {out}")
with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "rendered-alerts.yaml"), "w") as f:
        yaml.safe_dump({"groups": rule["spec"]["groups"]}, f, sort_keys=False)
    with open(os.path.join(CHART, "ci", "rendered_alerts_test.yaml")) as src, \
            open(os.path.join(tmp, "rendered_alerts_test.yaml"), "w") as dst:
        dst.write(src.read())
    ok, out = promtool("check", "rules", "rendered-alerts.yaml", cwd=tmp)
    check(ok, f"promtool check rules on the rendered PrometheusRule: {out}")
    ok, out = promtool("test", "rules", "rendered_alerts_test.yaml", cwd=tmp)
    check(ok, f"promtool test rules ci/rendered_alerts_test.yaml (release demo, group auth-prod): {out}")

# values.schema.json.
chart = helm.Chart.load(CHART)
try:
    chart.validate_schema(None)
    check(True, "values.schema.json accepts the default values")
except Exception as e:  # noqa: BLE001
    check(False, f"values.schema.json accepts the default values: {e}")
lint = helm.lint(CHART, {"replicaCount": "two"}, strict=True, namespace="apps")
check(bool(lint.get("errors") or [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2]),
      "helm lint fails on replicaCount: \"two\" (schema)")
for label, values, needle in [
    ("schema: replicaCount \"two\"", {"replicaCount": "two"}, "/replicaCount"),
    ("schema: unknown top-level key (typo)", {"replicas": 3}, "replicas"),
    ("schema: image.pullPolicy", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("schema: resources as a string", {"resources": "big"}, "/resources"),
    ("schema: database.existingSecretKey empty", {"database": {"existingSecretKey": ""}}, "/database/existingSecretKey"),
    ("schema: kafka.securityProtocol", {"kafka": {"securityProtocol": "TLS"}}, "/kafka/securityProtocol"),
    ("schema: kafka.sasl.mechanism", {"kafka": {"sasl": {"mechanism": "scram"}}}, "/kafka/sasl/mechanism"),
    ("schema: unknown kafka.tls key", {"kafka": {"tls": {"enabled": True}}}, "/kafka/tls"),
    ("schema: serviceMonitor.enabled as a string", {"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
    ("schema: pdb.maxUnavailable", {"pdb": {"maxUnavailable": "one"}}, "/pdb/maxUnavailable"),
    ("schema: migration.backoffLimit", {"migration": {"backoffLimit": -1}}, "/migration/backoffLimit"),
    ("schema: keda.offsetResetPolicy", {"keda": {"offsetResetPolicy": "none"}}, "/keda/offsetResetPolicy"),
    ("schema: keda.lagThreshold", {"keda": {"lagThreshold": "100"}}, "/keda/lagThreshold"),
    ("schema: config section not an object", {"config": {"log": "debug"}}, "/config/log"),
    ("schema: unknown config section", {"config": {"consumers": {"batch_size": 1}}}, "consumers"),
    ("schema: config.consumer.batch_size range", {"config": {"consumer": {"batch_size": 20000}}}, "/config/consumer/batch_size"),
    ("schema: config.merge.report_list_limit type", {"config": {"merge": {"report_list_limit": "all"}}}, "/config/merge/report_list_limit"),
    ("schema: config.relay.compression", {"config": {"relay": {"compression": "brotli"}}}, "/config/relay/compression"),
]:
    rejected(values, needle, label)

# Guards (template fail messages).
for label, values, needle, caps in [
    ("grace period too short", {"terminationGracePeriodSeconds": 29}, "terminationGracePeriodSeconds", None),
    ("grace vs raised drain timeout", {"config": {"consumer": {"drain_timeout_ms": 60000}}}, "drain_timeout_ms", None),
    ("database.url in config", {"config": {"database": {"url": "postgres://u:p@db/x"}}}, "database.url", None),
    ("password in kafka.properties", {"config": {"kafka": {"properties": {"sasl.password": "x"}}}}, "credential", None),
    ("http.listen in config", {"config": {"http": {"listen": "0.0.0.0:1"}}}, "containerPort", None),
    ("security.protocol twice", {"kafka": {"securityProtocol": "SSL"},
                                 "config": {"kafka": {"properties": {"security.protocol": "SSL"}}}}, "both set", None),
    ("ssl.ca.location with kafka.tls.ca", {"kafka": {"tls": {"ca": {"existingSecret": "ca"}}},
                                           "config": {"kafka": {"properties": {"ssl.ca.location": "/x"}}}}, "ssl.ca.location", None),
    ("CA from Secret and ConfigMap", {"kafka": {"tls": {"ca": {"existingSecret": "a", "existingConfigMap": "b"}}}}, "not both", None),
    ("KEDA max below min", {"keda": {"enabled": True, "minReplicaCount": 4, "maxReplicaCount": 2}}, "maxReplicaCount", None),
    ("KEDA with SASL but no credentials", {"keda": {"enabled": True}, "kafka": {"securityProtocol": "SASL_SSL", "sasl": {"mechanism": "PLAIN"}}},
     "kafka.sasl.existingSecret", None),
    ("ServiceMonitor without Service", {"serviceMonitor": {"enabled": True}, "service": {"enabled": False}}, "service.enabled", CRDS),
]:
    rejected(values, needle, f"guard: {label}", caps)

print(f"{len(failures)} failed" if failures else "all chart checks passed")
sys.exit(1 if failures else 0)
