#!/usr/bin/env python3
"""Check that the shipped deploy files agree with each other.

Usage: python3 deploy/check_deploy.py OUT_DIR

- compose.yaml and k8s/redis.yaml run two Redis: the cache with maxmemory,
  allkeys-lru and no persistence (--save "" --appendonly no), the state with
  AOF and noeviction;
- the gateway configs (compose/embedgate.toml, the ConfigMap's
  embedgate.toml) point cache.redis_url and state.redis_url at them;
- the shutdown budget (server.shutdown_grace, 35s when unset) fits what the
  platform allows: Kubernetes terminationGracePeriodSeconds minus the
  preStop sleep, Compose stop_grace_period, each with at least MARGIN
  seconds to spare;
- the gateway: a Deployment of at least 2 replicas with a
  PodDisruptionBudget selecting its pods, readiness on /readyz, liveness on
  /healthz, resource requests and limits;
- Prometheus loads the alerting rules (prometheus/alerts.yml): prometheus.yml
  names it in rule_files, Compose mounts it there, the Kubernetes Prometheus
  mounts the ConfigMap embedgate-alerts where its config's rule_files point;
- Grafana provisions the dashboard: the provider's path is where Compose
  mounts grafana/dashboards and where the Kubernetes Grafana mounts the
  ConfigMap embedgate-dashboards;
- Compose has the optional OTLP collector under the `tracing` profile.

Writes the ConfigMap's embedgate.toml to OUT_DIR/k8s-embedgate.toml (for
`embedgate check-config`). Prints every problem and exits 1 if there is
one. Needs Python 3.11+ (tomllib) and PyYAML (python3-yaml); exits 3
without them.
"""

import os
import re
import sys

try:
    import tomllib  # Python 3.11+
    import yaml
except ImportError as e:
    print(f"check_deploy.py: {e} (needs Python 3.11+ and PyYAML)", file=sys.stderr)
    sys.exit(3)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SHUTDOWN_GRACE = 35
MARGIN = 3
problems = []


def seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", text)
    if not m:
        problems.append(f"cannot read the duration {text!r}")
        return 0
    n, unit = int(m.group(1)), m.group(2)
    return {"ms": n / 1000, "s": n, "m": n * 60}[unit]


def flag(args, name):
    """The value after --name in a redis-server argument list."""
    try:
        return args[args.index(name) + 1]
    except (ValueError, IndexError):
        return None


def check_redis(where, role, args):
    if role == "cache":
        want = {"--maxmemory-policy": "allkeys-lru", "--save": "", "--appendonly": "no"}
        if not flag(args, "--maxmemory"):
            problems.append(f"{where}: the cache Redis has no --maxmemory")
    else:
        want = {"--maxmemory-policy": "noeviction", "--appendonly": "yes"}
    for name, value in want.items():
        if flag(args, name) != value:
            problems.append(f"{where}: {role} Redis needs {name} {value!r}, has {flag(args, name)!r}")


def check_gateway(where, config, cache_host, state_host):
    cache = config.get("cache", {}).get("redis_url", "")
    state = config.get("state", {}).get("redis_url", "")
    if f"//{cache_host}:" not in cache:
        problems.append(f"{where}: cache.redis_url {cache!r} is not {cache_host}")
    if f"//{state_host}:" not in state:
        problems.append(f"{where}: state.redis_url {state!r} is not {state_host}")
    grace = config.get("server", {}).get("shutdown_grace")
    return seconds(grace) if grace else DEFAULT_SHUTDOWN_GRACE


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else None

    # Compose.
    with open(os.path.join(HERE, "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    for role in ("cache", "state"):
        svc = services.get(f"redis-{role}")
        if svc is None:
            problems.append(f"compose.yaml: no redis-{role} service")
        else:
            check_redis(f"compose.yaml redis-{role}", role, svc["command"])
    with open(os.path.join(HERE, "compose", "embedgate.toml"), "rb") as f:
        grace = check_gateway("compose/embedgate.toml", tomllib.load(f), "redis-cache", "redis-state")
    for name, svc in services.items():
        if not name.startswith("gateway"):
            continue
        stop = seconds(svc.get("stop_grace_period", "10s"))
        if grace + MARGIN > stop:
            problems.append(
                f"compose.yaml {name}: stop_grace_period {stop}s leaves less than {MARGIN}s "
                f"over shutdown_grace {grace}s"
            )

    # Kubernetes.
    with open(os.path.join(HERE, "k8s", "redis.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    workloads = {
        d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
    }
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    for role in ("cache", "state"):
        name = f"embedgate-redis-{role}"
        if name not in workloads or name not in services:
            problems.append(f"k8s/redis.yaml: no {name} workload and Service")
            continue
        container = workloads[name]["spec"]["template"]["spec"]["containers"][0]
        check_redis(f"k8s/redis.yaml {name}", role, container["args"])
    state_kind = workloads.get("embedgate-redis-state", {}).get("kind")
    if state_kind and state_kind != "StatefulSet":
        problems.append("k8s/redis.yaml: the state Redis needs a StatefulSet with a volume")

    with open(os.path.join(HERE, "k8s", "configmap.yaml")) as f:
        configmap = yaml.safe_load(f)
    toml_text = configmap["data"]["embedgate.toml"]
    grace = check_gateway(
        "k8s/configmap.yaml", tomllib.loads(toml_text), "embedgate-redis-cache", "embedgate-redis-state"
    )
    if out_dir:
        with open(os.path.join(out_dir, "k8s-embedgate.toml"), "w") as f:
            f.write(toml_text)

    with open(os.path.join(HERE, "k8s", "deployment.yaml")) as f:
        deployment = yaml.safe_load(f)
    pod = deployment["spec"]["template"]["spec"]
    termination = pod.get("terminationGracePeriodSeconds", 30)
    pre_stop = 0
    for c in pod["containers"]:
        cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        if len(cmd) == 2 and cmd[0] == "sleep":
            pre_stop = int(cmd[1])
    if grace + MARGIN > termination - pre_stop:
        problems.append(
            f"k8s/deployment.yaml: terminationGracePeriodSeconds {termination} minus preStop "
            f"{pre_stop} leaves less than {MARGIN}s over shutdown_grace {grace}s"
        )

    check_gateway_workload(deployment)
    check_monitoring(compose)

    for p in problems:
        print(p)
    return 1 if problems else 0


def load_all(path):
    with open(os.path.join(HERE, path)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def mounts(pod_spec, container_name=None):
    """{mountPath: (volume source kind, name or None, subPath)} of a pod's container."""
    volumes = {}
    for v in pod_spec.get("volumes", []):
        if "configMap" in v:
            volumes[v["name"]] = ("configMap", v["configMap"]["name"])
        else:
            volumes[v["name"]] = (next((k for k in v if k != "name"), "?"), None)
    out = {}
    for c in pod_spec["containers"]:
        if container_name and c["name"] != container_name:
            continue
        for m in c.get("volumeMounts", []):
            kind, name = volumes.get(m["name"], ("?", None))
            out[m["mountPath"]] = (kind, name, m.get("subPath"))
    return out


def check_gateway_workload(deployment):
    where = "k8s/deployment.yaml"
    if deployment.get("spec", {}).get("replicas", 1) < 2:
        problems.append(f"{where}: the gateway needs at least 2 replicas")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    gateway = next((c for c in pod["spec"]["containers"] if c["name"] == "embedgate"), None)
    if gateway is None:
        problems.append(f"{where}: no container named embedgate")
        return
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        got = gateway.get(probe, {}).get("httpGet", {}).get("path")
        if got != path:
            problems.append(f"{where}: {probe} must GET {path}, has {got!r}")
    res = gateway.get("resources", {})
    for kind in ("requests", "limits"):
        if not res.get(kind, {}).get("memory"):
            problems.append(f"{where}: the gateway has no memory {kind}")
    if not res.get("requests", {}).get("cpu"):
        problems.append(f"{where}: the gateway has no cpu request")
    pdbs = [d for d in load_all("k8s/pdb.yaml") if d["kind"] == "PodDisruptionBudget"]
    selecting = [
        d for d in pdbs
        if d["spec"].get("selector", {}).get("matchLabels")
        and all(labels.get(k) == v for k, v in d["spec"]["selector"]["matchLabels"].items())
    ]
    if not selecting:
        problems.append("k8s/pdb.yaml: no PodDisruptionBudget selects the gateway pods")
    for d in selecting:
        spec = d["spec"]
        if "minAvailable" not in spec and "maxUnavailable" not in spec:
            problems.append("k8s/pdb.yaml: the PodDisruptionBudget sets neither minAvailable nor maxUnavailable")
        if spec.get("minAvailable", 0) >= deployment["spec"].get("replicas", 1):
            problems.append("k8s/pdb.yaml: minAvailable leaves no pod to evict (drains would hang)")
    kustomization = load_all("k8s/kustomization.yaml")[0]
    for needed in ("pdb.yaml", "monitoring.yaml"):
        if needed not in kustomization.get("resources", []):
            problems.append(f"k8s/kustomization.yaml: {needed} is not in resources")


def rule_files_dirs(prom_config, config_dir):
    """The absolute paths of prometheus.yml's rule_files."""
    return [os.path.normpath(os.path.join(config_dir, f)) for f in prom_config.get("rule_files", [])]


def check_monitoring(compose):
    services = compose["services"]
    # Compose Prometheus: prometheus.yml and alerts.yml mounted, the rules loaded.
    with open(os.path.join(HERE, "prometheus", "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    prom_svc = services.get("prometheus", {})
    volumes = {}
    for v in prom_svc.get("volumes", []):
        parts = v.split(":")
        volumes[parts[1]] = parts[0]
    config_path = next(
        (a.split("=", 1)[1] for a in prom_svc.get("command", []) if a.startswith("--config.file=")),
        "/etc/prometheus/prometheus.yml",
    )
    if volumes.get(config_path) != "./prometheus/prometheus.yml":
        problems.append(f"compose.yaml prometheus: prometheus/prometheus.yml is not mounted at {config_path}")
    rules = rule_files_dirs(prom, os.path.dirname(config_path))
    if not any(volumes.get(r) == "./prometheus/alerts.yml" for r in rules):
        problems.append(
            f"compose.yaml prometheus: prometheus/alerts.yml is not mounted where rule_files point ({rules})"
        )

    # Compose Grafana: the dashboards directory where the provider reads it.
    with open(os.path.join(HERE, "grafana", "provisioning", "dashboards", "embedgate.yaml")) as f:
        provider_paths = [p["options"]["path"] for p in yaml.safe_load(f)["providers"]]
    graf = {v.split(":")[1]: v.split(":")[0] for v in services.get("grafana", {}).get("volumes", [])}
    if not any(graf.get(p) == "./grafana/dashboards" for p in provider_paths):
        problems.append(f"compose.yaml grafana: grafana/dashboards is not mounted at the provider path {provider_paths}")
    if graf.get("/etc/grafana/provisioning") != "./grafana/provisioning":
        problems.append("compose.yaml grafana: grafana/provisioning is not mounted at /etc/grafana/provisioning")

    # Compose OTLP collector, optional.
    otel = services.get("otel-collector")
    if otel is None or "tracing" not in otel.get("profiles", []):
        problems.append("compose.yaml: no otel-collector service under the `tracing` profile")

    # Kubernetes Prometheus and Grafana.
    docs = load_all("k8s/monitoring.yaml")
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    prom_cm = by_kind.get(("ConfigMap", "embedgate-prometheus-config"))
    prom_dep = by_kind.get(("Deployment", "embedgate-prometheus"))
    if not prom_cm or not prom_dep:
        problems.append("k8s/monitoring.yaml: no embedgate-prometheus Deployment and config")
    else:
        k8s_prom = yaml.safe_load(prom_cm["data"]["prometheus.yml"])
        pod = prom_dep["spec"]["template"]["spec"]
        m = mounts(pod)
        args = pod["containers"][0].get("args", [])
        cfg = next((a.split("=", 1)[1] for a in args if a.startswith("--config.file=")), None)
        if not cfg or m.get(os.path.dirname(cfg), (None, None))[1] != "embedgate-prometheus-config":
            problems.append("k8s/monitoring.yaml: --config.file is not in the embedgate-prometheus-config mount")
        rules_ok = any(
            m.get(os.path.dirname(r), (None, None))[1] == "embedgate-alerts"
            and os.path.basename(r) == "alerts.yml"
            for r in rule_files_dirs(k8s_prom, os.path.dirname(cfg or "/"))
        )
        if not rules_ok:
            problems.append("k8s/monitoring.yaml: the ConfigMap embedgate-alerts (alerts.yml) is not mounted where rule_files point")
        jobs = [j["job_name"] for j in k8s_prom.get("scrape_configs", [])]
        if "embedgate" not in jobs:
            problems.append("k8s/monitoring.yaml: no scrape job `embedgate` (alerts.yml's EmbedgateTargetDown uses it)")
    graf_cm = by_kind.get(("ConfigMap", "embedgate-grafana-provisioning"))
    graf_dep = by_kind.get(("Deployment", "embedgate-grafana"))
    if not graf_cm or not graf_dep:
        problems.append("k8s/monitoring.yaml: no embedgate-grafana Deployment and provisioning")
    else:
        providers = yaml.safe_load(graf_cm["data"]["dashboards.yaml"])["providers"]
        m = mounts(graf_dep["spec"]["template"]["spec"])
        if not any(m.get(p["options"]["path"], (None, None))[1] == "embedgate-dashboards" for p in providers):
            problems.append("k8s/monitoring.yaml: the ConfigMap embedgate-dashboards is not mounted at the provider path")
        provisioned = {path: sub for path, (_, name, sub) in m.items() if name == "embedgate-grafana-provisioning"}
        for needed in ("datasources", "dashboards"):
            if not any(p.startswith(f"/etc/grafana/provisioning/{needed}/") for p in provisioned):
                problems.append(f"k8s/monitoring.yaml: Grafana's {needed} provisioning is not mounted")


if __name__ == "__main__":
    sys.exit(main())
