"""`python -m webapp run`: starts its own Redis (AOF on, data in ./var), the web app and a worker; Ctrl-C
stops all of it; without redis-server it says how to install it in one line, and a bad setting stops it (and
`python -m workers`, and gunicorn with webapp/gunicorn.conf.py) with one line naming the setting."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import redis

from conftest import ROOT
from webapp.config import (ConfigError, default_web_workers, load_settings, parse_signing_keys,
                           signing_key_ring)

KEYS, TOKEN = "k1:a-secret-of-the-test", "an-api-token-of-the-test"


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "API_TOKEN", "SIGNING_KEYS",
                                                              "PUBLIC_BASE_URL", "VAR_DIR")}
    return {**env, "PYTHONPATH": ROOT, **extra}


def start_run(tmp_path, **env):
    """`python -m webapp run` in tmp_path (with `env` added to its environment), once it serves and its worker
    has registered: (process, port)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "webapp", "run"], cwd=tmp_path,
                            env=clean_env(PORT=str(port), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/static/pages.css", timeout=1).read()
            break
        except OSError:
            time.sleep(0.2)
    deadline = time.time() + 20
    while time.time() < deadline and not _worker_registered(tmp_path):
        time.sleep(0.2)
    return proc, port


def test_run_starts_redis_web_and_worker_and_ctrl_c_stops_them(tmp_path):
    proc, port = start_run(tmp_path)
    try:
        secrets_file = tmp_path / "var" / "dev-secrets.json"
        token = json.loads(secrets_file.read_text())["API_TOKEN"]       # generated development default
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1.1/resources/list", data=b"{}",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(req, timeout=5).read())["error"] == 0
        assert (tmp_path / "var" / "redis" / "appendonlydir").is_dir()                  # AOF on, under ./var
        # The data holds every rtoken, webhook secret and SMID: readable by this user only.
        data = tmp_path / "var" / "redis"
        assert [p.name for p in [data, *data.rglob("*")] if p.stat().st_mode & 0o077 and not p.is_socket()] == []
        children = subprocess.run(["pgrep", "-f", str(tmp_path / "var" / "redis")], capture_output=True,
                                  text=True).stdout.split()
        assert children                                                                # its own redis-server
        assert _worker_registered(tmp_path)
        web, workers = _gunicorn_master(proc.pid), []
        for _ in range(50):                                                            # forked one by one
            workers = subprocess.run(["pgrep", "-P", str(web)], capture_output=True, text=True).stdout.split()
            if len(workers) >= default_web_workers():
                break
            time.sleep(0.1)
        assert len(workers) == default_web_workers()                                  # two per core
    finally:
        proc.send_signal(signal.SIGINT)                                                # Ctrl-C
        out, _ = proc.communicate(timeout=40)
    assert proc.returncode == 0, out
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "var" / "redis")], capture_output=True).returncode == 1
    assert f"Web app on http://127.0.0.1:{port}" in out and out.rstrip().endswith("Stopped.")
    assert "hash-max-listpack-value" not in out and "appendonly is off" not in out  # run sets both


def test_a_killed_run_takes_everything_it_started_with_it(tmp_path):
    """kill -9 of `run` (a terminal's killall, a test's timeout) leaves it no moment to stop its children:
    they are told by the kernel and stop by themselves, Redis writing its AOF."""
    proc, port = start_run(tmp_path)
    children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
    assert len(children) == 3                                                   # redis-server, web, worker
    proc.kill()
    proc.communicate()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.2)
    assert [pid for pid in children if _alive(pid)] == []
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/static/pages.css", timeout=2)


def test_a_taken_port_is_said_before_anything_starts(tmp_path):
    """Another server on the port: one line says so, nothing starts, no success is announced."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "webapp", "run"], cwd=tmp_path, env=clean_env(PORT=str(port)),
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Web app on" not in result.stdout
    assert [line for line in result.stderr.splitlines() if "Port" in line] == [
        f"Port {port} of 127.0.0.1 is in use (another server?): set PORT to a free one"]
    assert not (tmp_path / "var" / "redis").exists()


def test_a_second_run_in_the_same_place_is_refused_and_closing_the_terminal_stops_the_first(tmp_path):
    proc, port = start_run(tmp_path)
    try:
        second = subprocess.run([sys.executable, "-m", "webapp", "run"], cwd=tmp_path,
                                env=clean_env(PORT=str(free_port())), capture_output=True, text=True, timeout=30)
        assert second.returncode == 1 and "Another `python -m webapp run` is using" in second.stderr
        assert "Traceback" not in second.stderr
        assert redis.Redis.from_url(f"unix://{tmp_path}/var/redis/redis.sock").ping()   # the first one's, intact
        urllib.request.urlopen(f"http://127.0.0.1:{port}/static/pages.css", timeout=5).read()
        children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                       text=True).stdout.split()]
    finally:
        proc.send_signal(signal.SIGHUP)                                                # the terminal closed
        out, _ = proc.communicate(timeout=40)
    assert proc.returncode == 0, out
    left = subprocess.run(["pgrep", "-g", ",".join(map(str, children))], capture_output=True, text=True).stdout
    assert len(children) == 3 and not [pid for pid in left.split() if _alive(int(pid))]


def test_ctrl_c_while_redis_is_starting_leaves_nothing_running(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slow = bin_dir / "redis-server"   # a redis-server that takes a while to come up
    slow.write_text(f"#!/bin/sh\nsleep 1\nexec {shutil.which('redis-server')} \"$@\"\n")
    slow.chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PORT=str(free_port()))
    proc = subprocess.Popen([sys.executable, "-m", "webapp", "run"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20                        # past the settings, waiting for Redis to answer
    while not (tmp_path / "var" / "redis" / "run.lock").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in out, out
    time.sleep(1.0)                                    # what the stopped start would have execed by now
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "var" / "redis")], capture_output=True).returncode == 1


def test_a_second_ctrl_c_while_stopping_still_stops_everything(tmp_path):
    proc, _port = start_run(tmp_path)
    children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
    assert len(children) == 3                                                      # redis, gunicorn, worker
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)                                                                # stopping: web and worker
    assert proc.poll() is None and any(_alive(pid) for pid in children)            # take longer than this
    proc.send_signal(signal.SIGINT)                                                # the impatient second Ctrl-C
    out, _ = proc.communicate(timeout=40)
    assert proc.returncode == 0 and "Traceback" not in out, out
    # Each child leads its own process group: nothing of it is left (gunicorn's workers, RQ's scheduler).
    left = subprocess.run(["pgrep", "-g", ",".join(map(str, children))], capture_output=True, text=True).stdout
    assert not [pid for pid in left.split() if _alive(int(pid))]


def _gunicorn_master(run_pid):
    for pid in subprocess.run(["pgrep", "-P", str(run_pid)], capture_output=True, text=True).stdout.split():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"gunicorn" in f.read():
                return int(pid)
    raise AssertionError("no gunicorn under `run`")


def test_web_workers_default_to_two_per_core_and_can_be_set(tmp_path):
    settings = load_settings({"VAR_DIR": str(tmp_path)}, dotenv_path=tmp_path / ".env")
    assert settings["WEB_WORKERS"] == default_web_workers() == max(2, 2 * os.cpu_count())
    assert load_settings({"VAR_DIR": str(tmp_path), "WEB_WORKERS": "3"},
                         dotenv_path=tmp_path / ".env")["WEB_WORKERS"] == 3


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"                         # a zombie has exited


def _worker_registered(tmp_path):
    import redis
    try:
        client = redis.Redis.from_url(f"unix://{tmp_path}/var/redis/redis.sock")
        return bool(client.smembers("rq:workers"))
    except (redis.ConnectionError, FileNotFoundError):
        return False


def test_run_without_redis_server_says_how_to_install_it(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    env = clean_env(PATH=str(bin_dir))
    assert shutil.which("redis-server", path=str(bin_dir)) is None
    result = subprocess.run([sys.executable, "-m", "webapp", "run"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "redis-server" in line]
    assert lines == ["redis-server is not installed: sudo apt-get install -y redis-server (or set REDIS_URL)"]


@pytest.mark.parametrize("command", [["webapp", "run"], ["workers"],
                                     ["gunicorn", "-c", os.path.join(ROOT, "webapp", "gunicorn.conf.py"), "-b",
                                      "127.0.0.1:0", "webapp:create_app()"]], ids=["run", "workers", "gunicorn"])
@pytest.mark.parametrize("setting, value", [("SDK_RATE_LIMIT_PER_IP", "lots"), ("SIGNING_KEYS", "no-colon"),
                                            ("PORT", "80a"), ("TIME_UNIT_SECONDS", "0"),
                                            ("REDIS_URL", "localhost:6379"), ("REDIS_URL", "redis://localhost:63a9"),
                                            ("REDIS_URL", "redis://localhost:6379/zero"), ("REDIS_URL", "unix://"),
                                            ("REDIS_URL", "redis://localhost:6379/0?socket_timeot=5"),
                                            ("PUBLIC_BASE_URL", "https://u.example/x>, <mailto:x@y")])
def test_a_bad_setting_stops_the_command_with_its_message_before_anything_starts(tmp_path, command, setting, value):
    result = subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, env=clean_env(**{setting: value}),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert error_lines[0].startswith(f"Configuration error: {setting} ") and "Traceback" not in result.stderr
    assert not (tmp_path / "var" / "redis").exists()  # no local Redis was started


@pytest.mark.parametrize("command", [["webapp", "run"], ["workers"]], ids=["run", "workers"])
def test_a_redis_that_does_not_answer_is_said_in_one_line_without_its_password(tmp_path, command):
    """REDIS_URL well formed but nothing answers there (a typo in the host or port, Redis not started): `run`
    and the worker say so in one line, not with redis-py's traceback, and show no password of the URL."""
    port = free_port()  # free: nothing listens there
    env = clean_env(REDIS_URL=f"redis://:hunter2-secret@127.0.0.1:{port}/0", PORT=str(free_port()),
                    API_TOKEN=TOKEN, SIGNING_KEYS=KEYS)
    result = subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Redis at redis://:***@127.0.0.1:{port}/0 does not answer (Error 111 connecting to 127.0.0.1:{port}. "
        "Connection refused.): start it, or correct REDIS_URL")
    assert "hunter2" not in result.stderr + result.stdout and "Web app on" not in result.stdout


def test_a_bad_redis_url_is_named_without_its_password():
    with pytest.raises(ConfigError, match=r"^REDIS_URL 'redis://u:\*\*\*@h:63a9/0' cannot be used: Port") as caught:
        load_settings({"API_TOKEN": TOKEN, "SIGNING_KEYS": KEYS, "REDIS_URL": "redis://u:pass@h:63a9/0"},
                      dotenv_path="/nonexistent")
    assert "pass" not in str(caught.value)


@pytest.mark.parametrize("command", [["webapp", "run"], ["workers"],
                                     ["gunicorn", "-c", os.path.join(ROOT, "webapp", "gunicorn.conf.py"), "-b",
                                      "127.0.0.1:0", "webapp:create_app()"]], ids=["run", "workers", "gunicorn"])
@pytest.mark.parametrize("given", [{}, {"SIGNING_KEYS": "k1:a-secret-of-the-install"}, {"API_TOKEN": "an-api-token"},
                                   {"SIGNING_KEY": "k1:a-secret-of-the-install"}], ids=["none", "keys", "token", "typo"])
def test_a_public_address_without_its_secrets_is_refused_rather_than_given_generated_ones(tmp_path, command, given):
    """Development secrets are one machine's (var/dev-secrets.json): on a production address, links signed by one
    instance would be 404 on every other, and all of them after a new VAR_DIR. So SIGNING_KEYS and API_TOKEN must
    be set there (a name mistyped counts as not set), and nothing is generated. The worker signs and checks no
    link: it starts without them (here it goes on to find that Redis does not answer)."""
    env = clean_env(PUBLIC_BASE_URL="https://unsub.example.com", REDIS_URL="redis://127.0.0.1:1/0", **given)
    result = subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    missing = "API_TOKEN" if "SIGNING_KEYS" in given else "SIGNING_KEYS"
    first = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Redis" in line][0]
    assert first == ("Redis at redis://127.0.0.1:1/0 does not answer (Error 111 connecting to 127.0.0.1:1. "
                     "Connection refused.): start it, or correct REDIS_URL" if command == ["workers"] else
                     f"Configuration error: {missing} is not set: PUBLIC_BASE_URL https://unsub.example.com is not "
                     "a local address, and secrets are generated only for development (set SIGNING_KEYS and "
                     "API_TOKEN, the same on every instance)")
    assert not (tmp_path / "var").exists()
    local = load_settings({"PUBLIC_BASE_URL": "http://localhost:8000", "VAR_DIR": str(tmp_path / "var")},
                          dotenv_path="/nonexistent")
    assert local["SIGNING_KEYS"].startswith("dev1:")                               # development: generated


def test_a_public_address_refused_for_its_secrets_names_the_generated_key_that_signed_the_links_sent(tmp_path):
    """An install that ran on its public address with generated secrets (before the start refused that) signed
    every link sent so far with the key in VAR_DIR/dev-secrets.json: the refusal says to keep it, since new keys
    alone would make all of those links 404."""
    generated = load_settings({"VAR_DIR": str(tmp_path / "var")}, dotenv_path="/nonexistent")
    with pytest.raises(ConfigError) as caught:
        load_settings({"VAR_DIR": str(tmp_path / "var"), "PUBLIC_BASE_URL": "https://unsub.example.com"},
                      dotenv_path="/nonexistent")
    assert str(caught.value).endswith(f"the same on every instance; the links sent so far were signed with the "
                                      f"SIGNING_KEYS in {tmp_path / 'var' / 'dev-secrets.json'}: keep that key "
                                      "listed)")
    assert generated["SIGNING_KEYS"].split(":")[1] not in str(caught.value)   # the secret itself is not shown


def test_gunicorn_without_a_redis_url_says_so_in_one_line(tmp_path):
    command = [sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "webapp", "gunicorn.conf.py"), "-b",
               "127.0.0.1:0", "webapp:create_app()"]
    result = subprocess.run(command, cwd=tmp_path, env=clean_env(API_TOKEN=TOKEN, SIGNING_KEYS=KEYS),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Configuration error: REDIS_URL is not set" in result.stderr


def test_gunicorn_opens_no_control_socket_shared_with_every_other_gunicorn(tmp_path):
    command = [sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "webapp", "gunicorn.conf.py"), "-b",
               "127.0.0.1:0", "--log-level", "info", "webapp:create_app()"]
    env = clean_env(REDIS_URL=f"unix://{tmp_path}/none.sock", API_TOKEN=TOKEN, SIGNING_KEYS=KEYS)
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:  # up to the first worker booted: the control socket opens just after
        lines.append(line)
        if "Booting worker" in line:
            break
    time.sleep(1.0)
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    log = "".join(lines) + out
    assert "Booting worker" in log and "Control socket" not in log, log


@pytest.mark.parametrize("setting, value", [("PORT", "0"), ("PORT", "70000"), ("WEB_WORKERS", "0"),
                                            ("TRUSTED_PROXIES", "-1"), ("TIME_UNIT_SECONDS", "nan"),
                                            ("SUSPEND_DAY_SECONDS", "inf"), ("REDIS_TIMEOUT_SECONDS", "0"),
                                            ("REDIS_TIMEOUT_SECONDS", "soon"), ("WEBHOOK_TIMEOUT_SECONDS", "5s"),
                                            ("REDIS_URL", "localhost:6379"), ("DEFAULT_LOCALE", "ru-RU")])
def test_numbers_out_of_their_range_are_refused(setting, value):
    with pytest.raises(ConfigError, match=f"^{setting} "):
        load_settings({"API_TOKEN": TOKEN, "SIGNING_KEYS": KEYS, setting: value}, dotenv_path="/nonexistent")
    assert load_settings({"API_TOKEN": TOKEN, "SIGNING_KEYS": KEYS, "TRUSTED_PROXIES": "0",
                          "REDIS_TIMEOUT_SECONDS": "0.5"}, dotenv_path="/nonexistent")["REDIS_TIMEOUT_SECONDS"] == 0.5


@pytest.mark.parametrize("settings, message", [
    ({"SIGNING_KEYS": "k1:s"}, "SIGNING_KEYS secret of kid 'k1' has 1 characters: use at least 12 random ones"),
    ({"SIGNING_KEYS": KEYS + ",k2:short-key"}, "SIGNING_KEYS secret of kid 'k2' has 9 characters"),
    ({"SIGNING_KEYS_VERIFY_ONLY": "k2:next"}, "SIGNING_KEYS_VERIFY_ONLY secret of kid 'k2' has 4 characters"),
    ({"API_TOKEN": "t"}, "API_TOKEN has 1 characters: use at least 12 random ones")])
def test_a_secret_short_enough_to_guess_is_refused(tmp_path, settings, message):
    """One link is enough to try signing keys offline until its MAC matches: a short one would let anyone sign
    links for every subscription. `run`, the worker and gunicorn stop with the message, before anything starts."""
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_settings({"API_TOKEN": TOKEN, "SIGNING_KEYS": KEYS, **settings}, dotenv_path="/nonexistent")
    result = subprocess.run([sys.executable, "-m", "workers"], cwd=tmp_path,
                            env=clean_env(**{"API_TOKEN": TOKEN, "SIGNING_KEYS": KEYS, **settings}),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stderr.startswith(f"Configuration error: {message}"), result.stderr


def test_an_older_short_key_keeps_verifying_the_links_already_sent_with_a_warning(tmp_path):
    """An install from before the 12-character rule rotates to a long key but must keep its old short one listed:
    links never expire, and every link already sent was signed with it. The start refuses only a short key that
    would sign new links (the newest of SIGNING_KEYS, or one on its way in); an older one verifies, said in a
    warning (remove it once its links may go)."""
    from webapp.config import short_key_warnings
    from webapp.tokens import SigningKeys, issue_smid, read_smid
    old_ring = SigningKeys(parse_signing_keys("k0:old-key"))
    sent = issue_smid(old_ring, resource_id=1, db_id=1, profile_id="p-1", hash_id="0a1b2c3d")
    settings = load_settings({"API_TOKEN": TOKEN, "SIGNING_KEYS": "k0:old-key," + KEYS}, dotenv_path="/nonexistent")
    ring = SigningKeys(*signing_key_ring(settings))
    assert read_smid(ring, sent).profile_id == "p-1"                             # the link already sent works
    assert short_key_warnings(settings) == [
        "SIGNING_KEYS secret of kid 'k0' has 7 characters: it only verifies links already sent; remove it once "
        "they may stop working (new links are signed with 'k1')"]
    assert short_key_warnings(load_settings({"API_TOKEN": TOKEN, "SIGNING_KEYS": KEYS},
                                            dotenv_path="/nonexistent")) == []
    result = subprocess.run([sys.executable, "-m", "workers"], cwd=tmp_path, capture_output=True, text=True,
                            env=clean_env(API_TOKEN=TOKEN, SIGNING_KEYS="k0:old-key," + KEYS,
                                          REDIS_URL="redis://127.0.0.1:1/0"), timeout=30)
    assert "warning: SIGNING_KEYS secret of kid 'k0' has 7 characters" in result.stderr, result.stderr
    assert "Configuration error" not in result.stderr and "Redis at redis://127.0.0.1:1/0" in result.stderr


def test_a_name_that_is_not_a_setting_is_warned_about_once(tmp_path):
    """A misspelt setting (TRUSTED_PROXY for TRUSTED_PROXIES: X-Forwarded-For then ignored, every client one
    address to the rate limits) was ignored without a word. Every name .env sets that is not a setting, and an
    environment variable spelt almost like one, is now warned about at start, once for all that `run` starts."""
    (tmp_path / ".env").write_text("DEFAULT_LOCAL=ru\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "webapp", "run"], cwd=tmp_path,
                            env=clean_env(PORT=str(port), TRUSTED_PROXY="1", HOME_DIR="/x"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not _worker_registered(tmp_path):
            time.sleep(0.2)
        assert _worker_registered(tmp_path)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=40)
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: DEFAULT_LOCAL, set in .env, is not a setting of this service and is ignored "
        "(did you mean DEFAULT_LOCALE?)",
        "warning: TRUSTED_PROXY, set in the environment, is not a setting of this service and is ignored "
        "(did you mean TRUSTED_PROXIES?)"], out
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "webapp", "gunicorn.conf.py"),
                             "webapp:create_app()"], cwd=tmp_path, env=clean_env(TRUSTED_PROXY="1"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "did you mean TRUSTED_PROXIES?" in result.stderr   # and REDIS_URL is unset


@pytest.mark.parametrize("name", ["RQ_REDIS_URL", "REDIS_TLS_URL", "RQ_CONFIG", "WEB_CONCURRENCY"])
def test_other_tools_variables_are_not_taken_for_misspelt_settings(name):
    """The environment is shared with the tools the README runs beside the web app: `rq worker` reads
    RQ_REDIS_URL (its -u), Heroku-style hosts set REDIS_TLS_URL next to REDIS_URL. Those are not typos of
    REDIS_URL and RQ_QUEUE: no warning, while a real near-miss still gets one."""
    from webapp.config import name_warnings
    assert name_warnings({name: "redis://127.0.0.1:6379/0"}, dotenv_path="/nonexistent") == []
    assert name_warnings({name: "x", "REDIS_URI": "x"}, dotenv_path="/nonexistent") == [
        "REDIS_URI, set in the environment, is not a setting of this service and is ignored (did you mean REDIS_URL?)"]


@pytest.mark.parametrize("case", ["var is a file", "secrets file broken", "secrets file without keys",
                                  "redis data dir impossible"])
def test_a_var_dir_that_cannot_be_used_is_said_in_one_line(tmp_path, case):
    """VAR_DIR holds the generated secrets and the local Redis's data: a path that cannot be a directory, or a
    secrets file that is not what the service wrote, stops `run` with one line naming VAR_DIR, not a traceback."""
    env = clean_env(PORT=str(free_port()))
    if case == "var is a file":
        (tmp_path / "var").write_text("")
    elif case == "redis data dir impossible":
        (tmp_path / "var").write_text("")
        env.update(SIGNING_KEYS=KEYS, API_TOKEN=TOKEN)
    else:
        (tmp_path / "var").mkdir()
        (tmp_path / "var" / "dev-secrets.json").write_text("{broken" if case == "secrets file broken" else "[]")
    result = subprocess.run([sys.executable, "-m", "webapp", "run"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Configuration error: VAR_DIR 'var'"), result.stderr
    assert "Web app on" not in result.stdout and "Stopped." not in result.stdout


def test_processes_starting_at_once_generate_one_set_of_development_secrets(tmp_path):
    """gunicorn's master and `python -m workers` started together in a new VAR_DIR: each either writes the secrets
    whole or reads the ones another wrote, never a half-written file, and all end with the same ones."""
    probe = ("import json, sys\nfrom webapp.config import load_settings\n"
             "s = load_settings({'VAR_DIR': sys.argv[1]}, dotenv_path='/nonexistent')\n"
             "print(json.dumps([s['API_TOKEN'], s['SIGNING_KEYS']]))\n")
    for attempt in range(5):
        var = tmp_path / f"var{attempt}"
        procs = [subprocess.Popen([sys.executable, "-c", probe, str(var)], cwd=ROOT, env=clean_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
        answers = [proc.communicate(timeout=60) for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), answers
        assert len({out for out, _err in answers}) == 1, answers
        assert sum("Generated development secrets" in err for _out, err in answers) == 1
        assert sorted(p.name for p in var.iterdir()) == ["dev-secrets.json"]


def test_dotenv_is_read_as_shells_read_it(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("\ufeff# settings\n"                                  # a BOM, as some editors write
                        "PUBLIC_BASE_URL=https://unsub.example.com   # production\n"
                        "export API_TOKEN=my-secret#token\n"                            # '#' inside a word
                        'SIGNING_KEYS="k1:abc-of-the-test #1"  # rotated 2026-01\n'
                        "RQ_QUEUE='unsub'\n"
                        "REDIS_URL=redis://:p%23ss@127.0.0.1:6379/0\n"      # a URL's '#' is escaped (redis-py)
                        'VAR_DIR="a \\"quoted\\" dir"\n'
                        "TRUSTED_PROXIES=\n")
    settings = load_settings({}, dotenv_path=str(env_file))
    assert settings["PUBLIC_BASE_URL"] == "https://unsub.example.com"
    assert settings["API_TOKEN"] == "my-secret#token" and settings["SIGNING_KEYS"] == "k1:abc-of-the-test #1"
    assert settings["RQ_QUEUE"] == "unsub" and settings["TRUSTED_PROXIES"] == 0
    assert settings["REDIS_URL"] == "redis://:p%23ss@127.0.0.1:6379/0" and settings["VAR_DIR"] == 'a "quoted" dir'
    overridden = load_settings({"RQ_QUEUE": "other", "API_TOKEN": ""}, dotenv_path=str(env_file))
    assert overridden["RQ_QUEUE"] == "other" and overridden["API_TOKEN"] == "my-secret#token"   # "" is unset
    for bad in ('SIGNING_KEYS=k1:secret"', "SIGNING_KEYS=\"k1:secret", "SIGNING_KEYS='k1' x", "not a setting"):
        env_file.write_text(bad + "\n")
        with pytest.raises(ConfigError, match="line 1 is not KEY=value"):
            load_settings({}, dotenv_path=str(env_file))


def test_gunicorn_workers_move_what_they_built_at_start_out_of_the_collectors_view(tmp_path):
    """webapp/gunicorn.conf.py's post_worker_init (gunicorn calls it in each worker once the app is loaded)
    freezes the startup objects, so that a full garbage collection walks only what came after them."""
    probe = (
        "import gc, json, runpy\n"
        "conf = runpy.run_path('webapp/gunicorn.conf.py')\n"
        "from webapp import create_app\n"
        "app = create_app()\n"
        "before = len(gc.get_objects())\n"
        "conf['post_worker_init'](None)\n"
        "print(json.dumps([before, gc.get_freeze_count(), len(gc.get_objects())]))\n")
    env = clean_env(REDIS_URL="redis://127.0.0.1:1/0", API_TOKEN=TOKEN, SIGNING_KEYS=KEYS,
                    VAR_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    tracked_before, frozen, tracked_after = json.loads(out.stdout.splitlines()[-1])
    assert tracked_before > 20_000 and frozen >= tracked_before * 0.9 and tracked_after < 1_000


# Put first on the `run` subprocess's PYTHONPATH: in gunicorn's processes only, building the app takes
# SLOW_APP_SECONDS and then appends the time it was built to SLOW_APP_BUILT. gunicorn binds its port in the
# master and builds the app in each worker after forking, so the port accepts connections that long before
# anything answers them. Nothing of the app itself is changed.
SLOW_APP_SITECUSTOMIZE = '''
import os
import sys
import time

if "gunicorn" in sys.orig_argv[1:3]:  # python -m gunicorn ...: the master and its workers
    import webapp

    _create_app = webapp.create_app

    def create_app(*args, **kwargs):
        time.sleep(float(os.environ["SLOW_APP_SECONDS"]))
        app = _create_app(*args, **kwargs)
        with open(os.environ["SLOW_APP_BUILT"], "a") as built:
            built.write(f"{time.time()}\\n")
        return app

    webapp.create_app = create_app
'''


def test_the_web_app_is_announced_only_once_it_answers_http(tmp_path):
    """The port is bound (gunicorn's master) seconds before the app answers on it (a worker has built it):
    "Web app on <url>" is printed only after, and the URL answers at once when it is."""
    import queue
    import re
    import threading
    delay = 4.0
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_APP_SITECUSTOMIZE)
    built = tmp_path / "app-built"
    env = clean_env(PORT=str(free_port()), WEB_WORKERS="1", PYTHONPATH=f"{hooks}{os.pathsep}{ROOT}",
                    SLOW_APP_SECONDS=str(delay), SLOW_APP_BUILT=str(built))
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "webapp", "run"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()  # (time read, line); None at the end of the output

    def read():
        for output_line in proc.stdout:
            lines.put((time.time(), output_line))
        lines.put(None)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out, children = [], []
    try:
        deadline = time.time() + 60
        while True:
            item = lines.get(timeout=max(0.1, deadline - time.time()))  # queue.Empty: never announced
            assert item is not None, "".join(out)                       # `run` ended without announcing
            announced_at, line = item
            out.append(line)
            if line.startswith("Web app on "):
                break
        url = re.match(r"Web app on (http://127\.0\.0\.1:\d+)\s", line).group(1)
        # What the announcement promises, checked the moment it is read: the app answers HTTP at once.
        try:
            with urllib.request.urlopen(f"{url}/static/pages.css", timeout=1) as resp:
                assert resp.status == 200
        except OSError as error:
            pytest.fail(f"announced, but {url} does not answer: {error!r}")
        assert time.time() - announced_at < 1.0
        # ... because it had been built by then, and not before the delay.
        assert built.exists(), "announced before a worker had built the app"
        assert announced_at >= float(built.read_text().split()[0]) >= started + delay
        children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                       text=True).stdout.split()]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()  # its children are told by the kernel (PR_SET_PDEATHSIG) and stop by themselves
            proc.wait(timeout=10)
        reader.join(timeout=10)
        proc.stdout.close()
    out += [item[1] for item in iter(lines.get_nowait, None)]
    assert proc.returncode == 0, "".join(out)
    assert len(children) == 3                                                      # redis, gunicorn, worker
    left = subprocess.run(["pgrep", "-g", ",".join(map(str, children))], capture_output=True, text=True).stdout
    assert not [pid for pid in left.split() if _alive(int(pid))]
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "var" / "redis")], capture_output=True).returncode == 1


@pytest.mark.parametrize("args, code", [(["run", "--help"], 0), (["--help"], 0), (["run", "--port", "9000"], 1),
                                        (["run", "web"], 1), ([], 1)], ids=["run --help", "--help", "an option",
                                                                            "an argument", "nothing"])
def test_run_starts_nothing_when_given_arguments_it_does_not_take(tmp_path, args, code):
    result = subprocess.run([sys.executable, "-m", "webapp", *args], cwd=tmp_path, env=clean_env(), text=True,
                            capture_output=True, timeout=30)
    assert result.returncode == code
    assert "usage: python -m webapp run" in (result.stdout if code == 0 else result.stderr)
    assert "Redis" not in result.stdout.replace("a local Redis", "") and not (tmp_path / "var").exists()


def _call(port, path, **body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1.1/{path}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    answer = json.loads(urllib.request.urlopen(req, timeout=10).read())
    assert answer["error"] == 0, answer
    return answer["data"]


def _status(port, method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=body and body.encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _stop(proc, signum=signal.SIGTERM):
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=40)
    assert proc.returncode == 0 and out.rstrip().endswith("Stopped."), out


def test_a_key_rotation_through_the_running_service_keeps_sent_links_working(tmp_path):
    """The README's rotation, through `python -m webapp run` restarted with each key list (SIGTERM between, as a
    service manager stops it): with k2 added last, new links are signed with k2 and every link signed with k1
    before (one sent 40 days ago too) still opens, unsubscribes by one-click, and its manager link works; once
    k1 is dropped, its links answer 404 and k2's keep working. What was acknowledged before each SIGTERM is
    still there after the restart."""
    from webapp.config import parse_signing_keys
    from webapp.tokens import SigningKeys, issue_smid, read_smid
    k1, k2 = "k1:the-first-secret-key", "k2:the-second-secret-key"
    old_ring, new_ring = SigningKeys(parse_signing_keys(k1)), SigningKeys(parse_signing_keys(k2))
    from conftest import email_resource
    proc, port = start_run(tmp_path, SIGNING_KEYS=k1, API_TOKEN=TOKEN)
    try:
        rid = _call(port, "resources/add", **email_resource(unsubscribe={"mode": "confirm"}))["id"]
        idents = [{"db_id": 1, "profile_id": f"p-{i}", "resource_id": rid, "channel": "email",
                   "email": f"user{i}@example.com"} for i in range(4)]
        for ident in idents:
            _call(port, "subscriptions/set", **ident)
        sent = [_call(port, "messages/links", **ident) for ident in idents]
        paths = [link["unsubscribe_url"].split(str(port), 1)[1] for link in sent]
        manage = sent[2]["manage_url"].split(str(port), 1)[1]
        assert _status(port, "POST", paths[0], "List-Unsubscribe=One-Click") == 200    # acknowledged, then SIGTERM
    finally:
        _stop(proc)
    first = read_smid(old_ring, sent[3]["smid"])
    month_old = issue_smid(old_ring, rid, 1, "p-3", first.hash_id, sent_at=time.time() - 40 * 86400)

    proc, port = start_run(tmp_path, SIGNING_KEYS=f"{k1},{k2}", API_TOKEN=TOKEN)
    try:
        assert _call(port, "subscriptions/get", **idents[0])["status"] == "unsubscribed"   # kept over the SIGTERM
        fresh = _call(port, "messages/links", **idents[1])
        assert read_smid(new_ring, fresh["smid"]).profile_id == "p-1"                       # signed with the newest
        fresh_path = fresh["unsubscribe_url"].split(str(port), 1)[1]
        assert _status(port, "GET", paths[1]) == 200 and _status(port, "GET", manage) == 200
        assert _status(port, "POST", paths[2], "List-Unsubscribe=One-Click") == 200
        assert _call(port, "subscriptions/get", **idents[2])["status"] == "unsubscribed"
        assert _status(port, "POST", f"/unsubscribe/{month_old}", "List-Unsubscribe=One-Click") == 200
        assert _call(port, "subscriptions/get", **idents[3])["status"] == "unsubscribed"
    finally:
        _stop(proc, signal.SIGINT)

    proc, port = start_run(tmp_path, SIGNING_KEYS=k2, API_TOKEN=TOKEN)
    try:
        assert _status(port, "GET", paths[1]) == 404 and _status(port, "GET", manage) == 404   # k1 retired
        assert _status(port, "GET", fresh_path) == 200
        assert _call(port, "subscriptions/get", **idents[1])["status"] == "subscribed"       # GETs changed nothing
    finally:
        _stop(proc)
