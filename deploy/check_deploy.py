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
  seconds to spare.

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

    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
