"""`python -m webapp run`: everything on one machine.

Starts, when REDIS_URL is unset, a local redis-server (AOF on, appendfsync everysec, data in ./var/redis,
reached over a unix socket); then the web app under gunicorn on 127.0.0.1:$PORT and one worker
(`python -m workers`: RQ worker with scheduler and timer sweeper). Ctrl-C (or any part dying) stops all; a
second Ctrl-C while stopping kills the web app and the worker at once.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .config import WARNED_MARK, https_warning, settings_or_exit

USAGE = """usage: python -m webapp run

Starts a local Redis (unless REDIS_URL is set), the web app on 127.0.0.1:$PORT (8000) and a worker;
Ctrl-C stops them. Settings come from the environment or ./.env (README, "Configuration")."""
HELP_ARGS = (["--help"], ["-h"], ["help"], ["run", "--help"], ["run", "-h"])
# Memory settings of the local redis-server. A profile's subscriptions hash holds one JSON record of ~280 bytes
# per subscription, over Redis's default 64-byte limit for the compact listpack encoding, so every profile's
# hash was a full hashtable: 609 bytes per subscription at 1M profiles, 465 with this (bench/memory.py). A hash
# whose values all fit in 512 bytes (within the entries limit) stays a listpack, where HGET/HSET on a few
# entries are as fast; a larger one converts to a hashtable by itself. Use the same on a production Redis.
REDIS_MEMORY_SETTINGS = ("--hash-max-listpack-value", "512")


def lock_data_dir(data):
    """Hold an exclusive lock on the local Redis's data directory for the life of this process (the kernel lets
    go when it ends, however it ends). A second `run` there would start a second redis-server on the same files
    and take over the first one's socket."""
    import fcntl
    lock = os.fdopen(os.open(data / "run.lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"Another `python -m webapp run` is using {data}: stop it first, or give this one its own VAR_DIR")
    return lock


def local_redis_dir(var_dir):
    """The local Redis's data directory under var_dir, made if need be (this user's alone); one line and exit
    when it cannot be."""
    data = Path(var_dir, "redis").resolve()
    try:
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)  # the AOF and RDB hold every rtoken, webhook secret and SMID: this user's alone
    except OSError as exc:
        sys.exit(f"Configuration error: VAR_DIR {str(var_dir)!r} cannot hold the local Redis's data in {data} "
                 f"({exc.strerror or exc}): set VAR_DIR to a directory this user can write")
    return data


def start_local_redis(var_dir, children):
    """Start redis-server with persistence under var_dir, added to `children` at once (so that it is stopped
    whatever happens next); return its URL once it answers, and the lock held on its data directory."""
    data = local_redis_dir(var_dir)
    lock = lock_data_dir(data)
    sock = data / "redis.sock"
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--dir", str(data), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "3600 1 300 100",
         "--daemonize", "no", "--loglevel", "warning", *REDIS_MEMORY_SETTINGS],
        start_new_session=True, preexec_fn=stopped_with_us(), umask=0o077)
    children.append(("redis", proc))
    import redis
    url = f"unix://{sock}"
    for _ in range(200):
        try:
            if redis.Redis.from_url(url).ping():
                return url, lock
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):  # not listening, or loading
            time.sleep(0.05)
        if proc.poll() is not None:
            break
    sys.exit(f"redis-server did not start (see {data})")


def run():
    settings = settings_or_exit()

    def stop(*_):
        raise KeyboardInterrupt

    # Before anything starts, so that no signal can leave a child behind. SIGHUP: the terminal was closed.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    children = []  # (name, process) in the order started
    exit_code = 0
    # What would stop the start, said before anything starts.
    if not settings["REDIS_URL"] and shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed: sudo apt-get install -y redis-server (or set REDIS_URL)")
    if not port_free(settings["PORT"]):
        sys.exit(f"Port {settings['PORT']} of 127.0.0.1 is in use (another server?): set PORT to a free one")
    if not settings["REDIS_URL"]:
        local_redis_dir(settings["VAR_DIR"])
    if settings["REDIS_URL"]:
        from .store import unreachable
        problem = unreachable(settings["REDIS_URL"], settings["REDIS_TIMEOUT_SECONDS"])
        if problem:
            sys.exit(problem)
    try:
        env = {**os.environ, WARNED_MARK: "1"}  # the web app and the worker need not repeat the warnings
        if not settings["REDIS_URL"]:
            env["REDIS_URL"], _data_lock = start_local_redis(settings["VAR_DIR"], children)
            print(f"Started redis-server (AOF everysec) with data in {Path(settings['VAR_DIR'], 'redis')}")
        env.setdefault("PUBLIC_BASE_URL", settings["PUBLIC_BASE_URL"])
        warning = https_warning(settings["PUBLIC_BASE_URL"])
        if warning:
            print(f"warning: {warning}")
        port = settings["PORT"]
        conf = str(Path(__file__).with_name("gunicorn.conf.py"))
        children.append(("web", subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", conf, "--bind", f"127.0.0.1:{port}", "--workers",
             str(settings["WEB_WORKERS"]), "--log-level", "warning", "webapp:create_app()"],
            env=env, start_new_session=True, preexec_fn=stopped_with_us())))
        children.append(("worker", subprocess.Popen([sys.executable, "-m", "workers"], env=env,
                                                    start_new_session=True, preexec_fn=stopped_with_us())))
        secrets_file = Path(settings["VAR_DIR"], "dev-secrets.json")
        announced = False
        while True:
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; stopping")
                    exit_code = 1
                    raise KeyboardInterrupt
            if not announced and listening(port):  # said once it is true (the port may be taken)
                print(f"Web app on http://127.0.0.1:{port}  (API: {settings['PUBLIC_BASE_URL']}/api/v1.1/, "
                      f"token in API_TOKEN or {secrets_file}). Ctrl-C stops everything.", flush=True)
                announced = True
            time.sleep(0.5 if announced else 0.1)
    except KeyboardInterrupt:
        pass
    finally:
        def hurry(*_):
            # Another Ctrl-C while stopping: kill the web app and the worker now. Raising here instead would
            # leave them running. Redis still gets SIGTERM below and writes its AOF.
            for name, proc in children:
                if name != "redis":
                    kill_group(proc)

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, hurry)
        # Web and worker first (the worker finishes its job), Redis last, so nobody loses its store.
        for _name, proc in reversed(children):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    kill_group(proc)
        print("Stopped.", flush=True)
    return exit_code


def port_free(port):
    """Whether gunicorn could bind 127.0.0.1:`port` (it sets SO_REUSEADDR too)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def listening(port):
    """Whether the web app answers on 127.0.0.1:`port`: a worker has loaded it (gunicorn accepts connections
    as soon as it has bound the port, before any worker has booted)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/pages.css", timeout=1) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def stopped_with_us():
    """A preexec_fn: the child gets SIGTERM when this process ends in any way, SIGKILL included, which leaves
    no chance to stop it (Linux's PR_SET_PDEATHSIG); a child whose parent died before that is set exits."""
    import ctypes
    parent = os.getpid()

    def preexec():
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    return preexec


def kill_group(proc):
    """SIGKILL a child and every process it started (gunicorn's workers, RQ's scheduler): each child leads
    its own process group (start_new_session), so killing the leader alone would leave those running."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has already exited
        pass


def main(argv):
    # Settings are environment variables, so `run` takes no arguments: one it does not know (`--port 9000`)
    # stops it rather than start a service other than the one asked for.
    if argv[1:] in HELP_ARGS:
        print(USAGE)
        sys.exit(0)
    if argv[1:] != ["run"]:
        sys.exit(USAGE)
    sys.exit(run())


if __name__ == "__main__":
    main(sys.argv)
