#!/usr/bin/env python3
"""Checks behind scripts/check-deploy (run it, not this file, from the repo root).

Each subcommand prints what it checks and exits non-zero on any failure.
Needs: PyYAML, jsonschema, helm-python-sdk, kubernetes-validate (its CLI on
PATH), Python >= 3.11 (tomllib).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CHART = Path("helm/crier")
CI_VALUES = ["default-values.yaml", "full-values.yaml", "sidecar-like-values.yaml", "sentinel-tls-values.yaml",
             "cluster-values.yaml"]
RELEASE = "crier"
NAMESPACE = "crier"

# crier's metrics (src/metrics.rs) and the process collector's.
CRIER_METRICS = {
    "crier_connections", "crier_messages_received_total", "crier_messages_delivered_total",
    "crier_slow_client_disconnects_total", "crier_redis_reconnects_total", "crier_broker_up",
    "crier_subscriptions", "crier_channels", "crier_connections_rejected_total",
    "crier_api_publications_total", "crier_auth_failures_total", "crier_pubsub_lag_seconds",
    "crier_recovered_messages_total", "crier_gaps_total", "crier_build_info",
}
PROCESS_METRICS = {
    "process_cpu_seconds_total", "process_open_fds", "process_max_fds", "process_virtual_memory_bytes",
    "process_resident_memory_bytes", "process_start_time_seconds", "process_threads",
}

failures: list[str] = []


def ok(msg: str) -> None:
    print(f"  ok   {msg}")


def fail(msg: str) -> None:
    print(f"  FAIL {msg}")
    failures.append(msg)


def check(cond: bool, msg: str) -> bool:
    (ok if cond else fail)(msg)
    return cond


def finish() -> None:
    if failures:
        print(f"  {len(failures)} failure(s)")
        sys.exit(1)


def load_or_stop(path: str, parse, error: type, kind: str):
    """The parsed file; a file that does not parse fails the step and ends it."""
    try:
        data = parse(Path(path).read_text())
    except error as e:
        fail(f"{path}: does not parse as {kind}: {e}")
        finish()
        sys.exit(1)
    ok(f"{path}: parses as {kind}")
    return data


# ---------------------------------------------------------------- helpers


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def duration_seconds(text: str) -> float:
    """A humantime duration ("5s", "1h 30m", "500ms") in seconds."""
    units = {
        "ns": 1e-9, "nsec": 1e-9, "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
        "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60,
        "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400,
    }
    clean = re.sub(r"\s+", "", text)
    parts = re.findall(r"([0-9]+)([a-z]+)", clean)
    if not parts or "".join(n + u for n, u in parts) != clean:
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def render(values: dict, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=name, namespace=namespace)


def manifests_of(rendered: dict[str, str]) -> list[dict]:
    docs: list[dict] = []
    for path in sorted(rendered):
        if path.endswith(".yaml") or path.endswith(".yml"):
            docs.extend(load_docs(rendered[path]))
    return docs


def read_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def crier_container(deployment: dict, name: str) -> dict:
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise KeyError(f"no container {name!r} in deployment/{deployment['metadata']['name']}")


def config_toml(docs: list[dict], deployment: dict, container: dict) -> str:
    """The crier.toml the container reads: CRIER_CONFIG's directory, mounted from a ConfigMap."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    path = env.get("CRIER_CONFIG")
    if not path:
        raise KeyError("CRIER_CONFIG not set in the container")
    mount = next(m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm_name = volume["configMap"]["name"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
    key = os.path.relpath(path, mount["mountPath"])
    return cm["data"][key]


# ---------------------------------------------------------------- (c)/(d) kubernetes-validate


def cmd_k8s_validate(args: argparse.Namespace) -> None:
    """kubernetes-validate --strict -k V for every version; CRDs against bundled schemas."""
    import jsonschema

    crd_schemas = {
        ("monitoring.coreos.com/v1", "ServiceMonitor"): json.loads((HERE / "servicemonitor.schema.json").read_text()),
    }
    files = args.files
    objects = []
    for f in files:
        for d in load_docs(Path(f).read_text()):
            objects.append((f, d))
    kinds = sorted({f"{d['kind']} ({d['apiVersion']})" for _, d in objects})
    print(f"  {len(objects)} objects in {len(files)} file(s): {', '.join(kinds)}")
    crds = [(f, d) for f, d in objects if (d["apiVersion"], d["kind"]) in crd_schemas]
    for version in args.versions.split(","):
        proc = subprocess.run(
            ["kubernetes-validate", "--strict", "-k", version, *files],
            capture_output=True, text=True,
        )
        lines = (proc.stdout + proc.stderr).splitlines()
        passed = [l for l in lines if l.startswith("INFO") and " passed " in l]
        bad = []
        skipped = 0
        for line in lines:
            if line.startswith("INFO"):
                continue
            m = re.search(r"Couldn't find schema for kind (\S+) with api version (\S+)", line)
            if line.startswith("WARN") and m and (m.group(2), m.group(1)) in crd_schemas:
                skipped += 1
                continue
            if line.strip():
                bad.append(line)
        expected = len(objects) - len(crds)
        good = proc.returncode == 0 and not bad and len(passed) == expected and skipped == len(crds)
        msg = (f"kubernetes-validate --strict -k {version}: {len(passed)}/{expected} objects passed"
               + (f", {skipped} CRD object(s) not in its schemas (checked below)" if crds else ""))
        if not check(good, msg):
            for line in bad or lines:
                print(f"       {line}")
    for f, d in crds:
        schema = crd_schemas[(d["apiVersion"], d["kind"])]
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(d), key=lambda e: list(e.path))
        check(not errors, f"{d['kind']}/{d['metadata']['name']} ({Path(f).name}) against the bundled minimal CRD schema "
              f"scripts/deploy/servicemonitor.schema.json"
              + "".join(f"\n       {'.'.join(map(str, e.path))}: {e.message}" for e in errors))
    finish()


# ---------------------------------------------------------------- (d) render the chart


def cmd_render(args: argparse.Namespace) -> None:
    """Renders the chart with each CI values file (schema-validated), lints it, writes the manifests."""
    import helm_python

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in CI_VALUES:
        path = CHART / "ci" / name
        values = read_values(path)
        stem = name.removesuffix(".yaml")
        try:
            rendered = render(values)
        except helm_python.HelmError as e:
            fail(f"render {path}: {e}")
            continue
        docs = manifests_of(rendered)
        (out / f"{stem}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        (out / f"{stem}.NOTES.txt").write_text(rendered.get("crier/templates/NOTES.txt", ""))
        kinds = ", ".join(sorted(d["kind"] for d in docs))
        ok(f"render {path} -> {out / (stem + '.yaml')}: {kinds}")
        notes = rendered.get("crier/templates/NOTES.txt", "")
        check(all(s in notes for s in ("port-forward", "/sse", "/ws", "PUBLISH", "FCALL crier_publish")),
              f"NOTES.txt for {name} tells port-forward, /sse, /ws, redis-cli PUBLISH and FCALL crier_publish")
        report = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        check(not report.get("errors") and not problems,
              f"helm lint --strict with {name}" + "".join(f"\n       {m}" for m in problems + report.get("errors", [])))
    finish()


# ---------------------------------------------------------------- (e) schema


def cmd_schema(args: argparse.Namespace) -> None:
    """A values file with a typo must fail to render; so must a bad config key."""
    import helm_python

    schema = json.loads((CHART / "values.schema.json").read_text())
    check(schema.get("additionalProperties") is False, "values.schema.json: additionalProperties false at the top level")
    nested = ["image", "serviceAccount", "service", "autoscaling", "podDisruptionBudget", "serviceMonitor",
              "networkPolicy", "ingress", "redis", "config"]
    check(all(schema["properties"][k].get("additionalProperties") is False for k in nested),
          f"... and for {', '.join(nested)}")
    deeper = {"redis.tls": schema["properties"]["redis"]["properties"]["tls"]}
    config_redis = schema["properties"]["config"]["properties"]["redis"]
    for k in ("tls", "sentinel", "cluster"):
        deeper[f"config.redis.{k}"] = config_redis["properties"][k]
    check(all(s.get("additionalProperties") is False for s in deeper.values()), f"... and for {', '.join(deeper)}")
    cases = {
        "replicaCont: 3\n": "top-level typo (replicaCont)",
        "image:\n  tagg: latest\n": "nested typo (image.tagg)",
        "ingress:\n  enabled: true\n  hosst: x\n": "nested typo (ingress.hosst)",
        "config:\n  limits:\n    queue_sise: 10\n": "crier config typo (config.limits.queue_sise)",
        "config:\n  channels:\n    - pattern: 'a:*'\n      subscribe: everyone\n": "bad enum (channels[].subscribe)",
        "config:\n  channels:\n    - pattern: 'a:*'\n      subscribe: anyone\n      history: {size: 10}\n": "history without ttl",
        "config:\n  shutdown:\n    grace: 5\n": "duration as a number (shutdown.grace)",
        "terminationGracePeriodSeconds: 10\n": "terminationGracePeriodSeconds below grace + drain (template fail)",
        "redis:\n  tls:\n    secretname: x\n": "nested typo (redis.tls.secretname)",
        "config:\n  redis:\n    tls:\n      ca_flie: /x\n": "crier config typo (config.redis.tls.ca_flie)",
        "config:\n  redis:\n    url: 'http://r:6379'\n": "config.redis.url neither redis:// nor rediss://",
        "config:\n  redis:\n    url: 'redis://r:6379'\n    sentinel: {master: m, nodes: ['redis://s:26379']}\n":
            "config.redis.url AND config.redis.sentinel (crier: exit 64)",
        "config:\n  redis:\n    url: 'redis://r:6379'\n    cluster: {nodes: ['redis://c:6379']}\n":
            "config.redis.url AND config.redis.cluster (crier: exit 64)",
        "config:\n  redis:\n    cluster: {nodes: []}\n": "cluster without nodes",
        "config:\n  redis:\n    cluster: {nodes: ['c:6379']}\n": "cluster node that is no redis:// URL",
        "config:\n  redis:\n    sentinel: {nodes: ['redis://s:26379']}\n": "sentinel without master",
        "config:\n  redis:\n    sentinel: {master: m, nodes: []}\n": "sentinel without nodes",
        "config:\n  redis:\n    sentinel: {master: m, nodes: ['s:26379']}\n": "sentinel node that is no redis:// URL",
        "config:\n  redis:\n    tls: {cert_file: /c.pem}\n": "redis.tls.cert_file without key_file",
        "config:\n  redis:\n    sentinel: {master: m, nodes: ['redis://s:26379']}\n  auth:\n    session: {cookie: sid}\n":
            "sentinel + auth.session without its own redis_url",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for text, what in cases.items():
            path = Path(tmp) / "typo-values.yaml"
            path.write_text(text)
            try:
                render(read_values(path))
            except helm_python.HelmError as e:
                first = str(e).strip().splitlines()[-1].strip()
                ok(f"render fails as it must: {what}: {first}")
            else:
                fail(f"render SUCCEEDED with {what}: the schema does not catch it")
    # ... and what is right must render.
    good = {
        "redis:\n  url: ''\n": "redis.url empty (no Redis)",
        "redis:\n  url: 'rediss://r.example.com:6380/0'\n": "redis.url rediss://",
        "config:\n  redis:\n    url: 'rediss://crier@r:6380'\n    username: crier\n    tls: {ca_file: /ca.pem}\n":
            "config.redis.url rediss:// with username and tls.ca_file",
        "config:\n  redis:\n    sentinel: {master: m, nodes: ['redis://s:26379']}\n  auth:\n    session: {cookie: sid, redis_url: 'rediss://s:6380'}\n":
            "sentinel + auth.session with a rediss:// redis_url",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for text, what in good.items():
            path = Path(tmp) / "good-values.yaml"
            path.write_text(text)
            try:
                render(read_values(path))
            except helm_python.HelmError as e:
                fail(f"render FAILED with {what}: {str(e).strip().splitlines()[-1].strip()}")
            else:
                ok(f"renders as it must: {what}")
    finish()


# ---------------------------------------------------------------- (f) Deployment assertions


def assert_deployment(docs: list[dict], label: str, *, container_name: str = "crier", deployment_name: str | None = None,
                      min_replicas: int = 1, checksum: bool = False, generated_configmap: bool = False,
                      quiet: bool = False) -> list[str]:
    """Returns the problems found (empty: all good); prints them unless quiet."""
    problems: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)
        elif not quiet:
            ok(f"{label}: {msg}")

    deployments = [d for d in docs if d["kind"] == "Deployment" and (deployment_name is None or d["metadata"]["name"] == deployment_name)]
    if len(deployments) != 1:
        return [f"{label}: expected one Deployment, found {len(deployments)}"]
    dep = deployments[0]
    pod = dep["spec"]["template"]["spec"]
    c = crier_container(dep, container_name)
    psc = pod.get("securityContext", {}) or {}
    csc = c.get("securityContext", {}) or {}
    eff = lambda key: csc.get(key, psc.get(key))  # noqa: E731
    need(eff("runAsNonRoot") is True, "runAsNonRoot true")
    need(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem true")
    need(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation false")
    need("ALL" in ((csc.get("capabilities") or {}).get("drop") or []), "capabilities drop ALL")
    need((eff("seccompProfile") or {}).get("type") == "RuntimeDefault", "seccompProfile RuntimeDefault")
    need(((c.get("livenessProbe") or {}).get("httpGet") or {}).get("path") == "/healthz", "livenessProbe path /healthz")
    need(((c.get("readinessProbe") or {}).get("httpGet") or {}).get("path") == "/readyz", "readinessProbe path /readyz")
    need("preStop" not in (c.get("lifecycle") or {}), "no preStop hook (crier drains by itself)")
    toml_text = config_toml(docs, dep, c)
    cfg = tomllib.loads(toml_text)
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    shutdown = cfg.get("shutdown", {})
    grace = duration_seconds(env.get("CRIER_SHUTDOWN__GRACE") or shutdown.get("grace", "5s"))
    drain = duration_seconds(env.get("CRIER_SHUTDOWN__DRAIN") or shutdown.get("drain", "10s"))
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    need(isinstance(tgps, int) and tgps > grace + drain,
         f"terminationGracePeriodSeconds {tgps} > shutdown.grace {grace:g}s + shutdown.drain {drain:g}s from its crier.toml")
    listen_port = int(str(cfg.get("listen", "0.0.0.0:8080")).rsplit(":", 1)[1])
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for probe in ("livenessProbe", "readinessProbe"):
        port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
        need(ports.get(port, port) == listen_port, f"{probe} port {port!r} is crier's listen port {listen_port}")
    strategy = dep["spec"].get("strategy") or {}
    if container_name == "crier" or min_replicas > 1:
        ru = strategy.get("rollingUpdate") or {}
        need(strategy.get("type") == "RollingUpdate" and ru.get("maxUnavailable") in (0, "0", "0%") and ru.get("maxSurge") in (1, "1"),
             "rolling update maxUnavailable 0 / maxSurge 1")
    hpa = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    replicas = dep["spec"].get("replicas", 1)
    if hpa:
        need("replicas" not in dep["spec"] and hpa[0]["spec"]["minReplicas"] >= min_replicas,
             f"replicas left to the HPA (minReplicas {hpa[0]['spec']['minReplicas']} >= {min_replicas})")
    else:
        need(replicas >= min_replicas, f"replicas {replicas} >= {min_replicas}")
    annotations = dep["spec"]["template"]["metadata"].get("annotations") or {}
    if checksum:
        need(re.fullmatch(r"[0-9a-f]{64}", str(annotations.get("checksum/config", ""))) is not None,
             "pod annotation checksum/config present (sha256)")
    if generated_configmap:
        vol_cms = [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
        need(any(re.fullmatch(r".+-[a-z0-9]{10}", n) for n in vol_cms),
             f"config from a configMapGenerator (content-hash name {vol_cms}): a config change rolls the pods")
    if not quiet:
        for p in problems:
            fail(f"{label}: {p}")
    return problems


REDIS_TLS_DIR = "/etc/crier/redis-tls"


def assert_redis_tls(docs: list[dict], label: str, *, secret: str, client_cert: bool, container_name: str = "crier",
                     deployment_name: str | None = None, quiet: bool = False) -> list[str]:
    """The Secret `secret` is mounted read-only at /etc/crier/redis-tls, and crier.toml's [redis.tls] files are
    keys of that volume (ca.crt, plus tls.crt / tls.key with a client certificate). Returns the problems found."""
    problems: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)
        elif not quiet:
            ok(f"{label}: {msg}")

    dep = next(d for d in docs if d["kind"] == "Deployment" and (deployment_name is None or d["metadata"]["name"] == deployment_name))
    pod = dep["spec"]["template"]["spec"]
    c = crier_container(dep, container_name)
    volumes = [v for v in pod.get("volumes", []) if (v.get("secret") or {}).get("secretName") == secret]
    mounts = [m for m in c.get("volumeMounts", []) if volumes and m["name"] == volumes[0]["name"]]
    need(len(volumes) == 1 and len(mounts) == 1, f"Secret {secret} is a volume of the pod, mounted once in {container_name}")
    if len(volumes) != 1 or len(mounts) != 1:
        if not quiet:
            for p in problems:
                fail(f"{label}: {p}")
        return problems
    mount, volume = mounts[0], volumes[0]
    need(mount["mountPath"].rstrip("/") == REDIS_TLS_DIR and mount.get("readOnly") is True and "subPath" not in mount,
         f"mounted read-only at {REDIS_TLS_DIR} (no subPath: renewed certificates reach the pod)")
    items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
    want = {"ca.crt"} | ({"tls.crt", "tls.key"} if client_cert else set())
    need(not items or set(items.values()) == want and all(k == p for p, k in items.items()),
         f"the volume holds the keys {sorted(want)}" + (f" (items {sorted(items)})" if items else " (every key)"))
    cfg = tomllib.loads(config_toml(docs, dep, c))
    files = cfg.get("redis", {}).get("tls", {})
    wanted_files = {"ca_file": "ca.crt"} | ({"cert_file": "tls.crt", "key_file": "tls.key"} if client_cert else {})
    need({k: files.get(k) for k in wanted_files} == {k: f"{REDIS_TLS_DIR}/{v}" for k, v in wanted_files.items()},
         f"crier.toml [redis.tls] {', '.join(f'{k} = {REDIS_TLS_DIR}/{v}' for k, v in wanted_files.items())}")
    need(client_cert or not ({"cert_file", "key_file"} & set(files)), "no client certificate without one in the Secret")
    if not quiet:
        for p in problems:
            fail(f"{label}: {p}")
    return problems


def assert_sentinel(docs: list[dict], label: str, *, deployment_name: str | None = None) -> None:
    """With [redis.sentinel] crier.toml has no redis.url (crier refuses both), and every node is a Redis URL."""
    dep = next(d for d in docs if d["kind"] == "Deployment" and (deployment_name is None or d["metadata"]["name"] == deployment_name))
    cfg = tomllib.loads(config_toml(docs, dep, crier_container(dep, "crier")))
    redis = cfg.get("redis", {})
    sentinel = redis.get("sentinel", {})
    check(bool(sentinel.get("master")) and bool(sentinel.get("nodes"))
          and all(re.match(r"rediss?://", n) for n in sentinel["nodes"]) and "url" not in redis,
          f"{label}: crier.toml has [redis.sentinel] (master {sentinel.get('master')!r}, "
          f"{len(sentinel.get('nodes', []))} node(s)) and no redis.url")
    check("password" not in redis and "password" not in sentinel,
          f"{label}: no password in crier.toml (a ConfigMap): they come from the Secret")


def checksum_of(values: dict) -> str:
    docs = manifests_of(render(values))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    return dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def cmd_deployments(args: argparse.Namespace) -> None:
    """Security, probes, shutdown and rollout settings of every crier Deployment."""
    import helm_python

    rendered_dir = Path(args.rendered)
    for name, min_replicas in (("default-values", 2), ("full-values", 2), ("sidecar-like-values", 1),
                               ("sentinel-tls-values", 2), ("cluster-values", 2)):
        docs = load_docs((rendered_dir / f"{name}.yaml").read_text())
        assert_deployment(docs, f"chart/{name}", min_replicas=min_replicas, checksum=True)
    for path, kw in ((args.kustomize_base, dict(min_replicas=2, generated_configmap=True)),
                     (args.kustomize_sidecar, dict(container_name="crier", deployment_name="myapp", generated_configmap=True)),
                     (args.kustomize_redis_tls, dict(min_replicas=2, generated_configmap=True))):
        docs = load_docs(Path(path).read_text())
        assert_deployment(docs, Path(path).stem, **kw)

    # Redis over TLS and Sentinel: the CA Secret mounted read-only where crier.toml says.
    docs = load_docs((rendered_dir / "sentinel-tls-values.yaml").read_text())
    assert_redis_tls(docs, "chart/sentinel-tls-values", secret="crier-redis-tls", client_cert=True)
    assert_sentinel(docs, "chart/sentinel-tls-values")
    docs = load_docs(Path(args.kustomize_redis_tls).read_text())
    stem = Path(args.kustomize_redis_tls).stem
    assert_redis_tls(docs, stem, secret="crier-redis-tls", client_cert=False)
    assert_sentinel(docs, stem)
    docs = manifests_of(render({"redis": {"tls": {"secretName": "redis-ca"}}}))
    assert_redis_tls(docs, "chart/redis.tls.secretName only", secret="redis-ca", client_cert=False)
    docs = manifests_of(render({}))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    cfg = tomllib.loads(config_toml(docs, dep, crier_container(dep, "crier")))
    check(not any("secret" in v for v in dep["spec"]["template"]["spec"]["volumes"]) and "tls" not in cfg.get("redis", {}),
          "chart defaults: no Secret volume, no [redis.tls]")
    docs = manifests_of(render({"redis": {"tls": {"secretName": "redis-ca", "clientCertificate": True}},
                                "config": {"redis": {"tls": {"ca_file": "/etc/ssl/certs/ca-certificates.crt"}}}}))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    files = tomllib.loads(config_toml(docs, dep, crier_container(dep, "crier")))["redis"]["tls"]
    check(files == {"ca_file": "/etc/ssl/certs/ca-certificates.crt", "cert_file": f"{REDIS_TLS_DIR}/tls.crt",
                    "key_file": f"{REDIS_TLS_DIR}/tls.key"},
          f"config.redis.tls.ca_file wins over redis.tls.secretName's; cert_file/key_file still from the Secret: {files}")
    docs = manifests_of(render({"redis": {"url": "redis://r:6379"}, "config": {"redis": {"url": "rediss://s:6380"}}}))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    url = tomllib.loads(config_toml(docs, dep, crier_container(dep, "crier")))["redis"].get("url")
    check(url == "rediss://s:6380", f"config.redis.url wins over redis.url ({url})")
    # The assertions catch what they are for: mutants of the rendered Deployment.
    for what, mutate in (
        ("mount not read-only", lambda c, pod: c["volumeMounts"][-1].pop("readOnly")),
        ("mounted elsewhere", lambda c, pod: c["volumeMounts"][-1].update(mountPath="/etc/redis-tls")),
        ("no tls.key in the volume", lambda c, pod: pod["volumes"][-1]["secret"]["items"].pop()),
        ("Secret not mounted", lambda c, pod: c["volumeMounts"].pop()),
    ):
        docs = load_docs((rendered_dir / "sentinel-tls-values.yaml").read_text())
        dep = next(d for d in docs if d["kind"] == "Deployment")
        mutate(crier_container(dep, "crier"), dep["spec"]["template"]["spec"])
        problems = assert_redis_tls(docs, "mutant", secret="crier-redis-tls", client_cert=True, quiet=True)
        check(bool(problems), f"mutant caught ({what}): " + ("; ".join(f"not {p}" for p in problems) or "NOT CAUGHT"))

    # The checksum follows the configuration, and only it.
    base = checksum_of({})
    check(base == checksum_of({}), "checksum/config is stable: same values, same checksum")
    for values, what in (({"config": {"limits": {"queue_size": 512}}}, "config.limits.queue_size"),
                         ({"config": {"channels": [{"pattern": "x:*", "subscribe": "anyone", "history": {"size": 10, "ttl": "1m"}}]}},
                          "config.channels"),
                         ({"redis": {"url": "redis://other:6379"}}, "redis.url"),
                         ({"redis": {"tls": {"secretName": "redis-ca"}}}, "redis.tls.secretName")):
        check(checksum_of(values) != base, f"checksum/config changes when {what} changes (pods roll)")
    check(checksum_of({"replicaCount": 5}) == base, "checksum/config does not change with replicaCount")

    # terminationGracePeriodSeconds follows shutdown.grace + drain.
    docs = manifests_of(render({"config": {"shutdown": {"grace": "20s", "drain": "1m"}}}))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    check(dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 95,
          "terminationGracePeriodSeconds computed from config: grace 20s + drain 1m + margin 15s = 95")

    # The assertions catch what they are for: mutants must be rejected.
    mutants = {
        "livenessProbe on /readyz": {"livenessProbe": {"httpGet": {"path": "/readyz", "port": "http"}}},
        "readinessProbe on /ready": {"readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}},
        "readOnlyRootFilesystem false": {"securityContext": {"readOnlyRootFilesystem": False}},
        "runAsNonRoot false": {"podSecurityContext": {"runAsNonRoot": False}, "securityContext": {"runAsNonRoot": False}},
        "terminationGracePeriodSeconds 16 with a 1m drain": {"terminationGracePeriodSeconds": 16,
                                                              "config": {"shutdown": {"drain": "1m"}}},
    }
    for what, values in mutants.items():
        try:
            docs = manifests_of(render(values))
        except helm_python.HelmError as e:
            ok(f"mutant rejected at render ({what}): {str(e).strip().splitlines()[-1].strip()}")
            continue
        problems = assert_deployment(docs, "mutant", min_replicas=2, checksum=True, quiet=True)
        check(bool(problems), f"mutant caught ({what}): " + ("; ".join(f"not {p}" for p in problems) or "NOT CAUGHT"))
    finish()


# ---------------------------------------------------------------- (g) crier.toml


# The sizing rule (docs/deployment.md, "Sizing"): a budget per connection
# (crier's RSS, about 2.5-3 KiB per idle connection, docs/performance.md;
# the kernel's socket memory, about 3.5 KiB per idle TCP socket; headroom
# for messages in flight) and for the process
# itself (about 8 MiB idle, the rest for messages in flight). Step k keeps
# every document on these figures.
KIB_PER_CONNECTION = 16
PROCESS_MIB = 32
DEFAULT_MAX_CONNECTIONS = 100_000  # src/config/mod.rs


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (512Mi, 1Gi, 500M, 1048576) in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    text = str(text)
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(float(text))


def check_memory(label: str, cfg: dict, container: dict) -> None:
    """limits.max_connections fits the container's memory limit: past it crier answers 503 rather than being
    OOM-killed with every client on board."""
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    if limit is None:
        print(f"  SKIP {label}: no memory limit, nothing to fit max_connections to")
        return
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    conns = cfg.get("limits", {}).get("max_connections", DEFAULT_MAX_CONNECTIONS)
    if env.get("CRIER_LIMITS__MAX_CONNECTIONS") is not None:
        conns = int(env["CRIER_LIMITS__MAX_CONNECTIONS"])
    need = conns * KIB_PER_CONNECTION * 1024 + PROCESS_MIB * (1 << 20)
    check(need <= quantity_bytes(limit),
          f"{label}: max_connections {conns} x {KIB_PER_CONNECTION} KiB + {PROCESS_MIB} MiB = {need >> 20} MiB "
          f"fits the memory limit {limit}")


INT_KEYS = {
    ("limits", k) for k in ("queue_size", "max_connections", "max_subscriptions_per_connection", "max_message_bytes",
                            "max_connections_per_user", "max_connections_per_ip", "commands_per_second", "command_burst")
} | {("publish", "max_body_bytes")}


def throwaway_tls_files(directory: Path) -> dict[str, Path] | None:
    """A CA and a leaf certificate signed by it, with its key, as PEM files (openssl), for check-config to read."""
    run = lambda *cmd: subprocess.run(["openssl", *cmd], cwd=directory, capture_output=True, text=True)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    steps = (["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=check-deploy throwaway CA", "-days", "2"],
             ["req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=crier"],
             ["x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", "1", "-days", "2",
              "-out", "tls.crt"])
    for cmd in steps:
        try:
            proc = run(*cmd)
        except FileNotFoundError:
            fail("openssl is needed to make throwaway TLS files for crier check-config")
            return None
        if proc.returncode != 0:
            fail(f"openssl {' '.join(cmd)}: {proc.stderr.strip()}")
            return None
    return {"ca_file": directory / "ca.crt", "cert_file": directory / "tls.crt", "key_file": directory / "tls.key"}


def find_crier() -> Path | None:
    """The most recently built of the release and debug binaries, in ./target or $CARGO_TARGET_DIR."""
    dirs = [Path("target")] + ([Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else [])
    built = [d / p / "crier" for d in dirs for p in ("release", "debug")]
    built = [p for p in built if p.is_file() and os.access(p, os.X_OK)]
    return max(built, key=lambda p: p.stat().st_mtime, default=None)


def check_config_env(cfg: dict, tls_files: dict[str, Path] | None) -> tuple[dict[str, str], dict[str, str]]:
    """The environment crier check-config runs in for this crier.toml, and the placeholder passwords in it."""
    # A clean environment: only the secrets the Secret would provide, as
    # placeholders, when the file enables a feature that needs them.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    jwt = cfg.get("auth", {}).get("jwt")
    if jwt is not None and not any(k in jwt for k in ("secret", "secret_file", "public_key_file")):
        env["CRIER_AUTH__JWT__SECRET"] = "placeholder-jwt-secret-of-32-bytes-or-more"
    session = cfg.get("auth", {}).get("session")
    if session is not None and session.get("signing", "express") == "express" and not session.get("secrets"):
        env["CRIER_AUTH__SESSION__SECRETS"] = '["placeholder-session-secret"]'
    # Passwords of an ACL user and of the sentinels come from the Secret
    # too; giving them checks that crier takes those variable names.
    redis = cfg.get("redis", {})
    passwords = {}
    if redis.get("username") and "password" not in redis:
        passwords["CRIER_REDIS__PASSWORD"] = "placeholder-redis-password"
    if "sentinel" in redis and "password" not in redis["sentinel"]:
        passwords["CRIER_REDIS__SENTINEL__PASSWORD"] = "placeholder-sentinel-password"
    env |= passwords
    # crier check-config reads the [redis.tls] files, which exist only in
    # the pod (the Secret's mount). The simplest robust way: a throwaway
    # CA and client certificate made with openssl, given as
    # CRIER_REDIS__TLS__* variables, which win over the file like any
    # CRIER_* variable; the rendered paths themselves are checked against
    # the Deployment's mount in step f.
    for key in redis.get("tls", {}):
        if key in ("ca_file", "cert_file", "key_file") and tls_files:
            env[f"CRIER_REDIS__TLS__{key.upper()}"] = str(tls_files[key])
    return env, passwords


def cmd_toml(args: argparse.Namespace) -> None:
    """Every crier.toml parses with tomllib, integers are integers, and crier check-config accepts it."""
    rendered_dir = Path(args.rendered)
    tomls: list[tuple[str, str]] = []
    containers: dict[str, dict] = {}
    for name in CI_VALUES:
        stem = name.removesuffix(".yaml")
        docs = load_docs((rendered_dir / f"{stem}.yaml").read_text())
        dep = next(d for d in docs if d["kind"] == "Deployment")
        containers[f"chart/{stem}"] = crier_container(dep, "crier")
        tomls.append((f"chart/{stem}", config_toml(docs, dep, containers[f"chart/{stem}"])))
    for path, dep_name, container in ((args.kustomize_base, None, "crier"), (args.kustomize_sidecar, "myapp", "crier"),
                                      (args.kustomize_redis_tls, None, "crier")):
        docs = load_docs(Path(path).read_text())
        dep = next(d for d in docs if d["kind"] == "Deployment" and (dep_name is None or d["metadata"]["name"] == dep_name))
        containers[Path(path).stem] = crier_container(dep, container)
        tomls.append((f"{Path(path).stem}", config_toml(docs, dep, containers[Path(path).stem])))
    # Example crier.toml files kept out of the kustomization.
    for example in sorted(Path("deploy").glob("crier.*.example.toml")):
        tomls.append((str(example), example.read_text()))
    # The renderer with every kind of value, including ones no CI file has.
    odd = {"config": {"allowed_origins": ["https://a.example.com"], "dev": False,
                      "log": {"level": 'crier=debug,"quoted"\\back'},
                      "channels": [{"pattern": "h:*", "subscribe": "anyone", "history": {"size": 10000, "ttl": "0s"}}],
                      "limits": {"max_connections": 1000000, "queue_size": 1}}}
    docs = manifests_of(render(odd))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    tomls.append(("chart/odd-values", config_toml(docs, dep, crier_container(dep, "crier"))))

    crier = find_crier()
    if crier is None:
        print("  SKIP crier check-config: no target/release/crier or target/debug/crier built (cargo build to enable)")
    else:
        print(f"  using {crier} for crier check-config")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tls_files = None

    def has_tls(text: str) -> bool:
        try:
            return "tls" in tomllib.loads(text).get("redis", {})
        except tomllib.TOMLDecodeError:
            return False  # reported below

    if crier is not None and any(has_tls(text) for _, text in tomls):
        (out / "tls").mkdir(exist_ok=True)
        tls_files = throwaway_tls_files(out / "tls")
        if tls_files:
            print(f"  made a throwaway CA and client certificate with openssl in {out / 'tls'} for [redis.tls]")
    for label, text in tomls:
        try:
            cfg = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            fail(f"{label}: crier.toml does not parse: {e}")
            continue
        bad_ints = [f"{t}.{k}={cfg[t][k]!r}" for t, k in INT_KEYS if t in cfg and k in cfg[t] and type(cfg[t][k]) is not int]
        for i, ch in enumerate(cfg.get("channels", [])):
            if "history" in ch and type(ch["history"].get("size")) is not int:
                bad_ints.append(f"channels[{i}].history.size={ch['history'].get('size')!r}")
        n_hist = sum(1 for ch in cfg.get("channels", []) if "history" in ch)
        check(not bad_ints, f"{label}: crier.toml parses (tomllib), {len(cfg.get('channels', []))} channel rule(s), "
              f"{n_hist} with history, integers are integers" + (f": {bad_ints}" if bad_ints else ""))
        if label in containers:
            check_memory(label, cfg, containers[label])
        if label == "chart/odd-values":
            check(cfg["log"]["level"] == 'crier=debug,"quoted"\\back' and cfg["limits"]["max_connections"] == 1000000,
                  f"{label}: quotes, backslashes and large integers survive the TOML renderer")
        if crier is None:
            continue
        file = out / (label.replace("/", "-") + ".toml")
        file.write_text(text)
        redis = cfg.get("redis", {})
        tls = redis.get("tls", {})
        if tls and tls_files is None:
            fail(f"{label}: no throwaway TLS files for [redis.tls]: crier check-config not run")
            continue
        env, passwords = check_config_env(cfg, tls_files)
        proc = subprocess.run([str(crier), "check-config", "--config", str(file)], env=env, capture_output=True, text=True)
        given = sorted(k for k in env if k.startswith("CRIER_"))
        check(proc.returncode == 0,
              f"{label}: crier check-config exit {proc.returncode}"
              + (f" (with placeholder {', '.join(given)}, as from the Secret or the mounted files)" if given else "")
              + ("" if proc.returncode == 0 else f": {proc.stderr.strip()}"))
        if proc.returncode == 0 and passwords:
            check(not any(v in proc.stdout for v in passwords.values()) and proc.stdout.count('"<redacted>"') >= len(passwords),
                  f"{label}: check-config prints {', '.join(sorted(passwords))} as <redacted>")
        if proc.returncode == 0 and "sentinel" in redis:
            # The Secret must not also hold CRIER_REDIS__URL: crier takes a url
            # or [redis.sentinel], never both, and refuses to start.
            both = subprocess.run([str(crier), "check-config", "--config", str(file)],
                                  env=env | {"CRIER_REDIS__URL": "redis://redis:6379"}, capture_output=True, text=True)
            check(both.returncode == 64 and "redis.sentinel" in both.stderr,
                  f"{label}: with CRIER_REDIS__URL also set (a Secret left over from a url setup), crier check-config "
                  f"exit {both.returncode} (must be 64): {both.stderr.strip().splitlines()[0] if both.stderr.strip() else ''}")
    finish()


# ---------------------------------------------------------------- (j) a user's values: ingress hosts, NOTES, render-chart

INGRESS_PATHS = ["/sse", "/ws", "/api/publish", "/api/presence", "/app", "/apps"]


def ingress_rules(docs: list[dict]) -> list[tuple[str | None, list[tuple[str, str]]]]:
    ingresses = [d for d in docs if d["kind"] == "Ingress"]
    if len(ingresses) != 1:
        return []
    return [(r.get("host"), [(p["path"], p["pathType"]) for p in r["http"]["paths"]]) for r in ingresses[0]["spec"].get("rules") or []]


def redis_cli_lines(notes: str) -> list[str]:
    return [line.strip() for line in notes.splitlines() if "redis-cli" in line and ("PUBLISH" in line or "FCALL" in line)]


def cmd_user_values(args: argparse.Namespace) -> None:
    """What a user's values file gets: the default ingress paths on hosts given without paths, and a
    redis-cli hint with --tls for a rediss:// Redis."""
    six = [(p, "Prefix") for p in INGRESS_PATHS]
    cases = {
        "ingress:\n  enabled: true\n  hosts: [events.example.org]\n": [("events.example.org", six)],
        "ingress:\n  enabled: true\n  hosts:\n    - host: a.example.org\n    - b.example.org\n":
            [("a.example.org", six), ("b.example.org", six)],
        "ingress:\n  enabled: true\n  hosts: []\n": [(None, six)],
        # Values written for the chart before: hosts that list their paths keep exactly those.
        "ingress:\n  enabled: true\n  hosts:\n    - host: c.example.org\n      paths:\n        - path: /sse\n"
        "          pathType: Prefix\n        - path: /ws\n          pathType: Exact\n":
            [("c.example.org", [("/sse", "Prefix"), ("/ws", "Exact")])],
        "ingress:\n  enabled: true\n  paths: [/sse]\n  hosts: [d.example.org, {host: e.example.org, paths: [/ws]}]\n":
            [("d.example.org", [("/sse", "Prefix")]), ("e.example.org", [("/ws", "Prefix")])],
    }
    import helm_python

    for text, want in cases.items():
        values = yaml.safe_load(text)
        try:
            got = ingress_rules(manifests_of(render(values)))
        except helm_python.HelmError as e:
            fail(f"ingress {json.dumps(values['ingress'], separators=(',', ':'))} does not render: "
                 f"{str(e).strip().splitlines()[-1].strip()}")
            continue
        check(got == want, f"ingress {json.dumps(values['ingress'], separators=(',', ':'))} -> "
              + "; ".join(f"{h or '(any host)'}: {' '.join(p for p, _ in ps)}" for h, ps in got)
              + ("" if got == want else f" (want {want})"))
    defaults = read_values(CHART / "values.yaml")["ingress"]
    check([(p["path"], p.get("pathType", "Prefix")) for p in defaults.get("paths", [])] == six,
          f"values.yaml ingress.paths is the six paths {' '.join(INGRESS_PATHS)}")
    # NOTES: redis-cli gets --tls (and the CA, the client certificate) for rediss://, and not for redis://.
    notes_cases = (
        ({"redis": {"url": "rediss://r.example.com:6380"}}, "--tls", None),
        ({"redis": {"url": "rediss://r.example.com:6380", "tls": {"secretName": "redis-ca"}}}, "--tls --cacert ca.crt", "redis-ca"),
        ({"redis": {"url": "rediss://r:6380", "tls": {"secretName": "redis-ca", "clientCertificate": True}}},
         "--tls --cacert ca.crt --cert tls.crt --key tls.key", "redis-ca"),
        ({"config": {"redis": {"url": "rediss://r:6380", "tls": {"ca_file": "/etc/ssl/ca.pem"}}}}, "--tls --cacert ca.crt", None),
        ({"config": {"redis": {"sentinel": {"master": "m", "nodes": ["rediss://s:26379"]}}}}, "--tls", None),
        ({"redis": {"url": "redis://redis:6379"}}, "", None),
    )
    for values, options, secret in notes_cases:
        notes = render(values)["crier/templates/NOTES.txt"]
        lines = redis_cli_lines(notes)
        want = f"redis-cli {options} ".replace("  ", " ")
        good = len(lines) == 2 and all(l.startswith(want) and (options or "--tls" not in l) for l in lines)
        if secret:
            good = good and f"get secret {secret} " in notes
        check(good, f"NOTES with {json.dumps(values, separators=(',', ':'))}: `{want.strip()} PUBLISH|FCALL`"
              + (f", how to get ca.crt from Secret {secret}" if secret else "")
              + ("" if good else f" (found {lines})"))
    finish()


def deep_merge(base: dict, over: dict) -> dict:
    """Helm's merge of values files: maps merge key by key, anything else (lists too) is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cmd_render_values(args: argparse.Namespace) -> None:
    """scripts/render-chart: the chart rendered with the user's values files, manifests on stdout."""
    import helm_python

    values: dict = {}
    for f in args.values:
        try:
            values = deep_merge(values, read_values(Path(f)))
        except (OSError, yaml.YAMLError) as e:
            print(f"render-chart: {f}: {e}", file=sys.stderr)
            sys.exit(1)
    try:
        rendered = render(values, name=args.name, namespace=args.namespace)
    except helm_python.HelmError as e:
        print(f"render-chart: the chart does not render with {', '.join(args.values)}:\n{str(e).strip()}", file=sys.stderr)
        sys.exit(1)
    notes = ""
    for path in sorted(rendered):
        text = rendered[path]
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        if not text.strip() or not path.endswith((".yaml", ".yml")):
            continue
        sys.stdout.write(f"---\n# Source: {path}\n{text.strip()}\n")
    sys.stdout.flush()
    docs = manifests_of(rendered)
    kinds = ", ".join(sorted(d["kind"] for d in docs))
    print(f"render-chart: {len(docs)} objects ({kinds}), release {args.name}, namespace {args.namespace}", file=sys.stderr)
    if args.notes:
        print(notes, file=sys.stderr)
    if args.no_check_config:
        return
    crier = find_crier() or (Path(shutil.which("crier")) if shutil.which("crier") else None)
    if crier is None:
        print("render-chart: crier check-config skipped: no crier binary (cargo build, or crier on PATH)", file=sys.stderr)
        return
    dep = next(d for d in docs if d["kind"] == "Deployment")
    text = config_toml(docs, dep, crier_container(dep, "crier"))
    cfg = tomllib.loads(text)
    with tempfile.TemporaryDirectory() as tmp:
        tls_files = throwaway_tls_files(Path(tmp)) if cfg.get("redis", {}).get("tls") else None
        env, _ = check_config_env(cfg, tls_files)
        file = Path(tmp) / "crier.toml"
        file.write_text(text)
        proc = subprocess.run([str(crier), "check-config", "--config", str(file)], env=env, capture_output=True, text=True)
    given = sorted(k for k in env if k.startswith("CRIER_"))
    print(f"render-chart: {crier} check-config on the rendered crier.toml: exit {proc.returncode}"
          + (f" (with placeholder {', '.join(given)}, as from the Secret or the mounted files)" if given else "")
          + ("" if proc.returncode == 0 else f"\n{proc.stderr.strip()}"), file=sys.stderr)
    if proc.returncode != 0:
        sys.exit(proc.returncode)


def cmd_render_chart_output(args: argparse.Namespace) -> None:
    """What scripts/render-chart printed for the sample values file (see step j)."""
    docs = load_docs(Path(args.stdout).read_text())
    err = Path(args.stderr).read_text()
    kinds = sorted(d["kind"] for d in docs)
    check({"Deployment", "Service", "ConfigMap", "Ingress"} <= set(kinds), f"render-chart printed the manifests: {', '.join(kinds)}")
    check(all(d["metadata"].get("namespace") in (None, args.namespace) for d in docs)
          and all(d["metadata"]["name"].startswith(args.name) for d in docs),
          f"... for release {args.name} in namespace {args.namespace}")
    rules = ingress_rules(docs)
    check(rules == [(args.host, [(p, "Prefix") for p in INGRESS_PATHS])],
          f"... with the sample's host {args.host} and the six default paths ({rules})")
    if "check-config" in err and "skipped" not in err:
        check("check-config on the rendered crier.toml: exit 0" in err, "... and crier check-config accepted its crier.toml")
    else:
        print("  SKIP render-chart ran no crier check-config (no crier binary built)")
    finish()


# ---------------------------------------------------------------- (k) one memory-per-connection figure family

# The one figure family, stated everywhere memory per connection is: crier's
# measured RSS per idle connection (docs/performance.md, issue 26: 1.5–2 KiB,
# WebSocket or SSE), the kernel's socket memory that RSS does not show
# (about 3.5 KiB per idle TCP socket), the two together (about 5.5 KiB), and
# the sizing budget KIB_PER_CONNECTION (with PROCESS_MIB for the process:
# see check_memory).
MEMORY_FIGURES = {"1.5–2", "3.5", "5.5", str(KIB_PER_CONNECTION)}
MEMORY_FILES = ["README.md", "docs/*.md", "deploy/**/*", "helm/crier/**/*"]
# docs/performance.md's dated sections record what earlier builds measured:
# history, not sizing. Their headings carry the date or say so.
HISTORY_HEADING = re.compile(r"^#{2,}\s.*(\(\d{4}-\d{2}-\d{2}|Changes measured)", re.M)
NUM = r"(\d+(?:\.\d+)?(?:\s*[–-]\s*\d+(?:\.\d+)?)?)"
MEMORY_PATTERNS = [
    # "5 KiB per WebSocket", "3.5 KiB per idle SSE connection", "16 KiB per connection", "2–4 KiB per idle TCP socket"
    re.compile(NUM + r"\s*KiB\s+(?:of\s+\S+(?:\s+\S+)?\s+)?(?:each\s+|a\s+|per\s+)(?:\S+\s+){0,3}?"
               r"(?:connections?|WebSockets?|SSE|Pusher|sockets?|clients?|streams?)\b", re.I),
    # "20,000 x 17 KiB", "max_connections × 15 KiB", "20,000 connections x 17 KiB"
    re.compile(r"(?:\d[\d,]*|max_connections|connections)\s*(?:connections\s*)?(?:x|×|\*)\s*" + NUM + r"\s*KiB", re.I),
    # "sized at 17 KiB", "budgets 15 KiB", "budget of 16 KiB"
    re.compile(r"\b(?:sized|sizing|budget(?:s|ed)?)\s+(?:at\s+|of\s+|on\s+)?" + NUM + r"\s*KiB", re.I),
]


def memory_figures(text: str) -> list[tuple[str, str]]:
    """(figure, the words around it) for every per-connection memory figure in a text."""
    flat = re.sub(r"\s*\n\s*(?:#\s*|//\s*)?", " ", text)  # wrapped lines and comment markers: one line
    found = {}
    for pattern in MEMORY_PATTERNS:
        for m in pattern.finditer(flat):
            figure = re.sub(r"\s*[–-]\s*", "–", m.group(1))
            found.setdefault(m.start(1), (figure, flat[max(0, m.start() - 30):m.end() + 10].strip()))
    return [found[k] for k in sorted(found)]


def cmd_memory_figures(args: argparse.Namespace) -> None:
    """grep finds one memory-per-connection figure family in README, docs, deploy/ and helm/."""
    # The check's own patterns first: they must catch the old families and leave unrelated sizes alone.
    caught = ["about 12 KiB per WebSocket and 17 KiB per SSE connection", "About 10 KiB per WebSocket, 23 KiB per SSE connection",
              "20,000 x 17 KiB = 332 MiB", "*max_connections × 15 KiB + 32 MiB", "The sizing rule below budgets 15 KiB",
              "sized at 17 KiB for queued messages", "3,000 x 17 KiB (an SSE", "20,000 connections x 17 KiB"]
    ignored = ["a request head of at most 32 KiB", "a query string of at most 16 KiB, `events` filters of at most 32",
               "WebSocket frame | `limits.max_message_bytes` (64 KiB)", "WebSocket read buffer 4 KiB instead of 128 KiB",
               "--maxmemory 200mb", "over 64 KiB | **503**"]
    missed = [t for t in caught if not memory_figures(t)]
    wrong = [t for t in ignored if memory_figures(t)]
    check(not missed and not wrong, f"the patterns catch {len(caught)} per-connection statements of the old families "
          f"and none of {len(ignored)} unrelated sizes" + (f": missed {missed}, wrongly caught {wrong}" if missed or wrong else ""))
    files = sorted({p for g in MEMORY_FILES for p in Path(".").glob(g) if p.is_file() and p.suffix in
                    (".md", ".yaml", ".yml", ".toml", ".json", ".txt", ".tpl")})
    seen: dict[str, int] = {}
    for f in files:
        text = f.read_text()
        if f.as_posix() == "docs/performance.md":
            parts = re.split(r"(?=^#{2,}\s)", text, flags=re.M)
            text = "".join(p for p in parts if not HISTORY_HEADING.match(p))
        for figure, where in memory_figures(text):
            seen[figure] = seen.get(figure, 0) + 1
            if figure not in MEMORY_FIGURES:
                fail(f"{f}: {figure} KiB per connection is not of the family "
                     f"{', '.join(sorted(MEMORY_FIGURES))} KiB: ...{where}...")
    check(not [x for x in failures if "is not of the family" in x],
          f"{len(files)} files: every per-connection memory figure is one of {', '.join(sorted(MEMORY_FIGURES))} KiB "
          f"(found {', '.join(f'{k} KiB x{v}' for k, v in sorted(seen.items()))})")
    rule = f"{KIB_PER_CONNECTION} KiB per connection"
    sizing = Path("docs/deployment.md").read_text()
    check(rule in re.sub(r"\s+", " ", sizing) and f"{PROCESS_MIB} MiB" in sizing,
          f"docs/deployment.md states the sizing rule: {rule} + {PROCESS_MIB} MiB (what step g checks)")
    for f in ("README.md", "docs/operations.md", "docs/performance.md", "deploy/crier.toml", "deploy/deployment.yaml",
              "helm/crier/values.yaml"):
        check(str(KIB_PER_CONNECTION) in [fig for fig, _ in memory_figures(Path(f).read_text())],
              f"{f} gives the {KIB_PER_CONNECTION} KiB budget")
    finish()


# ---------------------------------------------------------------- (i) dashboard

PROMQL_WORDS = {
    # aggregations and keywords
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    # functions used or likely
    "rate", "irate", "increase", "delta", "idelta", "deriv", "vector", "scalar", "abs", "ceil", "floor", "round",
    "clamp_min", "clamp_max", "clamp", "histogram_quantile", "label_replace", "label_join", "time", "timestamp",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "absent", "absent_over_time", "changes", "resets", "sort", "sort_desc",
    # Grafana template functions
    "label_values", "query_result", "label_names", "metrics",
}


def exprs_of(dashboard: dict) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets", []) or []:
                if "expr" in t:
                    found.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []) or [])

    walk(dashboard.get("panels", []))
    for v in dashboard.get("templating", {}).get("list", []):
        q = v.get("query")
        if v.get("type") == "query":
            found.append((f"variable {v['name']}", q["query"] if isinstance(q, dict) else q))
    return found


def metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, unknown identifiers) of a PromQL expression."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    e = re.sub(r"\{[^}]*\}", "", e)                         # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                        # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", e)  # label lists
    e = re.sub(r"\$\w+", "", e)                             # Grafana variables
    e = re.sub(r"label_values\(([^,()]+),\s*\w+\)", r"label_values(\1)", e)
    idents = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e))
    idents = {i for i in idents if not re.fullmatch(r"[0-9.]+[eE]?", i)}
    words = {i for i in idents if i in PROMQL_WORDS}
    names = idents - words
    return names, {n for n in names if n not in CRIER_METRICS | PROCESS_METRICS}


def cmd_dashboard(args: argparse.Namespace) -> None:
    dashboard = load_or_stop(args.file, json.loads, json.JSONDecodeError, "JSON")
    inputs = [i for i in dashboard.get("__inputs", []) if i.get("name") == "DS_PROMETHEUS" and i.get("pluginId") == "prometheus"]
    check(bool(inputs), "has a DS_PROMETHEUS datasource input (prometheus)")
    text = json.dumps(dashboard)
    uids = set(re.findall(r'"uid": "([^"]*)"', text)) - {"crier-overview", "-- Grafana --"}
    check(uids == {"${DS_PROMETHEUS}"}, f"every panel and target uses datasource ${{DS_PROMETHEUS}} (found {sorted(uids)})")
    used: set[str] = set()
    for where, expr in exprs_of(dashboard):
        names, unknown = metric_names(expr)
        used |= names
        if unknown or not names:
            fail(f"panel {where!r}: {expr!r}: " + (f"unknown metric(s) {sorted(unknown)}" if unknown else "queries no metric"))
    check(not [f for f in failures if f.startswith("panel ")],
          f"{len(exprs_of(dashboard))} queries, every metric one of crier's: {len(used)} used")
    wanted = {"crier_connections", "crier_messages_delivered_total", "crier_messages_received_total",
              "crier_slow_client_disconnects_total", "crier_auth_failures_total", "crier_redis_reconnects_total",
              "crier_broker_up", "crier_pubsub_lag_seconds", "crier_recovered_messages_total", "crier_gaps_total",
              "crier_subscriptions", "crier_channels", "process_resident_memory_bytes", "process_cpu_seconds_total"}
    check(wanted <= used, "covers connections, deliveries, received, drops, auth failures, Redis, lag, history, "
          "subscriptions/channels, memory/CPU" + (f" (missing {sorted(wanted - used)})" if wanted - used else ""))
    finish()


# ---------------------------------------------------------------- compose


def cmd_compose(args: argparse.Namespace) -> None:
    compose = load_or_stop(args.file, yaml.safe_load, yaml.YAMLError, "YAML")
    services = compose.get("services", {})
    check({"crier", "redis"} <= set(services), "services crier and redis")
    crier = services.get("crier", {})
    check(crier.get("build", {}).get("dockerfile") == "Dockerfile", "crier is built from the repository's Dockerfile")
    check("CRIER_REDIS__URL" in (crier.get("environment") or {}), "crier points at the compose Redis (CRIER_REDIS__URL)")
    grace = duration_seconds(str(crier.get("stop_grace_period", "10s")))
    check(grace > 15, f"stop_grace_period {grace:g}s > shutdown.grace + shutdown.drain (15s)")
    check(crier.get("read_only") is True and str(crier.get("user", "")).split(":")[0] not in ("", "0", "root"),
          "crier runs read-only and non-root")
    for mount in crier.get("volumes", []):
        src = mount.split(":")[0]
        check((Path(args.file).parent / src).exists(), f"mounted file {src} exists")
    finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("k8s-validate")
    p.add_argument("--versions", required=True, help="comma-separated, e.g. 1.28.0,1.29.0")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_k8s_validate)
    p = sub.add_parser("render")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("schema")
    p.set_defaults(func=cmd_schema)
    for name, func in (("deployments", cmd_deployments), ("toml", cmd_toml)):
        p = sub.add_parser(name)
        p.add_argument("--rendered", required=True)
        p.add_argument("--kustomize-base", required=True)
        p.add_argument("--kustomize-sidecar", required=True)
        p.add_argument("--kustomize-redis-tls", required=True)
        p.add_argument("--out", default=tempfile.gettempdir())
        p.set_defaults(func=func)
    p = sub.add_parser("user-values")
    p.set_defaults(func=cmd_user_values)
    p = sub.add_parser("render-values", help="scripts/render-chart")
    p.add_argument("values", nargs="+", help="values files, merged in order like helm -f")
    p.add_argument("--name", default=RELEASE)
    p.add_argument("--namespace", default="default")
    p.add_argument("--notes", action="store_true", help="also print NOTES.txt (to stderr)")
    p.add_argument("--no-check-config", action="store_true")
    p.set_defaults(func=cmd_render_values)
    p = sub.add_parser("render-chart-output")
    p.add_argument("--stdout", required=True)
    p.add_argument("--stderr", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--host", required=True)
    p.set_defaults(func=cmd_render_chart_output)
    p = sub.add_parser("memory-figures")
    p.set_defaults(func=cmd_memory_figures)
    p = sub.add_parser("dashboard")
    p.add_argument("file")
    p.set_defaults(func=cmd_dashboard)
    p = sub.add_parser("compose")
    p.add_argument("file")
    p.set_defaults(func=cmd_compose)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
