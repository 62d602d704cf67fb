"""Checks on cluster/: the AWS launcher config (validated by Ray's own code), the KubeRay manifests,
the nightly CronJob script (run for real with a fake kubectl), token auth, dashboard exposure, and the
jobs/*.py paths the configs name. Fast: no network, no cloud credentials, no Ray cluster."""

from __future__ import annotations

import ast
import copy
import datetime as dt
import os
import re
import shlex
import subprocess
import textwrap
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
K8S = CLUSTER / "k8s"
AWS_YAML = CLUSTER / "aws.yaml"
RUNTIME_ENV_YAML = CLUSTER / "runtime-env.yaml"
DOCKERFILE = K8S / "Dockerfile"

EXPECTED_FILES = [
    "README.md",
    "aws.yaml",
    "runtime-env.yaml",
    "k8s/Dockerfile",
    "k8s/namespace.yaml",
    "k8s/serviceaccount.yaml",
    "k8s/raycluster.yaml",
    "k8s/rayjob-train.yaml",
    "k8s/rayjob-nightly-score.yaml",
    "k8s/cronjob-nightly-score.yaml",
    "k8s/kustomization.yaml",
]
PUBLIC_CIDRS = {"0.0.0.0/0", "::/0"}
RAY_PORTS = (8265, 6379, 10001)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


# ---------------------------------------------------------------- helpers


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _all_k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in _docs(p)]


def _of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _all_k8s_docs() if d.get("kind") == kind]


def _one(kind: str, name: str) -> dict:
    found = [d for _, d in _of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
    return found[0]


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: standalone RayClusters and the clusters RayJobs bring up themselves."""
    specs = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for _, d in _of_kind("RayCluster")]
    specs += [
        (f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"])
        for _, d in _of_kind("RayJob")
        if "rayClusterSpec" in d["spec"]
    ]
    return specs


def _pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def _dockerfile_workdir() -> str:
    workdirs = re.findall(r"(?m)^WORKDIR\s+(\S+)", DOCKERFILE.read_text())
    assert workdirs, "Dockerfile has no WORKDIR"
    return workdirs[-1]


def _aws_raw() -> dict:
    return _docs(AWS_YAML)[0]


def _aws_prepared() -> dict:
    # What `ray up` does before any cloud call: merge with Ray's AWS defaults.yaml, then schema-validate.
    return prepare_config(copy.deepcopy(_aws_raw()))


def _ray_start_commands(cfg: dict) -> list[tuple[str, str]]:
    return [
        (role, cmd)
        for role in ("head", "worker")
        for cmd in cfg[f"{role}_start_ray_commands"]
        if "ray start" in cmd
    ]


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _port_in(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return lo == -1 or lo <= port <= hi


def _job_references() -> dict[str, list[str]]:
    """jobs/<name>.py -> files under cluster/ that name it."""
    refs: dict[str, list[str]] = {}
    for p in sorted(CLUSTER.rglob("*")):
        if p.is_file():
            for name in re.findall(r"\bjobs/([A-Za-z0-9_]+\.py)\b", p.read_text(errors="replace")):
                refs.setdefault(name, []).append(str(p.relative_to(REPO)))
    return refs


def _string_literals(paths: list[Path]) -> set[str]:
    out: set[str] = set()
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
    return out


def _entrypoints() -> list[tuple[str, str]]:
    return [(d["metadata"]["name"], d["spec"]["entrypoint"]) for _, d in _of_kind("RayJob")]


# ---------------------------------------------------------------- every file parses


@pytest.mark.parametrize("rel", EXPECTED_FILES)
def test_expected_file_exists(rel):
    assert (CLUSTER / rel).is_file(), f"cluster/{rel} is missing"


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses_to_mappings(path):
    docs = _docs(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


# ---------------------------------------------------------------- AWS launcher config


def test_ray_accepts_the_launcher_config():
    # validate_config checks the merged config against ray/autoscaler/ray-schema.json, plus Ray's own
    # cross-field rules (head_node_type exists, sum of min_workers <= max_workers, ...).
    validate_config(_aws_prepared())


def test_ray_validation_rejects_a_broken_launcher_config():
    # Proves the validator used above is not a no-op for this file.
    bad = _aws_prepared()
    bad["available_node_types"]["cpu_score"]["resources"]["CPU"] = -1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = _aws_prepared()
    bad["available_node_types"]["cpu_score"]["not_a_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_aws_head_runs_no_work_and_groups_autoscale():
    cfg = _aws_prepared()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "head must advertise CPU 0 so no tasks/actors land on it"
    assert head.get("max_workers", 0) == 0

    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    cpu = [v for v in workers.values() if v["resources"].get("GPU", 0) == 0 and v["resources"].get("CPU", 0) > 0]
    assert len(gpu) == 1 and len(cpu) == 1, "want one GPU training group and one CPU scoring group"
    assert gpu[0]["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p3.", "p4", "p5"))
    assert gpu[0]["min_workers"] == 0, "GPU nodes are expensive: scale from zero"
    for group in gpu + cpu:
        assert 0 <= group["min_workers"] <= group["max_workers"] <= cfg["max_workers"]
        assert group["max_workers"] >= 1


def test_aws_s3_access_through_instance_profiles_only():
    cfg = _aws_prepared()
    for name, node_type in cfg["available_node_types"].items():
        arn = node_type["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert re.fullmatch(r"arn:aws:iam::[^:]+:instance-profile/[\w+=,.@/-]+", arn), f"{name}: bad profile {arn!r}"


def test_no_credentials_or_literal_tokens_in_cluster_files():
    for p in sorted(CLUSTER.rglob("*")):
        if not p.is_file():
            continue
        text = p.read_text(errors="replace")
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{p}: AWS access key id"
        assert not re.search(r"(?i)aws_secret_access_key|aws_session_token", text), f"{p}: AWS secret"
        assert not re.search(r"(?m)RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[0-9a-f]{16,}", text), f"{p}: literal Ray token"
    for p, d in _all_k8s_docs():
        assert d.get("kind") != "Secret", f"{p}: do not commit Secrets (KubeRay generates the auth token)"


def test_aws_token_auth_on_every_node(tmp_path):
    """Run each `ray start` command under bash with a fake `ray` that records its environment."""
    cfg = _aws_prepared()
    remote_mounts = list(cfg["file_mounts"])
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "record"
    (fake_bin / "ray").write_text(
        '#!/bin/sh\nprintf "%s|%s|%s\\n" "${RAY_AUTH_MODE:-}" "${RAY_AUTH_TOKEN_PATH:-}" "$*" >> "$RECORD"\n'
    )
    (fake_bin / "ray").chmod(0o755)
    env = {
        "PATH": f"{fake_bin}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "RECORD": str(record),
        "RAY_HEAD_IP": "10.0.0.1",
    }
    starts = _ray_start_commands(cfg)
    assert {role for role, _ in starts} == {"head", "worker"}
    for role, cmd in starts:
        record.write_text("")
        subprocess.run(["bash", "-c", cmd], env=env, check=True, capture_output=True, timeout=30)
        lines = [line for line in record.read_text().splitlines() if "|start " in line]
        assert len(lines) == 1, f"{role}: `ray start` not reached: {record.read_text()!r}"
        mode, token_path, args = lines[0].split("|", 2)
        assert mode == "token", f"{role}: ray start runs without RAY_AUTH_MODE=token"
        assert token_path, f"{role}: no RAY_AUTH_TOKEN_PATH"
        assert any(token_path.startswith(m.rstrip("/") + "/") for m in remote_mounts), (
            f"{role}: token {token_path} is not inside a file_mounts target {remote_mounts}"
        )


def test_aws_token_file_comes_from_outside_the_repo():
    for remote, local in _aws_raw()["file_mounts"].items():
        local_path = Path(os.path.expanduser(local)).resolve()
        assert REPO not in local_path.parents and local_path != REPO, f"{local} is inside the repo"


def test_aws_shells_get_token_auth_once(tmp_path):
    cmds = [c for c in _aws_prepared()["worker_setup_commands"] if ".bashrc" in c]
    assert cmds, "no setup command exports RAY_AUTH_MODE for later shells"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for _ in range(2):  # setup_commands rerun on every `ray up`: must stay idempotent
        for cmd in cmds:
            subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=30)
    lines = [line for line in (tmp_path / ".bashrc").read_text().splitlines() if "RAY_AUTH_MODE" in line]
    assert len(lines) == 1 and "RAY_AUTH_MODE=token" in lines[0] and "RAY_AUTH_TOKEN_PATH=" in lines[0]


def test_aws_dashboard_bound_to_head_localhost():
    cfg = _aws_prepared()  # after merging Ray's defaults, whose head command uses --dashboard-host=0.0.0.0
    heads = [cmd for role, cmd in _ray_start_commands(cfg) if role == "head"]
    assert len(heads) == 1
    args = shlex.split(heads[0].split("ray start", 1)[1])
    assert _flag_value(args, "--dashboard-host") in LOCAL_HOSTS
    assert "--include-dashboard=false" not in args  # `ray dashboard` tunnel and the job API need it


def test_aws_security_group_opens_no_ray_port_publicly():
    cfg = _aws_prepared()
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        if cidrs & PUBLIC_CIDRS:
            for port in RAY_PORTS:
                assert not _port_in(rule, port), f"rule {rule} opens {port} to the internet"
    for name, node_type in cfg["available_node_types"].items():
        # Pre-made groups cannot be checked here; use the group Ray creates (intra-cluster + SSH only).
        assert "SecurityGroupIds" not in node_type["node_config"], f"{name}: unreviewable SecurityGroupIds"


def test_aws_commands_are_valid_bash():
    cfg = _aws_prepared()
    keys = ["initialization_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    for key in keys:
        for cmd in cfg[key]:
            res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True, timeout=30)
            assert res.returncode == 0, f"{key}: {cmd!r}: {res.stderr}"


def test_aws_installs_this_projects_wheel():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dist = re.sub(r"[-_.]+", "_", project["name"]).lower()
    wheel = f"{dist}-{project['version']}-py3-none-any.whl"
    setup = "\n".join(_aws_raw()["setup_commands"])
    assert re.search(rf"pip install[^\n]*/{re.escape(wheel)}", setup), f"setup_commands do not pip install {wheel}"
    assert "download_file(" in setup and "boto3" in setup, "wheel is not fetched from S3"


def test_aws_images_match_installed_ray_and_python():
    raw = _aws_raw()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert ">=3.11" in project["requires-python"]
    images = [v for k, v in raw["docker"].items() if k.endswith("image")]
    images += [t["docker"]["worker_image"] for t in raw["available_node_types"].values() if "docker" in t]
    assert images
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image
    gpu_types = [t for t in raw["available_node_types"].values() if t["resources"].get("GPU")]
    assert all(t["docker"]["worker_image"].endswith("-gpu") for t in gpu_types)


def test_aws_region_is_consistent():
    raw = _aws_raw()
    region = raw["provider"]["region"]
    assert all(z.strip().startswith(region) for z in raw["provider"]["availability_zone"].split(","))
    opts = " ".join(raw["docker"].get("run_options", []))
    assert f"AWS_REGION={region}" in opts, "containers must get AWS_REGION equal to provider.region"


# ---------------------------------------------------------------- runtime_env for AWS submissions


def test_runtime_env_is_valid_and_ships_jobs_but_not_the_venv(monkeypatch):
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    from ray.runtime_env import RuntimeEnv

    cfg = _docs(RUNTIME_ENV_YAML)[0]
    monkeypatch.chdir(REPO)
    RuntimeEnv(**cfg)  # Ray's own validation of the fields
    assert cfg["working_dir"] == "."

    shipped: list[Path] = []
    _dir_travel(REPO, [_get_excludes(REPO, cfg["excludes"])], shipped.append, include_gitignore=True)
    rel = {p.relative_to(REPO).as_posix() for p in shipped if p != REPO}
    assert "melanoma/__init__.py" in rel
    assert not any(r == ".venv" or r.startswith(".venv/") for r in rel)
    assert not any(r == ".git" or r.startswith(".git/") for r in rel)
    size = sum(p.stat().st_size for p in shipped if p.is_file())
    assert size < 50 * 2**20, f"working_dir would upload {size / 2**20:.0f} MiB"


# ---------------------------------------------------------------- KubeRay manifests


def test_kuberay_documents_have_required_fields():
    for p, d in _all_k8s_docs():
        assert d.get("apiVersion") and d.get("kind"), f"{p}: apiVersion/kind"
        assert d.get("metadata", {}).get("name") or d["kind"] == "Kustomization", f"{p}: metadata.name"
        if d["kind"] in ("RayCluster", "RayJob"):
            assert d["apiVersion"] == "ray.io/v1", f"{p}: {d['kind']} must be ray.io/v1"
    assert _of_kind("RayCluster") and len(_of_kind("RayJob")) == 2


def test_ray_cluster_specs_are_complete():
    specs = _ray_cluster_specs()
    assert len(specs) >= 2
    for where, spec in specs:
        assert spec.get("rayVersion") == ray.__version__, f"{where}: rayVersion"
        head = spec["headGroupSpec"]
        assert isinstance(head.get("rayStartParams"), dict), f"{where}: head rayStartParams"
        assert str(head["rayStartParams"].get("num-cpus")) == "0", f"{where}: head must run no work"
        containers = head["template"]["spec"]["containers"]
        assert containers and all(c.get("name") and c.get("image") for c in containers), f"{where}: head containers"
        groups = spec.get("workerGroupSpecs", [])
        assert groups, f"{where}: no workerGroupSpecs"
        names = [g["groupName"] for g in groups]
        assert len(names) == len(set(names)), f"{where}: duplicate groupName"
        for g in groups:
            for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "template"):
                assert key in g, f"{where}/{g.get('groupName')}: missing {key}"
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}/{g['groupName']}"
            assert isinstance(g.get("rayStartParams", {}), dict)
            wc = g["template"]["spec"]["containers"]
            assert wc and all(c.get("name") and c.get("image") for c in wc), f"{where}/{g['groupName']}"
        if any(g["minReplicas"] < g["maxReplicas"] for g in groups):
            assert spec.get("enableInTreeAutoscaling") is True, f"{where}: min<max needs the autoscaler"


def test_long_lived_cluster_has_gpu_training_and_cpu_scoring_groups():
    spec = _one("RayCluster", "melanoma-ray")["spec"]

    def gpus(g):
        c = g["template"]["spec"]["containers"][0]
        return int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))

    gpu = [g for g in spec["workerGroupSpecs"] if gpus(g) >= 1]
    cpu = [g for g in spec["workerGroupSpecs"] if gpus(g) == 0]
    assert len(gpu) == 1 and len(cpu) == 1
    assert gpu[0]["minReplicas"] == 0 and gpu[0]["maxReplicas"] >= 1
    assert gpu[0]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    assert not cpu[0]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")


def test_images_are_built_from_the_ray_base_image():
    text = DOCKERFILE.read_text()
    bases = re.findall(r"(?m)^FROM\s+(\S+)", text)
    assert f"rayproject/ray:{ray.__version__}-py311" in bases
    assert f"rayproject/ray:{ray.__version__}-py311-gpu" in bases
    assert re.search(r"(?m)^COPY\b.*\bjobs\b", text), "image must contain jobs/"
    assert re.search(r"(?m)^COPY\b.*\bmelanoma\b", text), "image must contain the melanoma package"
    assert re.search(r"pip install[^\n]* \.", text), "image must pip install the project"
    ignore = (K8S / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_rayjobs_have_entrypoint_cluster_and_runtime_env():
    clusters = {d["metadata"]["name"]: d for _, d in _of_kind("RayCluster")}
    workdir = _dockerfile_workdir()
    for _, job in _of_kind("RayJob"):
        name, spec = job["metadata"]["name"], job["spec"]
        assert spec.get("entrypoint", "").startswith("python jobs/"), f"{name}: entrypoint"
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), f"{name}: need exactly one cluster source"
        if "clusterSelector" in spec:
            target = spec["clusterSelector"].get("ray.io/cluster")
            assert target in clusters, f"{name}: clusterSelector names unknown cluster {target!r}"
            assert clusters[target]["metadata"].get("namespace") == job["metadata"].get("namespace")
            assert not spec.get("shutdownAfterJobFinishes"), f"{name}: must not delete a selected cluster"
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == workdir, f"{name}: working_dir is not the image's source dir"


def test_token_auth_on_every_kuberay_cluster():
    clusters = {d["metadata"]["name"]: d["spec"] for _, d in _of_kind("RayCluster")}
    for where, spec in _ray_cluster_specs():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: authOptions.mode != token"
        for tpl in _pod_templates(spec):
            for c in tpl["spec"]["containers"]:
                for e in c.get("env", []):
                    if e["name"] == "RAY_AUTH_MODE":
                        assert e.get("value") == "token", f"{where}: container overrides RAY_AUTH_MODE"
    for _, job in _of_kind("RayJob"):
        if "clusterSelector" in job["spec"]:
            target = clusters[job["spec"]["clusterSelector"]["ray.io/cluster"]]
            assert target["authOptions"]["mode"] == "token"


def test_kuberay_dashboard_is_not_exposed():
    for p, d in _all_k8s_docs():
        assert d["kind"] not in ("Ingress", "Gateway", "HTTPRoute", "Route"), f"{p}: {d['kind']} exposes a port"
        if d["kind"] == "Service":
            assert d.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", f"{p}: Service type"
    for where, spec in _ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head serviceType"
        assert head.get("enableIngress") is not True, f"{where}: enableIngress"
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        for tpl in _pod_templates(spec):
            assert not tpl["spec"].get("hostNetwork"), f"{where}: hostNetwork"
            for c in tpl["spec"]["containers"]:
                assert not any("hostPort" in port for port in c.get("ports", [])), f"{where}: hostPort"


def test_ray_pods_use_the_irsa_service_account():
    sas = [d for _, d in _of_kind("ServiceAccount") if "eks.amazonaws.com/role-arn" in d["metadata"].get("annotations", {})]
    assert len(sas) == 1, "want exactly one IRSA ServiceAccount for the Ray pods"
    sa = sas[0]
    arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::[^:]+:role/[\w+=,.@/-]+", arn), arn
    for where, spec in _ray_cluster_specs():
        for tpl in _pod_templates(spec):
            assert tpl["spec"].get("serviceAccountName") == sa["metadata"]["name"], f"{where}: no IRSA account"


def test_everything_lives_in_one_namespace():
    ns = {d["metadata"]["name"] for _, d in _of_kind("Namespace")}
    assert len(ns) == 1
    (namespace,) = ns
    for p, d in _all_k8s_docs():
        if d["kind"] not in ("Namespace", "Kustomization"):
            assert d["metadata"].get("namespace") == namespace, f"{p}: {d['kind']}/{d['metadata']['name']}"
    assert _docs(K8S / "kustomization.yaml")[0].get("namespace") == namespace


# ---------------------------------------------------------------- nightly schedule


def _cronjob() -> dict:
    (cron,) = [d for _, d in _of_kind("CronJob")]
    return cron


def test_cronjob_can_create_rayjobs_from_the_template():
    cron = _cronjob()
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5 and spec.get("timeZone") in ("Etc/UTC", "UTC")
    assert spec.get("concurrencyPolicy") == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]

    # RBAC: the pod's ServiceAccount is bound to a Role that may get + create RayJobs.
    sa = pod["serviceAccountName"]
    bindings = [d for _, d in _of_kind("RoleBinding")
                if any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in d["subjects"])]
    assert bindings, f"no RoleBinding for {sa}"
    for b in bindings:
        for s in b["subjects"]:
            assert s.get("namespace") == cron["metadata"]["namespace"], "ServiceAccount subjects need a namespace"
    verbs = set()
    for b in bindings:
        role = _one("Role", b["roleRef"]["name"])
        for rule in role["rules"]:
            if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]:
                verbs |= set(rule["verbs"])
    assert {"get", "create"} <= verbs

    # The template reaches the pod: kustomize ConfigMap -> volume -> mountPath/$TEMPLATE.
    kust = _docs(K8S / "kustomization.yaml")[0]
    for res in kust["resources"]:
        assert (K8S / res).is_file(), f"kustomization resource {res} missing"
    (gen,) = kust["configMapGenerator"]
    assert gen["files"] == ["rayjob-nightly-score.yaml"] and (K8S / gen["files"][0]).is_file()
    assert kust.get("generatorOptions", {}).get("disableNameSuffixHash") is True
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == gen["name"]
    template_env = {e["name"]: e.get("value") for e in container["env"]}["TEMPLATE"]
    assert template_env == f"{mount['mountPath']}/{gen['files'][0]}"


def _run_cron_script(tmp_path: Path, exists: bool) -> tuple[subprocess.CompletedProcess, Path, Path]:
    cmd = _cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["/bin/sh", "-c"]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    log, out = tmp_path / "kubectl.log", tmp_path / "created.yaml"
    for f in (log, out):
        f.unlink(missing_ok=True)
    (fake_bin / "kubectl").write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "$*" >> "$LOG"
        case "$1" in
          get) [ -n "$EXISTS" ] && exit 0; echo 'Error from server (NotFound)' >&2; exit 1 ;;
          create) cat > "$OUT" ;;
        esac
        exit 0
        """))
    (fake_bin / "kubectl").chmod(0o755)
    env = {
        "PATH": f"{fake_bin}:/usr/bin:/bin",
        "LOG": str(log),
        "OUT": str(out),
        "EXISTS": "1" if exists else "",
        "TEMPLATE": str(K8S / "rayjob-nightly-score.yaml"),
    }
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    return res, log, out


def test_cron_script_creates_one_rayjob_for_yesterday_utc(tmp_path):
    before = dt.datetime.now(dt.timezone.utc).date()
    res, log, out = _run_cron_script(tmp_path, exists=False)
    after = dt.datetime.now(dt.timezone.utc).date()
    assert res.returncode == 0, res.stderr

    created = _docs(out)
    assert len(created) == 1
    job = created[0]
    day = next(d for d in {before, after}
               if job["metadata"]["name"] == f"melanoma-nightly-score-{d - dt.timedelta(days=1):%Y%m%d}")
    yesterday = day - dt.timedelta(days=1)
    args = shlex.split(job["spec"]["entrypoint"])
    assert _flag_value(args, "--date") == f"{yesterday:%Y-%m-%d}"

    # Everything except the name and the date is the template, untouched.
    template = _docs(K8S / "rayjob-nightly-score.yaml")[0]
    assert _flag_value(shlex.split(template["spec"]["entrypoint"]), "--date") == "yesterday"
    template["metadata"]["name"] = job["metadata"]["name"]
    template["spec"]["entrypoint"] = template["spec"]["entrypoint"].replace(
        "--date yesterday", f"--date {yesterday:%Y-%m-%d}")
    assert job == template

    calls = log.read_text().splitlines()
    assert calls[0] == f"get rayjob {job['metadata']['name']}"
    assert calls[1] == "create -f -"
    old = day - dt.timedelta(days=8)
    assert calls[2] == f"delete rayjob melanoma-nightly-score-{old:%Y%m%d} --ignore-not-found"


def test_cron_script_does_not_resubmit_an_existing_date(tmp_path):
    res, log, out = _run_cron_script(tmp_path, exists=True)
    assert res.returncode == 0, res.stderr
    assert not out.exists(), "created a second RayJob for the same date"
    assert not any(line.startswith("create") for line in log.read_text().splitlines())


# ---------------------------------------------------------------- jobs/*.py named by the configs


def test_configs_name_both_job_scripts():
    refs = _job_references()
    assert {"train.py", "nightly_score.py"} <= set(refs), refs


@pytest.mark.parametrize("script", sorted(_job_references()))
def test_referenced_job_script_exists(script):
    path = REPO / "jobs" / script
    assert path.is_file(), f"jobs/{script} is named in {_job_references()[script]} but does not exist"


@pytest.mark.parametrize("name,entrypoint", _entrypoints())
def test_rayjob_entrypoint_flags_are_defined_by_the_script(name, entrypoint):
    args = shlex.split(entrypoint)
    assert args[0] == "python" and args[1].startswith("jobs/")
    script = REPO / args[1]
    assert script.is_file(), f"{name}: {args[1]} does not exist"
    known = _string_literals([script, *sorted((REPO / "melanoma").rglob("*.py"))])
    flags = [a.split("=", 1)[0] for a in args[2:] if a.startswith("--")]
    assert flags
    missing = [f for f in flags if f not in known]
    assert not missing, f"{name}: {args[1]} defines no option {missing}"


# ---------------------------------------------------------------- optional: kustomize build


def test_kustomize_build_renders_the_expected_objects():
    kubectl = subprocess.run(["sh", "-c", "command -v kubectl"], capture_output=True, text=True).stdout.strip()
    if not kubectl:
        pytest.skip("kubectl not installed")
    res = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(res.stdout) if d)
    assert kinds == sorted(["Namespace", "ServiceAccount", "ServiceAccount", "Role", "RoleBinding",
                            "ConfigMap", "RayCluster", "CronJob"])
