"""Checks rendered Kubernetes manifests (kubectl kustomize output) offline: every pod
passes the "restricted" Pod Security Standard, probes ask for the services' health names,
and no Secret is shipped (applying must never overwrite a real one).

Usage: check_manifests.py RENDERED.yaml   (exit 1 and one line per problem)
Needs PyYAML (a dependency of kubernetes-validate, in the same virtualenv).
"""
import sys

import yaml

# The restricted profile's allowed volume types.
ALLOWED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
# The health service name a readiness/startup probe must ask for, by container.
READY_NAME = {
    "deploy-svc": "deploy.v1.DeployService",
    "release-svc": "release.v1.ReleaseService",
}


def pod_problems(where, pod):
    problems = []
    sc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(f"{where}: {key} is set")
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f"{where}: volume {v['name']} of type {sorted(kinds)}")
    pod_seccomp = (sc.get("seccompProfile") or {}).get("type")
    for c in (pod.get("initContainers") or []) + pod.get("containers", []):
        cwhere = f"{where} container {c['name']}"
        csc = c.get("securityContext") or {}
        if csc.get("privileged"):
            problems.append(f"{cwhere}: privileged")
        if csc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{cwhere}: allowPrivilegeEscalation is not false")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{cwhere}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{cwhere}: adds capabilities {caps['add']}")
        if not csc.get("runAsNonRoot", sc.get("runAsNonRoot")):
            problems.append(f"{cwhere}: runAsNonRoot is not true")
        if csc.get("runAsUser", sc.get("runAsUser")) == 0:
            problems.append(f"{cwhere}: runs as user 0")
        seccomp = (csc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{cwhere}: seccompProfile is {seccomp}, not RuntimeDefault")
        if csc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{cwhere}: readOnlyRootFilesystem is not true")
        name = READY_NAME.get(c["name"])
        if name:
            for probe in ("startupProbe", "readinessProbe"):
                asked = ((c.get(probe) or {}).get("grpc") or {}).get("service")
                if asked != name:
                    problems.append(f"{cwhere}: {probe} asks for {asked!r}, not {name!r}")
            if "grpc" not in (c.get("livenessProbe") or {}):
                problems.append(f"{cwhere}: no gRPC livenessProbe")
            if "preStop" not in (c.get("lifecycle") or {}):
                problems.append(f"{cwhere}: no preStop delay for endpoint removal")
    return problems


def main(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    problems = []
    kinds = {}
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        kinds.setdefault(kind, []).append(name)
        if kind == "Secret":
            problems.append(f"Secret {name} is shipped: it would overwrite the real one")
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            problems += pod_problems(f"{kind} {name}", d["spec"]["template"]["spec"])
    for kind in ("Deployment", "Service", "ServiceAccount", "PodDisruptionBudget",
                 "NetworkPolicy", "ServiceMonitor"):
        if kind not in kinds:
            problems.append(f"no {kind} in the manifests")
    for p in problems:
        print(p)
    if problems:
        return 1
    print(f"{path}: {len(docs)} objects, every pod passes the restricted profile")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
