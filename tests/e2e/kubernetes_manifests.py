"""Checks deploy/kubernetes: python kubernetes_manifests.py KEYBROKER_BINARY WORK_DIR.

Builds the base and the workload-identity overlay as kustomize would (the subset of
kustomize they use: resources, namespace, images, JSON 6902 patches; any other field fails
here, so it is never silently ignored), validates every object against the Kubernetes
schemas of the pinned kubernetes-validate (strict: unknown fields fail), then checks what the
schemas cannot: that each DaemonSet, its ConfigMap and `keybroker check-config` agree.
Prints one JSON line: the Kubernetes version and the objects checked. Exits 1 with every
problem found.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import jsonpatch
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
AUDIENCE = "https://coreweave.com/iam"
problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def build(directory):
    """The objects `kubectl apply -k directory` would send."""
    k = load(directory / "kustomization.yaml")[0]
    allowed = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
    for key in set(k) - allowed:
        problem(directory / "kustomization.yaml", f"{key} is not handled by this check")
    objects = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        objects += build(path) if path.is_dir() else load(path)
    for obj in objects:
        if "namespace" in k and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        new = f"{image['newName']}:{image['newTag']}"
        for c in containers(objects):
            if c["image"] == image["name"]:
                c["image"] = new
    for patch in k.get("patches", []):
        target = patch["target"]
        ops = load(directory / patch["path"])[0]
        hits = [
            i
            for i, o in enumerate(objects)
            if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]
        ]
        if len(hits) != 1:
            problem(directory, f"patch target {target} matches {len(hits)} objects")
            continue
        try:
            objects[hits[0]] = jsonpatch.apply_patch(objects[hits[0]], ops)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            problem(directory / patch["path"], f"does not apply: {e}")
    return objects


def pod_specs(objects):
    for o in objects:
        if o["kind"] in ("DaemonSet", "Job", "Deployment"):
            yield o, o["spec"]["template"]["spec"]


def containers(objects):
    for _, spec in pod_specs(objects):
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def seconds(text):
    m = re.fullmatch(r"(\d+)(s|m)", text)
    assert m, f"duration {text!r} not understood by this check"
    return int(m[1]) * (60 if m[2] == "m" else 1)


def check_daemonset(name, objects, binary, work):
    [ds] = [o for o in objects if o["kind"] == "DaemonSet"]
    [cm] = [o for o in objects if o["kind"] == "ConfigMap"]
    where = f"{name}: daemonset"
    spec = ds["spec"]["template"]["spec"]
    pod_sc = spec.get("securityContext", {})
    text = cm["data"]["keybroker.toml"]
    config = tomllib.loads(text)
    server = config["server"]

    [main] = spec["containers"]
    sc = main.get("securityContext", {})
    user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if not (user and sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))):
        problem(where, "the daemon must run as a non-root user")
    if sc.get("readOnlyRootFilesystem") is not True:
        problem(where, "the daemon's root filesystem must be read-only")
    if sc.get("capabilities") != {"drop": ["ALL"]}:
        problem(where, "the daemon must drop every capability and add none")
    if sc.get("allowPrivilegeEscalation") is not False:
        problem(where, "allowPrivilegeEscalation must be false")
    for c in spec["containers"] + spec.get("initContainers", []):
        for kind in ("requests", "limits"):
            if set(c.get("resources", {}).get(kind, {})) != {"cpu", "memory"}:
                problem(where, f"{c['name']} needs cpu and memory {kind}")

    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= seconds(server["shutdown_timeout"]):
        problem(where, f"terminationGracePeriodSeconds {grace} must exceed shutdown_timeout")

    socket = server["socket"]
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    node = [v for v in volumes.values() if v.get("hostPath", {}).get("path") == "/run/keybroker"]
    if len(node) != 1:
        problem(where, "one hostPath volume /run/keybroker is expected")
        return
    node_mount = mounts[node[0]["name"]]["mountPath"]
    if socket != f"{node_mount}/socket/keybroker.sock":
        problem(where, f"socket {socket} is not in {node_mount}/socket/ (install-node's)")
    for probe, check in (("livenessProbe", "live"), ("readinessProbe", "ready")):
        want = ["/usr/bin/keybroker", "probe", check, f"--socket={socket}"]
        if main.get(probe, {}).get("exec", {}).get("command") != want:
            problem(where, f"{probe} must run {' '.join(want)}")

    [init] = spec["initContainers"]
    group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    want = ["/usr/bin/keybroker", "install-node", node_mount, f"--daemon-user={user}:{group}"]
    init_mount = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    if init["command"] != want or init_mount.get(node[0]["name"]) != node_mount:
        problem(where, f"the init container must run {' '.join(want)} on the same volume")

    profile_files = []
    for profile in config["profiles"].values():
        for key in ("token_file", "oidc_token_file"):
            if key in profile:
                profile_files.append((key, profile[key]))
    for key, path in profile_files:
        directory, file = path.rsplit("/", 1)
        mount = [m for m in mounts.values() if m["mountPath"] == directory]
        if len(mount) != 1 or mount[0].get("readOnly") is not True:
            problem(where, f"{key} {path}: no read-only volume is mounted at {directory}")
            continue
        volume = volumes[mount[0]["name"]]
        if key == "token_file":
            secret = volume.get("secret", {})
            if secret.get("defaultMode") != 0o400 or pod_sc.get("fsGroup") != group:
                problem(where, f"{path}: a Secret with defaultMode 0400 read through fsGroup")
        else:
            sources = volume.get("projected", {}).get("sources", [])
            tokens = [s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s]
            if [(t["path"], t["audience"]) for t in tokens] != [(file, AUDIENCE)]:
                problem(where, f"{path}: a service-account token for {AUDIENCE} is expected")
    if any(v.get("secret") for v in volumes.values()) and not any(
        k == "token_file" for k, _ in profile_files
    ):
        problem(where, "a Secret is mounted that no profile reads")

    # The config as the daemon would read it, the secrets' directory moved into `work`.
    secrets = work / name / "secrets"
    for _, path in profile_files:
        local = secrets / path.removeprefix("/var/run/secrets/keybroker/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("a.b.c\n" if "oidc" in path else "token\n")
        local.chmod(0o600)
    checked = work / name / "keybroker.toml"
    checked.write_text(text.replace("/var/run/secrets/keybroker/", f"{secrets}/"))
    out = subprocess.run(
        [binary, "check-config", "--config", str(checked)], capture_output=True, text=True
    )
    if out.returncode != 0:
        problem(f"{name}: configmap keybroker.toml", out.stderr.strip())


def main():
    binary, work = sys.argv[1], pathlib.Path(sys.argv[2])
    version = kubernetes_validate.latest_version()
    variants = {
        "base": build(ROOT),
        "workload-identity": build(ROOT / "workload-identity"),
    }
    example = load(ROOT / "example" / "aws-cli-job.yaml")
    checked = 0
    for name, objects in [*variants.items(), ("example", example)]:
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problem(f"{name}: {obj['kind']}/{obj['metadata']['name']}", e.message)
            checked += 1
    for name, objects in variants.items():
        check_daemonset(name, objects, binary, work)
    for o, spec in pod_specs(example):
        for v in spec["volumes"]:
            if v.get("hostPath", {}).get("path") == "/run/keybroker":
                mount = [
                    m for m in spec["containers"][0]["volumeMounts"] if m["name"] == v["name"]
                ]
                if not (mount and mount[0].get("readOnly")):
                    problem("example", "a workload mounts /run/keybroker read-only")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"kubernetes": version, "objects": checked}))


main()
