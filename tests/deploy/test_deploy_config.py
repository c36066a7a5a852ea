"""The deployment files agree with each other: docker-compose wiring, Dockerfile, Prometheus and
locust configuration. No Docker engine is needed; the files are parsed and cross-checked."""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _environment(service: dict) -> dict[str, str]:
    """A service's environment as a dict, whichever of compose's two syntaxes it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _mounts(service: dict, mode: str | None = None) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry "source:target[:mode]" (of that ``mode`` alone if given;
    no mode is "rw")."""
    mounts = []
    for entry in service.get("volumes", []):
        source, target, *rest = entry.split(":")
        if mode is None or (rest or ["rw"])[0] == mode:
            mounts.append((source, target))
    return mounts


def _is_named_volume(source: str) -> bool:
    return not source.startswith((".", "/", "~"))


def _option(command: list[str], flag: str) -> str:
    """Value of ``--flag value`` or ``--flag=value`` in an exec-form command."""
    for i, arg in enumerate(command):
        if arg == flag:
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not found in {command}")


def _recommender_container_port() -> int:
    recommender = SERVICES["recommender"]
    port = int(_option(recommender["command"], "--port"))
    exposed = {int(str(p)) for p in recommender["expose"]}
    assert port in exposed, f"uvicorn listens on {port} but compose exposes {exposed}"
    return port


def _nginx_config() -> tuple[str, int]:
    """deploy/nginx.conf as compose mounts it, and the port its server listens on."""
    sources = [source for source, target in _mounts(SERVICES["nginx"]) if target == "/etc/nginx/nginx.conf"]
    assert sources, "nothing mounted at /etc/nginx/nginx.conf"
    text = (ROOT / sources[0]).read_text()
    return text, int(re.search(r"^\s*listen (\d+);", text, re.M).group(1))


def test_trainer_fills_the_volume_the_recommender_reads():
    trainer, recommender = SERVICES["trainer"], SERVICES["recommender"]
    out_dir = _option(trainer["command"], "--out")
    trainer_volume = dict((target, source) for source, target in _mounts(trainer)).get(out_dir)
    assert trainer_volume is not None, f"trainer writes to {out_dir} but mounts no volume there"
    assert _is_named_volume(trainer_volume)

    bundle_dir = _environment(recommender)["RECSYS_BUNDLE_DIR"]
    assert (trainer_volume, bundle_dir) in _mounts(recommender), (
        f"recommender must mount volume {trainer_volume!r} at RECSYS_BUNDLE_DIR={bundle_dir}"
    )


def test_recommender_starts_after_trainer_succeeds():
    depends_on = SERVICES["recommender"]["depends_on"]
    assert depends_on["trainer"]["condition"] == "service_completed_successfully"


def test_recommender_and_trainer_share_one_image():
    trainer, recommender = SERVICES["trainer"], SERVICES["recommender"]
    assert trainer["image"] == recommender["image"]
    assert recommender["healthcheck"]["test"], "recommender needs a health check for its dependants"


def test_prometheus_scrapes_the_recommender():
    prometheus = SERVICES["prometheus"]
    config_path = _option(prometheus["command"], "--config.file")
    sources = [source for source, target in _mounts(prometheus) if target == config_path]
    assert sources, f"nothing mounted at prometheus's --config.file {config_path}"
    config_file = ROOT / sources[0]
    assert config_file.is_file(), f"{sources[0]} is mounted but not in the repo"

    config = yaml.safe_load(config_file.read_text())
    # every replica is a target: DNS service discovery on the compose service name (one A record per replica)
    discovered = {
        (job.get("metrics_path", "/metrics"), name, sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
        if sd.get("type") == "A"
    }
    assert ("/metrics", "recommender", _recommender_container_port()) in discovered
    assert prometheus["depends_on"]["recommender"]["condition"] == "service_healthy"


def test_locust_targets_the_recommender():
    locust = SERVICES["locust"]
    locustfile = _option(locust["command"], "-f")
    sources = [source for source, target in _mounts(locust) if target == locustfile]
    assert sources, f"nothing mounted at locust's -f {locustfile}"
    assert (ROOT / sources[0]).is_file(), f"{sources[0]} is mounted but not in the repo"

    host = urlparse(_option(locust["command"], "--host"))
    assert (host.hostname, host.port) == ("nginx", _nginx_config()[1])


def test_locust_has_the_client_its_locustfile_imports():
    """The locustfile drives the service through service/client.py: mounted beside it as a package, with the
    httpx that pyproject.toml pins installed first (the locust image has none)."""
    locust = SERVICES["locust"]
    package = Path(_option(locust["command"], "-f")).parent / "service"
    mounted = {target: source for source, target in _mounts(locust)}
    for module in ("__init__.py", "client.py"):
        assert mounted.get(str(package / module)) == f"./service/{module}", mounted
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    httpx = next(pin for pin in pins if pin.startswith("httpx=="))
    assert f"pip install --quiet --no-cache-dir {httpx} && exec locust" in " ".join(locust["entrypoint"])


def test_nginx_fronts_the_recommender_and_is_the_only_published_http_port():
    text, listen = _nginx_config()
    assert re.search(rf"server recommender:{_recommender_container_port()}\b", text)
    assert f"8000:{listen}" in [str(p) for p in SERVICES["nginx"]["ports"]]
    assert "ports" not in SERVICES["recommender"]  # clients go through the edge
    for directive in ("client_header_timeout", "client_body_timeout", "client_max_body_size"):
        assert re.search(rf"^\s*{directive} ", text, re.M), f"{directive} missing: slow clients must be cut off at the edge"
    assert SERVICES["recommender"]["command"][:3] == ["python", "-m", "service"]  # runs uvicorn with HeadDeadline


def test_nginx_config_passes_nginx_t(tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip(reason="nginx not installed (.ci/run installs it: apt-get install nginx)")
    text, _ = _nginx_config()
    config = tmp_path / "nginx.conf"  # compose's service name does not resolve here: point it at loopback
    config.write_text(text.replace("server recommender:", "server 127.0.0.1:"))
    result = subprocess.run([nginx, "-t", "-c", str(config), "-e", "stderr", "-g", f"pid {tmp_path / 'nginx.pid'};"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr


def test_every_named_volume_is_declared():
    declared = set(COMPOSE.get("volumes") or {})
    used = {
        source
        for service in SERVICES.values()
        for source, _ in _mounts(service)
        if _is_named_volume(source)
    }
    assert used, "expected named volumes (artifacts, data)"
    assert used <= declared, f"undeclared volumes: {sorted(used - declared)}"


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), " ".join(m.group(2).split())) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def _build_args() -> dict[str, str | None]:
    """ARG name -> its default (None: no default, unset unless given)."""
    found = {}
    for keyword, args in _dockerfile():
        if keyword == "ARG":
            name, equals, default = args.partition("=")
            found[name] = default if equals else None
    return found


def test_dockerfile_is_slim_cpu_nonroot_and_health_checked():
    instructions = _dockerfile()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "Dockerfile has no USER line"
    assert users[-1].split(":")[0] not in {"root", "0"}, "the final USER must not be root"
    assert any(keyword == "HEALTHCHECK" for keyword, _ in instructions)
    assert any(keyword == "EXPOSE" and args.split()[0] == "8000" for keyword, args in instructions)
    # python:3.11-slim by default; a build argument so that CI can build on a base it made itself (.ci/image)
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert [args for keyword, args in instructions if keyword == "FROM"] == ["${BASE_IMAGE}"]


def test_dockerfile_takes_the_cpu_torch_from_pytorchs_index_by_default():
    """The torch source is a build argument (CI points it at a local wheel) whose default is the real one: the CPU
    build from PyTorch's own index, nothing else added; the version is the one constraints.txt pins."""
    args = _build_args()
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", "torch must be the CPU build"
    assert args["TORCH_FIND_LINKS"] == "", "no extra wheel directory by default"
    assert args["PIP_CONFIG_FILE"] is None, "a build-time pip configuration only when one is given"
    pin = (ROOT / "constraints.txt").read_text().split()[0]
    (install,) = [run for keyword, run in _dockerfile() if keyword == "RUN" and "pip install torch" in run]
    assert f"pip install {pin} " in install and '--index-url "$TORCH_INDEX_URL"' in install
    assert '${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"}' in install


def test_dockerfile_builds_hnswlib_portably():
    """hnswlib compiles in the image (no wheel) and adds -march=native unless HNSWLIB_NO_NATIVE is set: an image built
    on one CPU would die with SIGILL on a node without the instructions that CPU had. Set before the install."""
    instructions = _dockerfile()
    install = next(i for i, (keyword, args) in enumerate(instructions)
                   if keyword == "RUN" and "pip install -c constraints.txt -r /tmp/requirements.txt" in args)
    env = " ".join(args for keyword, args in instructions[:install] if keyword in ("ENV", "ARG"))
    assert re.search(r"(^|\s)HNSWLIB_NO_NATIVE=1(\s|$)", env), "HNSWLIB_NO_NATIVE=1 must be set before pip builds hnswlib"
    assert "hnswlib==" in (ROOT / "pyproject.toml").read_text()


def test_dockerfile_installs_the_dependencies_before_the_source_comes_in():
    """A change of the source rebuilds one small layer, not every dependency (hnswlib's compile among them): the
    dependencies are installed from pyproject.toml and constraints.txt alone, then the project without them."""
    instructions = _dockerfile()
    copies = [i for i, (keyword, _) in enumerate(instructions) if keyword == "COPY"]
    assert [instructions[i][1] for i in copies] == ["pyproject.toml constraints.txt ./", ". ."]
    deps = next(i for i, (keyword, args) in enumerate(instructions) if keyword == "RUN" and "-r /tmp/requirements.txt" in args)
    assert copies[0] < deps < copies[1]
    assert instructions[copies[1] + 1] == ("RUN", "pip install --no-deps -c constraints.txt .")


def test_dockerfile_commands_run_from_a_venv_on_path():
    """python, pip and uvicorn are the venv's on any base (Debian's python3 has no `python`, and PEP 668 refuses
    system-wide installs): the venv is made before the first pip install and comes first on PATH."""
    instructions = _dockerfile()
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    venv = re.search(r"VIRTUAL_ENV=(\S+)", env).group(1)
    assert re.search(rf"PATH={re.escape(venv)}/bin:\$PATH", env)
    first_pip = next(args for keyword, args in instructions if keyword == "RUN" and "pip install" in args)
    assert first_pip.startswith('python3 -m venv "$VIRTUAL_ENV"')


def test_ci_builds_and_runs_the_image_with_build_args_the_dockerfile_declares():
    """.ci/run runs .ci/image (the image built with buildah and run with podman, the trainer and the service from it);
    every --build-arg it passes is an ARG of the Dockerfile (a renamed one would be ignored with a warning)."""
    run = (ROOT / ".ci/run").read_text()
    assert re.search(r"^\.ci/image\b", run, re.M), ".ci/run does not run .ci/image"
    script = (ROOT / ".ci/image").read_text()
    passed = set(re.findall(r'--build-arg "(\w+)=', script))
    assert {"BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_FIND_LINKS", "PIP_CONFIG_FILE"} <= passed
    assert passed <= set(_build_args())


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(reason="promtool not on PATH (apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "config", "deploy/prometheus.yml"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_loads_the_alert_rules_and_they_pass_their_unit_tests():
    """Compose mounts deploy/k8s/alert-rules.yml where prometheus.yml's rule_files look; promtool checks the rules
    and runs tests/deploy/alert-rules.test.yml (each alert fires on the series that should fire it, and only then)."""
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = [target for source, target in _mounts(SERVICES["prometheus"]) if source == "./deploy/k8s/alert-rules.yml"]
    assert targets and any(fnmatch.fnmatch(targets[0], pattern) for pattern in config["rule_files"])
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(reason="promtool not on PATH (apt-get install prometheus)")
    for command in (["check", "rules", "deploy/k8s/alert-rules.yml"], ["test", "rules", "tests/deploy/alert-rules.test.yml"]):
        result = subprocess.run([promtool, *command], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    """Compose's Grafana reads its data source and dashboard provider from deploy/grafana/provisioning, the provider
    looks where the dashboards are mounted, the data source is compose's Prometheus, and every panel queries it
    (each query is checked against a real Prometheus in tests/service/test_prometheus_integration.py)."""
    grafana = SERVICES["grafana"]
    mounts = dict(_mounts(grafana))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert urlparse(source["url"]).hostname == "prometheus" and urlparse(source["url"]).port == 9090
    assert "prometheus" in grafana["depends_on"]
    (provider,) = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/recsys.yml").read_text())["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/recsys.json").read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]} | {t["datasource"]["uid"] for p in dashboard["panels"]
                                                                     for t in p["targets"]}
    assert uids == {source["uid"]}


@pytest.fixture
def load_locustfile(monkeypatch):
    """Import bench/locustfile.py by path, as locust does, with a given environment.

    Locust monkey-patches the standard library with gevent on import unless told not to; that
    would leak into every later test in this process, so it is switched off here.
    """
    if importlib.util.find_spec("locust") is None:
        pytest.skip(reason="locust is not installed")
    monkeypatch.setenv("LOCUST_SKIP_MONKEY_PATCH", "1")

    def load(**env: str):
        for name in ("LOCUST_USER_IDS", "LOCUST_ITEM_IDS", "LOCUST_EVENT_USER_IDS", "LOCUST_RPS_PER_USER"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        spec = importlib.util.spec_from_file_location("bench_locustfile", ROOT / "bench" / "locustfile.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def test_locust_id_ranges_expand_to_raw_ids(load_locustfile):
    locustfile = load_locustfile()
    assert locustfile.parse_id_range("1-3") == ["1", "2", "3"]
    assert locustfile.parse_id_range("1-2, 7,10-10") == ["1", "2", "7", "10"]
    for bad in ["", "1-", "a-3", "5-3", "1,,2"]:
        with pytest.raises(ValueError, match="id spec"):
            locustfile.parse_id_range(bad)


def test_locust_pools_default_to_movielens_and_events_can_be_separated(load_locustfile):
    default = load_locustfile()
    assert len(default.USER_IDS) == 943 and len(default.ITEM_IDS) == 1682
    assert default.EVENT_USER_IDS == default.USER_IDS

    separate = load_locustfile(LOCUST_USER_IDS="1-10", LOCUST_EVENT_USER_IDS="2000-2004")
    assert separate.USER_IDS == [str(i) for i in range(1, 11)]
    assert separate.EVENT_USER_IDS == [str(i) for i in range(2000, 2005)]


def test_locust_mix_is_mostly_known_user_recommendations(load_locustfile):
    user_class = load_locustfile().RecommenderUser
    names = [task.__name__ for task in user_class.tasks]  # locust expands weights into repeats
    assert max(set(names), key=names.count) == "recommend_known_user"
    known_users = names.count("recommend_known_user") + names.count("recommend_known_user_filtered")
    assert known_users > len(names) / 2
    assert {"recommend_cold_start", "post_event", "similar_items"} <= set(names)


def test_replicas_share_state_on_redis_with_aof_on_a_volume():
    redis, recommender = SERVICES["redis"], SERVICES["recommender"]
    command = redis["command"]
    assert _option(command, "--appendonly") == "yes" and _option(command, "--appendfsync") == "always"
    assert [target for source, target in _mounts(redis) if _is_named_volume(source)] == ["/data"]
    env = _environment(recommender)
    assert env["RECSYS_STATE_BACKEND"] == "redis" and urlparse(env["RECSYS_REDIS_URL"]).hostname == "redis"
    assert recommender["depends_on"]["redis"]["condition"] == "service_healthy"
    assert recommender["deploy"]["replicas"] >= 2 and int(_option(recommender["command"], "--workers")) >= 2


def test_retrain_job_reads_the_replicas_events_and_writes_the_bundle_root_they_watch():
    retrain, recommender = SERVICES["retrain"], SERVICES["recommender"]
    script = " ".join(retrain["command"])
    assert "python -m offline retrain" in script
    events = re.search(r"--events (\S+)", script).group(1).strip('"')
    assert re.fullmatch(r"\$\$\{?RECSYS_REDIS_URL\}?", events), events  # read from its environment (a shell variable)
    assert _environment(retrain)["RECSYS_REDIS_URL"] == _environment(recommender)["RECSYS_REDIS_URL"]
    out = re.search(r"--out ([^\s;]+)", script).group(1)
    assert out == _environment(recommender)["RECSYS_BUNDLE_DIR"]
    assert ("artifacts", out) in _mounts(retrain, "rw") and ("artifacts", out) in _mounts(recommender, "ro")
    assert float(_environment(recommender)["RECSYS_BUNDLE_POLL_S"]) > 0  # the replicas follow what it promotes
