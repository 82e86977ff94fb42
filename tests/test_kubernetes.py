"""The Kubernetes manifests (deploy/kubernetes): rendered by `kubectl kustomize`, every object
valid against Kubernetes 1.30's schemas with unknown fields refused (kubernetes-validate),
the DaemonSet's containers running exactly the systemd units' command lines with the units'
capabilities, and the serving pod's environment pointing at what the DaemonSet provides.

The last tests run the pod's own commands (the init container's script, the emulator, a
daemon, the controller, the exec probes) on a temp runtime dir, under the pod's numbers and
capabilities, with the host's /etc/passwd and /etc/group replaced (in a private mount
namespace) by ones that hold the `flexnpu` user and group, as the node's files do."""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import kubernetes_validate
import pytest
import yaml

from conftest import new_runtime_dir
from flexnpu import paths
from flexnpu.control import config as cfgmod
from flexnpu.forward import cli as forward_cli
from flexnpu.service import install as inst
from flexnpu.service import units

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "deploy" / "kubernetes"
EXAMPLE = BASE / "examples" / "serving-pod.yaml"
PREPARE = REPO / "deploy" / "container" / "prepare-node.sh"
K8S_VERSION = "1.30"  # the schemas every object is validated against (strict: unknown fields refused)
IMAGE_PREFIX = Path("/opt/flexnpu")  # the venv in the image (deploy/container/Dockerfile)
IMAGE_BIN = IMAGE_PREFIX / "bin" / "flexnpu"
OBSERVER_PYTHON = IMAGE_PREFIX / "bin" / "python3-observer"
METRICS_ARGS = ["--metrics", "0.0.0.0:9464"]  # the observer's only argument the unit does not have
DEVICES = tuple(range(8))


def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: these tests render deploy/kubernetes with `kubectl kustomize` "
                    "(kubectl 1.32 carries kustomize 5.5); install kubectl")
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return kustomize(BASE)


@pytest.fixture(scope="module")
def with_components(tmp_path_factory) -> list[dict]:
    """The base with both components, as an overlay would use them."""
    d = tmp_path_factory.mktemp("overlay")
    rel = os.path.relpath(BASE, d)
    (d / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{rel}]\ncomponents: [{rel}/components/servicemonitor, {rel}/components/emulator]\n")
    return kustomize(d)


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def pod_spec(objs: list[dict]) -> dict:
    return one(objs, "DaemonSet")["spec"]["template"]["spec"]


def containers(objs: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in pod_spec(objs)["containers"]}


def node_ids() -> dict[str, int]:
    data = yaml.safe_load((BASE / "node-ids.yaml").read_text())["data"]
    return {"uid": int(data["uid"]), "gid": int(data["gid"])}


def unit_argv(text: str, instance: str | None = None) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    exec_start = line.split("=", 1)[1]
    if instance is not None:
        exec_start = exec_start.replace("%i", instance)
    return shlex.split(exec_start)


def image_units() -> dict[str, str]:
    """The units `flexnpu service install` would write for the image's entry point."""
    cfg = units.ServiceConfig(binary=IMAGE_BIN, devices=DEVICES, emulator=True, emu_devices=len(DEVICES))
    return units.render(cfg)


# ------------------------------------------------------------------ rendering and schemas


def test_base_renders_the_expected_objects(rendered):
    kinds = sorted((o["kind"], o["metadata"]["name"].split("-")[0]) for o in rendered)
    assert [k for k, _ in kinds] == ["ConfigMap", "DaemonSet", "Namespace", "Service"]
    for o in rendered:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "flexnpu", o["metadata"]
    # node-ids.yaml is local configuration: read by the replacements, never applied
    assert not any(o["metadata"]["name"] == "flexnpu-node-ids" for o in rendered)


def test_every_object_validates_strictly(rendered, with_components):
    seen = set()
    for o in rendered + [o for o in with_components if o["kind"] != "ServiceMonitor"]:
        assert kubernetes_validate.validate(o, K8S_VERSION, strict=True) == K8S_VERSION
        seen.add(o["kind"])
    assert seen == {"ConfigMap", "DaemonSet", "Namespace", "Service"}
    # strict means an unknown field is refused: the check can fail
    bad = copy.deepcopy(one(rendered, "DaemonSet"))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_servicemonitor_selects_the_metrics_service(with_components):
    # no schema of the Prometheus Operator's CRD ships with kubernetes-validate: the fields are
    # checked against the Service they must match
    sm, svc = one(with_components, "ServiceMonitor"), one(with_components, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"] == "flexnpu"
    want = sm["spec"]["selector"]["matchLabels"]
    assert want.items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("metrics", 9464)]
    pod_labels = one(with_components, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    obs = containers(with_components)["observer"]
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in obs["ports"]
    assert obs["command"][-2:] == METRICS_ARGS


# ------------------------------------------------------------------ the same commands as the units


def test_containers_run_the_units_command_lines(rendered, with_components):
    u = image_units()
    cs = containers(rendered)
    assert sorted(cs) == sorted([f"daemon-{d}" for d in DEVICES] + ["observer", "controller"])
    for d in DEVICES:
        assert cs[f"daemon-{d}"]["command"] == unit_argv(u[units.DAEMON_TEMPLATE], str(d))
    assert cs["controller"]["command"] == unit_argv(u[units.CONTROLLER])
    # the observer: the unit's entry point and arguments, run by the interpreter copy that holds
    # the unit's capability as a file capability, plus where it serves its metrics
    assert cs["observer"]["command"] == [str(OBSERVER_PYTHON), *unit_argv(u[units.OBSERVE]), *METRICS_ARGS]
    assert containers(with_components)["emulator"]["command"] == unit_argv(u[units.EMU])
    env = {f"{k}={v}" for k, v in (e.split("=", 1) for e in _unit_env(u[units.CONTROLLER]))}
    for c in containers(with_components).values():
        assert {f"{e['name']}={e['value']}" for e in c["env"]} == env, c["name"]


def _unit_env(text: str) -> list[str]:
    return [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith("Environment=")]


def test_observer_has_exactly_the_units_capabilities(rendered):
    cs = containers(rendered)
    want = [c.removeprefix("CAP_") for c in units.OBSERVER_CAPS]
    caps = cs["observer"]["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": want}
    for name, c in cs.items():
        if name != "observer":
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
    # the one root step: CAP_CHOWN, to hand the runtime dir to the service user
    init = pod_spec(rendered)["initContainers"]
    assert [(i["name"], i["securityContext"]["capabilities"]) for i in init] == \
        [("prepare-node", {"drop": ["ALL"], "add": ["CHOWN"]})]


def test_nothing_privileged_and_host_pids(rendered):
    spec = pod_spec(rendered)
    assert spec["hostPID"] is True
    assert not spec.get("hostNetwork") and not spec.get("hostIPC")
    example = yaml.safe_load(EXAMPLE.read_text())
    for c in spec["containers"] + spec["initContainers"] + example["spec"]["containers"]:
        assert not c.get("securityContext", {}).get("privileged", False), c["name"]
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_pod_runs_as_the_node_ids(rendered):
    ids, spec = node_ids(), pod_spec(rendered)
    sc = spec["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"], sc["supplementalGroups"]) == \
        (ids["uid"], ids["gid"], ids["gid"], [ids["gid"]])
    env = {e["name"]: e["value"] for e in spec["initContainers"][0]["env"]}
    assert (env["FLEXNPU_UID"], env["FLEXNPU_GID"]) == (str(ids["uid"]), str(ids["gid"]))
    example = yaml.safe_load(EXAMPLE.read_text())
    assert ids["gid"] in example["spec"]["securityContext"]["supplementalGroups"]


def _volume(spec: dict, name: str) -> dict:
    return next(v for v in spec["volumes"] if v["name"] == name)


def test_runtime_dir_and_configmap_mounted(rendered, tmp_path):
    spec = pod_spec(rendered)
    assert _volume(spec, "runtime-dir")["hostPath"]["path"] == paths.DEFAULT_RUNTIME_DIR
    cm = one(rendered, "ConfigMap")
    assert _volume(spec, "config")["configMap"]["name"] == cm["metadata"]["name"]  # the hashed name
    for c in spec["containers"] + spec["initContainers"]:
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["runtime-dir"]["mountPath"] == paths.DEFAULT_RUNTIME_DIR, c["name"]
        assert mounts["host-group"]["mountPath"] == "/etc/group" and mounts["host-group"]["readOnly"]
        # the services that read flexnpu.toml (the daemon: [roles]; the controller: all of it)
        if c["name"].startswith("daemon-") or c["name"] == "controller":
            assert mounts["config"] == {"name": "config", "mountPath": str(Path(paths.DEFAULT_CONFIG).parent),
                                        "readOnly": True}, c["name"]
    assert list(cm["data"]) == [Path(paths.DEFAULT_CONFIG).name]
    f = tmp_path / "flexnpu.toml"
    f.write_text(cm["data"]["flexnpu.toml"])
    cfg = cfgmod.load(f, required=True)
    assert cfg == cfgmod.build(cfgmod.read_file(f))
    assert cfg.controller.policy in ("passthrough", "static-split", "flexpd")


def test_observer_mounts_what_bcc_reads(rendered):
    spec = pod_spec(rendered)
    mounts = {m["mountPath"]: m for m in containers(rendered)["observer"]["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/lib/modules", "/usr/src", "/var/lib/flexnpu/lib"):
        assert mounts[path]["readOnly"] is True, path
        vol = _volume(spec, mounts[path]["name"])
        assert vol["hostPath"]["path"] == path  # the same path as on the node: uprobes name files


def test_probes_ask_their_own_service(rendered):
    for name, c in containers(rendered).items():
        service = "daemon" if name.startswith("daemon-") else name
        want = [str(IMAGE_BIN), "service", "probe", service]
        if service == "daemon":
            want += ["--device", name.split("-")[1]]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[kind]["exec"]["command"] == want, (name, kind)
            assert c[kind]["timeoutSeconds"] >= 5  # the probe's own 3 s wait plus the interpreter's start


def test_example_pod_uses_what_the_daemonset_provides(rendered):
    pod = yaml.safe_load(EXAMPLE.read_text())
    assert kubernetes_validate.validate(pod, K8S_VERSION, strict=True) == K8S_VERSION
    spec = pod_spec(rendered)
    host_lib = _volume(spec, "host-lib")["hostPath"]["path"]
    init = spec["initContainers"][0]
    init_env = {e["name"]: e["value"] for e in init["env"]}
    assert {"name": "host-lib", "mountPath": init_env["FLEXNPU_HOST_LIB"]} in init["volumeMounts"]

    c = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    lib_mount = next(m for m in mounts.values() if vols[m["name"]]["hostPath"]["path"] == host_lib)
    assert lib_mount["mountPath"] == host_lib and lib_mount["readOnly"]
    shim = Path(env["LD_PRELOAD"]["value"])
    assert shim.parent == Path(host_lib) and shim.name == Path(forward_cli.shim_library()).name
    rd_mount = next(m for m in mounts.values() if vols[m["name"]]["hostPath"]["path"] == paths.DEFAULT_RUNTIME_DIR)
    assert rd_mount["mountPath"] == env["FLEXNPU_RUNTIME_DIR"]["value"] == paths.DEFAULT_RUNTIME_DIR
    # the role: the shim reads FLEXNPU_ROLE, filled from the pod's annotation
    ref = env["FLEXNPU_ROLE"]["valueFrom"]["fieldRef"]["fieldPath"]
    key = ref.removeprefix("metadata.annotations['").removesuffix("']")
    assert ref != key and pod["metadata"]["annotations"][key] in ("prefill", "decode", "auto")
    assert forward_cli.run_env(None, pod["metadata"]["annotations"][key], None, False, {})["FLEXNPU_ROLE"] == "decode"


# ------------------------------------------------------------------ the pod's commands, run


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv, mount namespaces)")


def _free_id(start: int) -> int:
    import grp
    import pwd

    n = start
    while True:
        try:
            pwd.getpwuid(n)
        except KeyError:
            try:
                grp.getgrgid(n)
            except KeyError:
                return n
        n += 1


class NodeFiles:
    """/etc/passwd and /etc/group as a node's, with the `flexnpu` user and group, shown to the
    commands run here through a private mount namespace (as the pod mounts the node's)."""

    def __init__(self, where: Path, uid: int, gid: int) -> None:
        self.passwd, self.group = where / "passwd", where / "group"

        def others(path: str) -> str:  # this machine's own entries, less any flexnpu it has
            return "".join(ln for ln in Path(path).read_text().splitlines(keepends=True)
                           if not ln.startswith("flexnpu:"))

        self.passwd.write_text(others("/etc/passwd") + f"flexnpu:x:{uid}:{gid}::/nonexistent:/usr/sbin/nologin\n")
        self.group.write_text(others("/etc/group") + f"flexnpu:x:{gid}:\n")

    def wrap(self, argv: list[str], read_only: tuple[Path, ...] = ()) -> list[str]:
        """argv in a mount namespace of its own with these files, and `read_only` bind-mounted
        read-only onto themselves (a pod's `readOnly: true` hostPath)."""
        ro = "".join(f"mount --bind {shlex.quote(str(p))} {shlex.quote(str(p))} && "
                     f"mount -o remount,bind,ro {shlex.quote(str(p))} && " for p in read_only)
        script = (f"mount --bind {shlex.quote(str(self.passwd))} /etc/passwd && "
                  f"mount --bind {shlex.quote(str(self.group))} /etc/group && {ro}exec \"$@\"")
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]


def image_to_here(argv: list[str]) -> list[str]:
    """A container's argv with the image's venv replaced by this test's installed package."""
    here = Path(inst.installed_binary())
    return [str(here) if a == str(IMAGE_BIN) else a for a in argv]


def as_pod_user(uid: int, gid: int, argv: list[str]) -> list[str]:
    """runAsUser/runAsGroup/supplementalGroups, capabilities drop ALL, allowPrivilegeEscalation: false."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", f"--groups={gid}", "--inh-caps=-all",
            "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *argv]


@pytest.fixture
def node(tmp_path) -> Iterator[dict]:
    uid = _free_id(2742)
    gid = uid
    parent = new_runtime_dir()
    os.chmod(parent, 0o755)
    rd = parent / "run"
    rd.mkdir()  # as kubelet's DirectoryOrCreate makes it: root's, 0755
    os.chmod(rd, 0o755)
    lib = parent / "lib"
    lib.mkdir()
    os.chmod(lib, 0o755)
    files = NodeFiles(tmp_path, uid, gid)
    procs: list[subprocess.Popen] = []
    try:
        yield {"uid": uid, "gid": gid, "rd": rd, "lib": lib, "files": files, "procs": procs, "tmp": tmp_path,
               "config": parent / "flexnpu.toml"}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        shutil.rmtree(parent, ignore_errors=True)


def _start(node: dict, name: str, argv: list[str]) -> subprocess.Popen:
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "FLEXNPU_RUNTIME_DIR": str(node["rd"]),
           "FLEXNPU_CONFIG": str(node["config"])}
    log = open(node["tmp"] / f"{name}.log", "wb")
    p = subprocess.Popen(node["files"].wrap(argv), env=env, stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    node["procs"].append(p)
    return p


def _run_probe(node: dict, container: dict) -> subprocess.CompletedProcess:
    argv = as_pod_user(node["uid"], node["gid"], image_to_here(container["readinessProbe"]["exec"]["command"]))
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "FLEXNPU_RUNTIME_DIR": str(node["rd"])}
    return subprocess.run(node["files"].wrap(argv), env=env, capture_output=True, text=True,
                          timeout=container["readinessProbe"]["timeoutSeconds"] + 10)


def _until_probe(node: dict, container: dict, name: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = _run_probe(node, container)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline or proc.poll() is not None:
            log = (node["tmp"] / f"{name}.log").read_text(errors="replace")
            raise AssertionError(f"{name}: probe still failing after {timeout} s: {r.stderr.strip()}\n{log}")
        time.sleep(0.5)


@needs_root
def test_pod_commands_come_up_on_a_node(node, with_components):
    spec = pod_spec(with_components)
    cs = containers(with_components)
    node["config"].write_text(one(with_components, "ConfigMap")["data"]["flexnpu.toml"])
    os.chmod(node["config"], 0o644)  # as a ConfigMap volume's file: readable by the pod's user
    uid, gid, rd, lib = node["uid"], node["gid"], node["rd"], node["lib"]

    # the init container: its script, as root with CAP_CHOWN alone
    init = spec["initContainers"][0]
    assert init["command"] == ["/opt/flexnpu/libexec/flexnpu-prepare-node"]
    env = {e["name"]: e["value"] for e in init["env"]}
    env.update(FLEXNPU_RUNTIME_DIR=str(rd), FLEXNPU_HOST_LIB=str(lib), FLEXNPU_UID=str(uid),
               FLEXNPU_GID=str(gid), FLEXNPU_PYTHON=sys.executable, PATH=os.environ["PATH"])
    root_chown = ["setpriv", "--inh-caps=-all", "--bounding-set=-all,+chown", "--no-new-privs", "--", "sh",
                  str(PREPARE)]
    for _ in range(2):  # a restarted pod runs it again over what the first run made
        r = subprocess.run(node["files"].wrap(root_chown), env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    st = rd.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, 0o755)
    assert sorted(p.name for p in lib.iterdir()) == sorted(p.name for p in paths.native_lib_dir().glob("*.so"))
    assert "0 libraries updated" in r.stdout

    # a node whose group has another number: one line, and the pod does not start
    env_bad = {**env, "FLEXNPU_GID": str(gid + 1)}
    r = subprocess.run(node["files"].wrap(root_chown), env=env_bad, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "node-ids.yaml" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    # the services, each as its container runs it: the pod's uid and gid, no capability
    for name in ("emulator", "daemon-0", "controller"):
        proc = _start(node, name, as_pod_user(uid, gid, image_to_here(cs[name]["command"])))
        if name != "emulator":
            _until_probe(node, cs[name], name, proc, 60)
        else:
            deadline = time.monotonic() + 30
            while not paths.emulator_socket(rd).exists():
                assert time.monotonic() < deadline, (node["tmp"] / "emulator.log").read_text()
                time.sleep(0.2)
    assert oct(paths.gate_socket(0, rd).stat().st_mode & 0o777) == oct(paths.CLIENT_SOCKET_MODE)
    assert paths.gate_socket(0, rd).stat().st_gid == gid  # given to the node's flexnpu group

    # a serving process as the example pod runs it: another uid in the group, the shim from the
    # node's library dir (and, on this node without CANN, the emulated runtime from there too),
    # both host dirs read-only as the pod mounts them
    pod = yaml.safe_load(EXAMPLE.read_text())
    pod_env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert all(m["readOnly"] for m in pod["spec"]["containers"][0]["volumeMounts"])
    app_uid = _free_id(uid + 1)
    app_env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "FLEXNPU_ROLE": "decode",
               "LD_PRELOAD": str(lib / Path(pod_env["LD_PRELOAD"]).name), "FLEXNPU_RUNTIME_DIR": str(rd),
               "LD_LIBRARY_PATH": str(lib)}
    sample = paths.native_dir().parent / "samples" / "sample_loop.py"
    app = subprocess.Popen(node["files"].wrap(
        ["setpriv", f"--reuid={app_uid}", f"--regid={app_uid}", f"--groups={gid}", "--inh-caps=-all",
         "--bounding-set=-all", "--no-new-privs", "--", sys.executable, str(sample),
         str(paths.emulator_kernel_library()), "--seconds", "15", "--kernel-ms", "1"], read_only=(rd, lib)),
        env=app_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    node["procs"].append(app)
    listed = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = subprocess.run(node["files"].wrap(as_pod_user(uid, gid, [str(inst.installed_binary()), "gate", "list",
                                                                        "--device", "0", "--json"])),
                           env={"PATH": os.environ["PATH"], "FLEXNPU_RUNTIME_DIR": str(rd)},
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        listed = yaml.safe_load(r.stdout)
        if any(c.get("pid") and c.get("role") == "decode" for c in listed.get("clients", [])):
            break
        assert app.poll() is None, app.stdout.read().decode()
        time.sleep(0.5)
    else:
        raise AssertionError(f"the serving process was never admitted: {listed}")

    # a stopped daemon fails its probe
    daemon = node["procs"][1]
    daemon.terminate()
    daemon.wait(20)
    r = _run_probe(node, cs["daemon-0"])
    assert r.returncode == 1 and "no daemon for device 0" in r.stderr


def observer_interpreter(where: Path) -> Path:
    """What the Dockerfile makes: a copy of the interpreter in a venv's bin/, holding
    CAP_SYS_ADMIN as a file capability. Here the venv is a second one over this test's
    installed packages (its site-packages linked), so the copy runs the same code."""
    venv = Path(sys.prefix)
    (where / "bin").mkdir(parents=True)
    shutil.copy2(venv / "pyvenv.cfg", where / "pyvenv.cfg")
    lib = Path(sysconfig_purelib()).relative_to(venv)
    (where / lib).parent.mkdir(parents=True)
    (where / lib).symlink_to(venv / lib)
    py = where / "bin" / OBSERVER_PYTHON.name
    shutil.copy2(os.path.realpath(sys.executable), py)
    os.chmod(py, 0o755)
    subprocess.run(["setcap", "cap_sys_admin+ep", str(py)], check=True, capture_output=True)
    return py


def sysconfig_purelib() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def observe_has_metrics() -> bool:
    out = subprocess.run([str(inst.installed_binary()), "observe", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"}, timeout=60).stdout
    return "--metrics" in out


@needs_root
@pytest.mark.root_bpf
def test_observer_container_command_attaches_as_the_pod_user(node, rendered):
    """The observer's container: a non-root uid whose bounding set is CAP_SYS_ADMIN and whose
    other sets are empty (what Kubernetes gives a non-root container with capabilities.add),
    so the capability comes from the interpreter's file capability alone."""
    uid, gid = node["uid"], node["gid"]
    os.chown(node["rd"], uid, gid)  # what prepare-node does (tested above)
    node["config"].write_text("")
    os.chmod(node["config"], 0o644)
    py = observer_interpreter(node["rd"].parent / "venv")
    argv = image_to_here(containers(rendered)["observer"]["command"])
    assert argv[0] == str(OBSERVER_PYTHON)
    argv[0] = str(py)
    metrics = observe_has_metrics()
    if not metrics:
        # `flexnpu observe --metrics` comes with the Prometheus metrics; without them in this
        # build the rest of the command line is run
        warnings.warn("flexnpu observe has no --metrics in this build: the observer ran without it")
        assert argv[-2:] == METRICS_ARGS
        argv = argv[:-2]
    pod_caps = ["setpriv", f"--reuid={uid}", f"--regid={gid}", f"--groups={gid}", "--inh-caps=-all",
                "--ambient-caps=-all", "--bounding-set=-all,+sys_admin", "--"]

    # in a container without CAP_SYS_ADMIN in its bounding set the interpreter is refused at exec
    r = subprocess.run(as_pod_user(uid, gid, [str(py), "-c", "pass"]), capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r

    # a network namespace of its own with its loopback up, as a pod's is: --metrics 0.0.0.0:9464
    # binds there
    proc = _start(node, "observer", ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                                     *pod_caps, *argv])
    _until_probe(node, containers(rendered)["observer"], "observer", proc, 150)
    r = _run_probe(node, containers(rendered)["observer"])
    assert r.returncode == 0 and "source bpf" in r.stdout, r
    pid = _child_of(proc.pid, str(py))
    if metrics:  # served in the pod's own network namespace, where the Service's port reaches it
        get = ("import urllib.request; r = urllib.request.urlopen('http://127.0.0.1:9464/metrics', timeout=10); "
               "print(r.status); print(r.read().decode()[:20000])")
        r = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", get],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.startswith("200") and "# TYPE" in r.stdout, r
    status = Path(f"/proc/{pid}/status").read_text()
    eff = int(next(ln for ln in status.splitlines() if ln.startswith("CapEff:")).split()[1], 16)
    assert eff == 1 << 21, f"CapEff {eff:#x}: want CAP_SYS_ADMIN (bit 21) alone"
    uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(uid)}


def _child_of(pid: int, exe: str, timeout: float = 10.0) -> int:
    """The process under pid's wrappers (unshare, setpriv exec in place) that runs exe."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        todo = [pid]
        while todo:
            p = todo.pop()
            try:
                if os.path.realpath(f"/proc/{p}/exe") == os.path.realpath(exe):
                    return p
                todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
            except OSError:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no process running {exe} under {pid}")


@pytest.mark.parametrize("service,sock", [("observer", "observe.sock"), ("controller", "controller.sock"),
                                          ("daemon", "daemon-0.sock")])
def test_probe_fails_on_a_socket_left_behind(service: str, sock: str, runtime_dir: Path) -> None:
    """A probe asks the service: the socket file of a service that died does not pass."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(runtime_dir / sock))  # bound, never listening: what a killed process leaves
        argv = [str(inst.installed_binary()), "service", "probe", service, "--timeout", "0.5", "--json"]
        started = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "FLEXNPU_RUNTIME_DIR": str(runtime_dir)})
        took = time.monotonic() - started
    finally:
        s.close()
    assert r.returncode == 1, r
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    out = yaml.safe_load(r.stdout)
    assert out["ok"] is False and out["service"] == service and out["schema"] == 1
    assert took < 10, took
    r = subprocess.run([*argv[:3], "nothing"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "daemon, observer, controller" in r.stderr
