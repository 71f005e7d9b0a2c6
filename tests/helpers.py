"""Helpers several test modules use: a real server process, the reference logits of tiny
models, the native kernel paths this CPU has, greedy sampling, clients of the scheduler."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx
import torch

from galatea.engine.sampling import SamplingParams
from galatea.engine.scheduler import Scheduler
from galatea.kernels import native
from galatea.model.checkpoint import load
from tests.checkpoints import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "galatea", "serve", "--port", str(self.port),
                                      "--data-dir", str(tmp), *extra], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
            if self.proc.poll() is not None:
                raise AssertionError(f"server died:\n{self.proc.stdout.read()}")
        raise AssertionError("server did not start")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


def running_server(tmp_path_factory, *extra: str):
    """A module's server: started once, and at the end its log must hold no traceback."""
    s = Server(tmp_path_factory.mktemp("data"), *extra)
    yield s
    log = s.stop()
    assert "Traceback" not in log, log


def post(server, path, body, **kw):
    return httpx.post(f"{server.url}{path}", json=body, timeout=120, **kw)


TOKENS = [1, 15043, 3186, 29892, 920, 526, 366, 29973, 13, 3492, 29901, 10994, 29991, 2266, 338, 263, 1243, 29889]


def hf_logits(model, ids=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # [T, V]


def our_logits(path, ids=TOKENS, chunk: int | None = None, dtype: torch.dtype = torch.float32,
               quant: str = "none") -> torch.Tensor:
    """All positions' logits, read through the KV cache: in chunks of `chunk` tokens
    (prefill path), or one token per step (decode path) when chunk == 1."""
    lm = load(path, dtype=dtype, quant=quant)
    cache = lm.model.make_cache(1, 64)
    chunk = chunk or len(ids)
    out = []
    for i in range(0, len(ids), chunk):
        out.append(lm.model(torch.tensor([ids[i : i + chunk]]), i, cache, all_logits=True)[0])
    return torch.cat(out)


def cpu_paths() -> list[str]:
    """Every native path this CPU can run (AVX-512 VNNI implies AVX2)."""
    best = native.cpu_isa()
    return {"avx512": ["avx512", "avx2"], "avx2": ["avx2"]}.get(best or "", [])


PATHS = cpu_paths()


def greedy(n: int, ban_eos: bool = True) -> SamplingParams:
    """Greedy decoding of exactly `n` tokens (EOS banned unless asked), no penalties."""
    return SamplingParams(max_new_tokens=n, temperature=0, repetition_penalty=1.0, ban_eos=ban_eos)


def run_clients(engine: Scheduler, prompts: list[list[int]], params: SamplingParams, cancel_at: dict[int, int]):
    results: list[list[int]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * len(prompts)
    first_token_at: list[float] = [0.0] * len(prompts)
    done_at: list[float] = [0.0] * len(prompts)

    def client(i: int) -> None:
        cancel = threading.Event()
        for chunk in engine.generate_sync(prompts[i], params, cancel):
            if chunk.token is not None:
                results[i].append(chunk.token)
                first_token_at[i] = first_token_at[i] or time.perf_counter()
                if len(results[i]) == cancel_at.get(i):
                    cancel.set()
            if chunk.finish_reason:
                finish[i] = chunk.finish_reason
        done_at[i] = time.perf_counter()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not stuck, f"timed out: clients {stuck} had no complete answer within 600 s"
    return results, finish, first_token_at, done_at


class Postgres:
    """A throwaway PostgreSQL cluster from Debian's packages: initdb and pg_ctl on a temporary
    folder, listening on a loopback port. PostgreSQL refuses to run as root: as root, the
    cluster runs as the `postgres` user the package creates. Each `database()` is a new, empty
    database on it."""

    def __init__(self) -> None:
        import glob
        import os
        import shutil
        import tempfile

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        bindir = os.path.dirname(found[-1]) if found else os.path.dirname(shutil.which("pg_ctl") or "")
        if not bindir or not os.path.exists(os.path.join(bindir, "initdb")):
            raise AssertionError("PostgreSQL is needed: apt-get install postgresql (`make test` installs it)")
        self.root = tempfile.mkdtemp(prefix="galatea-pg-")
        self.port = free_port()
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            import pwd

            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self.data = os.path.join(self.root, "data")
        self.pg_ctl = os.path.join(bindir, "pg_ctl")
        subprocess.run([*self.as_owner, os.path.join(bindir, "initdb"), "-D", self.data, "-U", "galatea",
                        "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        self.options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off " \
            "-c max_connections=200"
        self.start()
        self.url = f"postgresql://galatea@127.0.0.1:{self.port}"
        self._count = 0

    def start(self) -> None:
        import os

        subprocess.run([*self.as_owner, self.pg_ctl, "-D", self.data, "-o", self.options, "-l",
                        os.path.join(self.root, "log"), "-w", "start"], check=True, capture_output=True)

    def crash(self) -> None:
        """Stop at once, as an outage would (`pg_ctl -m immediate`: no goodbye to clients)."""
        subprocess.run([*self.as_owner, self.pg_ctl, "-D", self.data, "-m", "immediate", "stop"], check=True,
                       capture_output=True)

    def connections(self, database: str) -> int:
        """Client connections open to `database` (pg_stat_activity), this query's own excluded."""
        import psycopg

        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                                "pg_backend_pid()", (database,)).fetchone()[0]

    def database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        self._count += 1
        name = f"t{self._count}"
        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{self.url}/{name}"

    def stop(self) -> None:
        import shutil

        subprocess.run([*self.as_owner, self.pg_ctl, "-D", self.data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
