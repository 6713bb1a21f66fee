"""The container image, compose.yaml and the Kubernetes manifests.

Everything runs against the real Docker engine with the Debian client
(/usr/bin/docker) and Debian's docker-compose: the image is built once
per session from this checkout, on the base image that the
`python_base_image` fixture provides (a Debian stand-in where no
registry answers). Every container gets a unique name, publishes its
port on 127.0.0.1 with a host port the engine picks, and is removed in
teardown; the session image is removed at the end.

Health checks are shortened with `docker run --health-*` flags so a
test waits seconds, not the image's 15 s interval. Waits are bounded
only to catch a hang; no test asserts a duration (`docker stop --time 2`
turns "too slow" into an exit code instead).

The Kubernetes manifests are validated offline with kubernetes-validate
in strict mode against the schemas it ships.

Run: tests/run.sh tests/test_container.py (about 30 s on 2 cores once
the base image exists; a first run also builds the Debian stand-in).
"""

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager

import pytest
import yaml
from support import REPO_ROOT, require

pytestmark = pytest.mark.docker

MANIFESTS = sorted((REPO_ROOT / "deploy/kubernetes").glob("*.yaml"))
IMAGE_USER = "10001:10001"
READYZ_MISSING_DIRECTORY = {
    "status": "not ready",
    "reason": "the directory does not exist",
}

# Probes every second; two failures in a row make the container unhealthy.
FAST_HEALTH = (
    "--health-interval=1s",
    "--health-timeout=5s",
    "--health-retries=2",
    "--health-start-period=1s",
)
SERVER_OWNER_AND_MODE = (
    "import os; s = os.stat('/app/list_files_server.py'); "
    "print(s.st_uid, s.st_gid, oct(s.st_mode))"
)
HARDENED = (
    "--read-only",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
)

# Walks the file system inside a container and prints every path as JSON.
LIST_PATHS = """
import json, os
paths = []
for top, dirs, files in os.walk("/"):
    if top in ("/proc", "/sys", "/dev"):
        dirs[:] = []
        continue
    paths.extend(os.path.join(top, name) for name in dirs + files)
print(json.dumps(paths))
"""


def unique_name(prefix="listar-test"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def run(argv, **kwargs):
    """Run a command, capture its text output, never raise on failure."""
    return subprocess.run(
        argv, capture_output=True, text=True, check=False, **kwargs
    )


def succeed(argv, **kwargs):
    """Run a command that must exit 0; show its output when it does not."""
    result = run(argv, **kwargs)
    assert result.returncode == 0, (
        f"{argv} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def wait_for(condition, what, limit=60.0):
    """Poll `condition` until it returns a true value; fail after `limit`.

    The limit only bounds a hung wait: no test asserts how long it took.
    """
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


def http_get(address, path):
    """GET `path` from (host, port): (status, content type, JSON body)."""
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    kind = response.getheader("Content-Type", "")
    return response.status, kind, json.loads(body)


def answers(address, path="/healthz"):
    """True once the server behind `address` answers `path` with 200."""
    try:
        return http_get(address, path)[0] == 200
    except (OSError, http.client.HTTPException, ValueError):
        return False


def file_names(document):
    return sorted(entry["name"] for entry in document["files"])


def published_address(text):
    """Parse `docker port` output ("127.0.0.1:32768") into (host, port)."""
    host, port = text.splitlines()[0].strip().rsplit(":", 1)
    return host, int(port)


class Container:
    """A running container, addressed by its unique name."""

    def __init__(self, docker, name, port=5000):
        self.docker = docker
        self.name = name
        self.port = port

    def inspect(self, template):
        result = succeed(
            [self.docker, "inspect", "--format", template, self.name]
        )
        return json.loads(result.stdout)

    def logs(self):
        result = run([self.docker, "logs", self.name])
        return result.stdout + result.stderr

    @property
    def address(self):
        result = succeed([self.docker, "port", self.name, f"{self.port}"])
        return published_address(result.stdout)

    def python(self, code):
        """Run Python code in the container as its own user."""
        return run([self.docker, "exec", self.name, "python", "-c", code])

    def pid1_status(self):
        """/proc/1/status of the container as {field: value}."""
        result = succeed(
            [self.docker, "exec", self.name, "cat", "/proc/1/status"]
        )
        fields = (line.split(":", 1) for line in result.stdout.splitlines())
        return {key: value.strip() for key, value in fields}

    def wait_until_serving(self):
        address = self.address
        try:
            wait_for(lambda: answers(address), f"{self.name} to serve")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from None
        return address

    def health_transitions(self, final, limit=60.0):
        """Health states seen, in order and without repeats, up to `final`."""
        seen = []

        def reached():
            state = self.inspect("{{json .State.Health.Status}}")
            if not seen or seen[-1] != state:
                seen.append(state)
            return state == final

        try:
            wait_for(reached, f"{self.name} to become {final}", limit)
        except AssertionError as error:
            raise AssertionError(f"{error}; states seen: {seen}") from None
        return seen


@contextmanager
def running(docker, image, *flags, cwd=None, port=5000):
    """`docker run -d` the image with `flags`; remove it afterwards."""
    name = unique_name()
    argv = [docker, "run", "-d", "--name", name]
    argv += ["--publish", f"127.0.0.1::{port}", *flags, image]
    try:
        succeed(argv, cwd=cwd)
        yield Container(docker, name, port)
    finally:
        run([docker, "rm", "--force", "--volumes", name])


@pytest.fixture(scope="session")
def image(docker, python_base_image):
    """The project image, built once from the checkout like the README."""
    tag = f"{unique_name('listar-arquivos-test')}:1.0"
    succeed([docker, "build", "-t", tag, "."], cwd=REPO_ROOT)
    yield tag
    run([docker, "image", "rm", "--force", tag])


@pytest.fixture
def files_dir(tmp_path):
    """A host directory with two files, readable by any container user."""
    directory = tmp_path / "dados"
    directory.mkdir()
    for name in ("relatorio.csv", "notas fiscais.txt"):
        (directory / name).write_text(f"{name}\n")
    tmp_path.chmod(0o755)
    directory.chmod(0o755)
    return directory


# The README's commands -------------------------------------------------


def test_readme_run_and_curl_list_host_files_and_new_ones(
    docker, image, files_dir
):
    with running(
        docker, image, "-v", f"{files_dir}:/data/files", cwd=files_dir.parent
    ) as container:
        _, port = container.wait_until_serving()
        curl = [require("curl"), "--fail", "--silent", "--show-error"]
        url = f"http://localhost:{port}/files"

        listed = json.loads(succeed([*curl, url]).stdout)
        assert file_names(listed) == ["notas fiscais.txt", "relatorio.csv"]

        (files_dir / "novo.txt").write_text("novo\n")
        listed = json.loads(succeed([*curl, url]).stdout)
        assert file_names(listed) == [
            "notas fiscais.txt",
            "novo.txt",
            "relatorio.csv",
        ]

        logged = wait_for(
            lambda: access_log_lines(container, "/files"),
            "the access log to show the two listings in docker logs",
        )
        assert [(line["method"], line["status"]) for line in logged] == [
            ("GET", 200),
            ("GET", 200),
        ]


def access_log_lines(container, path):
    """The container's stdout access log lines for `path`, once two exist."""
    result = run([container.docker, "logs", container.name])
    lines = [json.loads(text) for text in result.stdout.splitlines()]
    matching = [line for line in lines if line["path"] == path]
    return matching if len(matching) >= 2 else None


def client_major_version(docker):
    result = succeed([docker, "version", "--format", "{{.Client.Version}}"])
    return int(result.stdout.strip().split(".", 1)[0])


RELATIVE_BIND_REFUSED = (
    'create ./dados: "./dados" includes invalid characters for a local '
    'volume name, only "[a-zA-Z0-9][a-zA-Z0-9_.-]" are allowed. If you '
    "intended to pass a host directory, use absolute path."
)


def test_readme_relative_mount_needs_a_docker_23_client(
    docker, image, files_dir
):
    """`-v ./dados:...` works from client 23 on; older ones refuse it.

    Clients before 23.0 pass "./dados" to the engine as a volume name;
    the README documents `-v "$PWD/dados":...` for them.
    """
    name = unique_name("app-listar")
    argv = [docker, "run", "-dp", "127.0.0.1::5000"]
    argv += ["-v", "./dados:/data/files", "--name", name, image]
    try:
        result = run(argv, cwd=files_dir.parent)
        if client_major_version(docker) >= 23:
            assert result.returncode == 0, result.stderr
            container = Container(docker, name)
            address = container.wait_until_serving()
            status, _, listed = http_get(address, "/files")
            assert status == 200
            assert file_names(listed) == [
                "notas fiscais.txt",
                "relatorio.csv",
            ]
        else:
            assert result.returncode == 125
            assert RELATIVE_BIND_REFUSED in result.stderr
    finally:
        run([docker, "rm", "--force", name])


# Health ------------------------------------------------------------------


def test_image_health_check_probes_readyz_with_python_and_a_timeout(
    docker, image
):
    result = succeed(
        [docker, "image", "inspect", "--format", "{{json .Config}}", image]
    )
    config = json.loads(result.stdout)
    check = config["Healthcheck"]

    assert check["Test"][:3] == ["CMD", "python", "-c"]
    assert "'/readyz'" in check["Test"][3]
    assert check["Timeout"] == 5_000_000_000
    assert config["Cmd"] == ["python", "/app/list_files_server.py"]
    assert config["Entrypoint"] is None
    assert config["ExposedPorts"] == {"5000/tcp": {}}
    assert {
        "FILE_DIRECTORY=/data/files",
        "PORT=5000",
        "PYTHONDONTWRITEBYTECODE=1",
        "PYTHONUNBUFFERED=1",
    } <= set(config["Env"])


def test_health_becomes_healthy_with_the_directory_mounted(
    docker, image, files_dir
):
    mount = f"{files_dir}:/data/files:ro"
    with running(docker, image, *FAST_HEALTH, "-v", mount) as container:
        seen = container.health_transitions("healthy")
        log = container.inspect("{{json .State.Health.Log}}")

    assert "unhealthy" not in seen
    assert log[-1]["ExitCode"] == 0


def test_health_check_follows_the_port_set_at_run_time(
    docker, image, files_dir
):
    mount = f"{files_dir}:/data/files:ro"
    flags = (*FAST_HEALTH, "-e", "PORT=6000", "-v", mount)
    with running(docker, image, *flags, port=6000) as container:
        seen = container.health_transitions("healthy")
        status, _, listed = http_get(container.address, "/files")

    assert "unhealthy" not in seen
    assert status == 200
    assert file_names(listed) == ["notas fiscais.txt", "relatorio.csv"]


def test_health_becomes_unhealthy_and_readyz_says_why_without_mount(
    docker, image
):
    with running(docker, image, *FAST_HEALTH) as container:
        seen = container.health_transitions("unhealthy")
        log = container.inspect("{{json .State.Health.Log}}")
        status, kind, body = http_get(container.address, "/readyz")
        live, _, _ = http_get(container.address, "/healthz")

    assert "healthy" not in seen
    assert log[-1]["ExitCode"] == 1
    assert status == 503
    assert kind.startswith("application/json")
    assert body == READYZ_MISSING_DIRECTORY
    assert live == 200


# Stopping ----------------------------------------------------------------


def test_docker_stop_ends_the_server_cleanly_before_the_kill(
    docker, image, files_dir
):
    """With --time 2 a server that ignored SIGTERM would be killed (137)."""
    mount = f"{files_dir}:/data/files:ro"
    with running(docker, image, "-v", mount) as container:
        container.wait_until_serving()
        stopped = run([docker, "stop", "--time", "2", container.name])
        state = container.inspect("{{json .State}}")

    assert stopped.returncode == 0, stopped.stderr
    assert state["Status"] == "exited"
    assert state["ExitCode"] == 0
    assert state["OOMKilled"] is False


# Hardening ---------------------------------------------------------------


def test_image_runs_as_a_numeric_non_root_user(docker, image, files_dir):
    mount = f"{files_dir}:/data/files:ro"
    with running(docker, image, "-v", mount) as container:
        container.wait_until_serving()
        configured = container.inspect("{{json .Config.User}}")
        status = container.pid1_status()
        server = container.python(SERVER_OWNER_AND_MODE)

    assert configured == IMAGE_USER
    assert server.stdout == "0 0 0o100444\n"
    assert status["Uid"].split() == ["10001"] * 4
    assert status["Gid"].split() == ["10001"] * 4


def test_hardened_flags_and_an_arbitrary_user_still_serve(
    docker, image, files_dir
):
    mount = f"{files_dir}:/data/files:ro"
    flags = (*HARDENED, "--user=4242:4242", "-v", mount)
    with running(docker, image, *flags) as container:
        address = container.wait_until_serving()
        files = http_get(address, "/files")
        ready = http_get(address, "/readyz")
        status = container.pid1_status()
        write_root = container.python("open('/tmp/probe', 'w')")
        write_mount = container.python("open('/data/files/probe', 'w')")

    assert files[0] == 200
    assert file_names(files[2]) == ["notas fiscais.txt", "relatorio.csv"]
    assert ready[0] == 200
    assert status["Uid"].split() == ["4242"] * 4
    assert status["Gid"].split() == ["4242"] * 4
    assert status["NoNewPrivs"] == "1"
    assert status["CapBnd"] == "0000000000000000"
    assert status["CapEff"] == "0000000000000000"
    assert "Read-only file system: '/tmp/probe'" in write_root.stderr
    assert "Read-only file system: '/data/files/probe'" in write_mount.stderr
    assert not (files_dir / "probe").exists()


def test_pinned_to_one_cpu_every_thread_stays_there_and_serves(
    docker, image, files_dir
):
    """The README's `--cpuset-cpus`: the server and the threads it starts
    per connection all run on that one CPU."""
    cpu = max(os.sched_getaffinity(0))
    mount = f"{files_dir}:/data/files:ro"
    flags = ("--cpuset-cpus", str(cpu), "-v", mount)
    with running(docker, image, *flags) as container:
        address = container.wait_until_serving()
        with socket.create_connection(address, 10) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert idle.recv(4096).startswith(b"HTTP/1.1 200 ")
            files = http_get(address, "/files")
            threads = container.python(
                "import glob\n"
                "for path in glob.glob('/proc/1/task/*/status'):\n"
                "    for line in open(path):\n"
                "        if line.startswith('Cpus_allowed_list:'):\n"
                "            print(line.split()[1])\n"
            )

    assert files[0] == 200
    assert file_names(files[2]) == ["notas fiscais.txt", "relatorio.csv"]
    allowed = threads.stdout.split()
    assert len(allowed) >= 3, threads  # main, accept, a connection's
    assert set(allowed) == {str(cpu)}


# Image contents ----------------------------------------------------------


def paths_in(docker, image):
    argv = [docker, "run", "--rm", "--network=none", "--user=0"]
    argv += ["--entrypoint", "python", image, "-c", LIST_PATHS]
    return set(json.loads(succeed(argv).stdout))


def test_image_adds_only_the_server_to_its_base(
    docker, image, python_base_image
):
    added = paths_in(docker, image) - paths_in(docker, python_base_image)

    assert added == {"/app", "/app/list_files_server.py"}


def test_image_holds_no_compiler_and_no_pip_cache(docker, image):
    paths = paths_in(docker, image)
    compilers = {"gcc", "cc", "c++", "g++", "clang", "tcc", "make"}
    bin_dirs = ("/usr/bin/", "/usr/local/bin/", "/bin/")

    found = {p for p in paths if p.startswith(bin_dirs)}
    assert {p.rsplit("/", 1)[1] for p in found} & compilers == set()
    assert [p for p in paths if "/.cache/pip" in p] == []


def test_python_version_build_arg_selects_the_base(docker, python_base_image):
    version = f"3.13-test{uuid.uuid4().hex[:8]}"
    base = f"python:{version}-slim"
    tag = f"{unique_name('listar-arquivos-test')}:1.0"
    succeed([docker, "tag", python_base_image, base])
    try:
        argv = [docker, "build", "--build-arg", f"PYTHON_VERSION={version}"]
        succeed([*argv, "-t", tag, "."], cwd=REPO_ROOT)
        labels = json.loads(
            succeed(
                [docker, "inspect", "--format", "{{json .Config.Labels}}", tag]
            ).stdout
        )
    finally:
        run([docker, "image", "rm", "--force", tag])
        run([docker, "image", "rm", base])

    assert labels["org.opencontainers.image.base.name"] == base
    assert labels["org.opencontainers.image.title"] == "listar-arquivos"
    assert labels["org.opencontainers.image.version"] == "1.0"


# Compose -----------------------------------------------------------------


def compose_env(**overrides):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("LISTAR_")
    }
    env.update(overrides)
    return env


def test_compose_file_is_valid_and_hardened():
    compose = require("docker-compose")
    argv = [compose, "-f", "compose.yaml", "-p", unique_name(), "config"]
    result = succeed(argv, cwd=REPO_ROOT, env=compose_env())
    service = yaml.safe_load(result.stdout)["services"]["app"]

    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert service["security_opt"] == ["no-new-privileges:true"]
    assert service["user"] == IMAGE_USER
    assert service["image"] == "listar-arquivos:1.0"
    assert service["ports"] == [{"published": 8080, "target": 5000}]
    assert service["volumes"] == [
        {
            "type": "bind",
            "source": str(REPO_ROOT / "dados"),
            "target": "/data/files",
            "read_only": True,
        }
    ]
    assert service["healthcheck"]["timeout"] == "5s"
    assert "'/readyz'" in service["healthcheck"]["test"][3]


def test_compose_file_with_a_misspelt_setting_is_rejected(tmp_path):
    compose = require("docker-compose")
    document = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    service = document["services"]["app"]
    service["readonly"] = service.pop("read_only")
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(document))

    result = run(
        [compose, "-f", "compose.yaml", "-p", unique_name(), "config"],
        cwd=tmp_path,
        env=compose_env(),
    )

    assert result.returncode == 1
    assert "Unsupported config option for services.app: 'readonly'" in (
        result.stderr
    )


def test_compose_up_serves_the_listing_hardened_then_down(
    docker, image, tmp_path, files_dir
):
    compose = require("docker-compose")
    shutil.copy(REPO_ROOT / "compose.yaml", tmp_path / "compose.yaml")
    project = unique_name().replace("-", "")
    base = [compose, "-f", "compose.yaml", "-p", project]
    env = compose_env(LISTAR_IMAGE=image, LISTAR_PORT="127.0.0.1:0")

    def compose_run(*args):
        return succeed([*base, *args], cwd=tmp_path, env=env)

    try:
        compose_run("up", "--detach", "--no-build")
        name = compose_run("ps", "-q", "app").stdout.strip()
        container = Container(docker, name)
        address = published_address(compose_run("port", "app", "5000").stdout)
        wait_for(lambda: answers(address), "compose service to serve")
        status, _, listed = http_get(address, "/files")
        host = container.inspect("{{json .HostConfig}}")
        mounts = container.inspect("{{json .Mounts}}")
        check = container.inspect("{{json .Config.Healthcheck.Test}}")
        probe = run([docker, "exec", name, *check[1:]])
        compose_run("down", "--volumes")
        left = run([docker, "inspect", name])
    finally:
        run([*base, "down", "--volumes"], cwd=tmp_path, env=env)

    assert status == 200
    assert file_names(listed) == ["notas fiscais.txt", "relatorio.csv"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert [(m["Destination"], m["RW"]) for m in mounts] == [
        ("/data/files", False)
    ]
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert left.returncode == 1


# Kubernetes --------------------------------------------------------------

K8S_VERSIONS = ("1.30.0", "1.37.0")


def kubernetes_validate(*paths, version):
    validator = require("kubernetes-validate")
    argv = [validator, "--strict", "--kubernetes-version", version]
    return run([*argv, *map(str, paths)], cwd=REPO_ROOT)


def load_manifests():
    documents = {}
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            documents[document["kind"]] = document
    return documents


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_strictly(version):
    result = kubernetes_validate(*MANIFESTS, version=version)

    assert result.returncode == 0, result.stdout + result.stderr
    kinds = sorted(load_manifests())
    assert kinds == [
        "Deployment",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
    ]
    for path in MANIFESTS:
        assert f"INFO {path} passed for resource" in result.stdout


def misspell_a_security_field(deployment):
    context = deployment["spec"]["template"]["spec"]["containers"][0][
        "securityContext"
    ]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    return "('readOnlyRootFileSystem' was unexpected)"


def give_replicas_a_string(deployment):
    deployment["spec"]["replicas"] = "two"
    return "spec.replicas: 'two' is not of type 'integer'"


@pytest.mark.parametrize(
    "breakage", [misspell_a_security_field, give_replicas_a_string]
)
def test_kubernetes_validation_rejects_a_broken_deployment(tmp_path, breakage):
    deployment = load_manifests()["Deployment"]
    expected = breakage(deployment)
    broken = tmp_path / "deployment.yaml"
    broken.write_text(yaml.safe_dump(deployment))

    result = kubernetes_validate(broken, version=K8S_VERSIONS[-1])

    assert result.returncode == 1
    assert f"ERROR {broken} did not validate" in result.stdout
    assert expected in result.stdout


def test_kubernetes_deployment_probes_and_restricted_security():
    manifests = load_manifests()
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    assert container["livenessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "http",
    }
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": "http",
    }
    assert container["ports"][0]["containerPort"] == 5000
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert set(container["resources"]) == {"limits", "requests"}
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert container["volumeMounts"] == [
        {"name": "files", "mountPath": "/data/files", "readOnly": True}
    ]


def test_kubernetes_service_budget_and_claim_select_the_deployment():
    manifests = load_manifests()
    deployment = manifests["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    budget = manifests["PodDisruptionBudget"]["spec"]

    selected = manifests["Service"]["spec"]["selector"].items()
    assert selected <= pod_labels.items()
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["minAvailable"] < deployment["spec"]["replicas"]
    assert manifests["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert volume["persistentVolumeClaim"] == {
        "claimName": manifests["PersistentVolumeClaim"]["metadata"]["name"],
        "readOnly": True,
    }
