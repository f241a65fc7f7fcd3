"""Cold start: importing the handler from built artifacts, as Lambda loads them.

Lambda puts the function at /var/task and the layer at /opt/python, both
read-only, so no .pyc can be written there: a layer without bytecode compiles
every module on every cold start. Each figure times `import app` in a fresh
interpreter (`-S`: nothing but the artifacts on the path; PYTHONDONTWRITEBYTECODE
as on a read-only /opt; the variables template.yaml fixes for the function, such
as FANOUT_ROUTES, so it loads what it does on Lambda). Rounds are interleaved, each in a shuffled order,
and each build's time in a round is divided by the hello-world's in the same round:
the median and interquartile range of those ratios are reported, so drift on a
shared machine hits both sides of a ratio alike.

Compared: a seed function (GET /async_sem) and the /batch function from the
service's layer as `sam build` makes it (precompiled, see layers/fanout/Makefile);
the seed function on the same layer with its bytecode removed (what
`BuildMethod: python3.13` ships); and a bare FastAPI + Mangum hello-world built
the same way as ours, the floor for this stack.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from paired import paired_ratio

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 15
HELLO_WORLD = "FastAPI + Mangum hello-world, precompiled"
HELLO = """
import asyncio
from fastapi import FastAPI
from mangum import Mangum

app = FastAPI()

@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}

asyncio.set_event_loop(asyncio.new_event_loop())
handler = Mangum(app, lifespan="off")
"""
TIME_IMPORT = "import time; t = time.perf_counter(); import app; print((time.perf_counter() - t) * 1000)"


def _runtime_python() -> str:
    found = shutil.which("python3.13")
    if not found or subprocess.run([found, "-c", "pass"], capture_output=True).returncode:
        raise RuntimeError("python3.13 is needed on PATH (with pyenv: PYENV_VERSION=3.13.0)")
    return found


def import_ms(python: str, *paths: Path, env: dict[str, str] | None = None) -> float:
    """One cold start: `import app` in a fresh interpreter with only `paths` to import from."""
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": os.pathsep.join(map(str, paths)),
        "PYTHONDONTWRITEBYTECODE": "1",
        **(env or {}),
    }
    done = subprocess.run([python, "-S", "-c", TIME_IMPORT], env=environment, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return float(done.stdout)


def _environment(build: Path, function: str) -> dict[str, str]:
    """The variables the built template sets to a fixed value for the function (Globals, then its own:
    FANOUT_ROUTES, PYDANTIC_DISABLE_PLUGINS, ...); those set from parameters keep their defaults."""
    from fanout_local.template import load_template

    template = load_template(build / "template.yaml")
    variables = {
        **template["Globals"]["Function"]["Environment"]["Variables"],
        **template["Resources"][function]["Properties"]["Environment"]["Variables"],
    }
    return {name: value for name, value in variables.items() if isinstance(value, str)}


def sam_build(scratch: Path) -> Path:
    sam = os.environ.get("FANOUT_SAM_CLI") or shutil.which("sam")
    if not sam:
        raise RuntimeError("the SAM CLI is needed (make bench installs it)")
    env = {
        **os.environ,
        "HOME": str(scratch),
        "SAM_CLI_TELEMETRY": "0",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    build = scratch / "build"
    subprocess.run(
        [sam, "build", "--build-dir", str(build), "--cache-dir", str(scratch / "cache")],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    return build


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _zipped_mb(path: Path, scratch: Path) -> float:
    archive = shutil.make_archive(str(scratch / path.name), "zip", path)
    return Path(archive).stat().st_size / 2**20


def hello_world(python: str, scratch: Path) -> Path:
    """FastAPI + Mangum alone, installed and compiled the way layers/fanout/Makefile does it."""
    pins = [
        line
        for line in (ROOT / "layers/fanout/requirements.txt").read_text().splitlines()
        if line.split("==")[0].lower()
        in {
            "fastapi",
            "mangum",
            "starlette",
            "pydantic",
            "pydantic_core",
            "anyio",
            "idna",
            "typing_extensions",
            "annotated-types",
            "typing-inspection",
            "annotated-doc",
            "opentelemetry-api",
        }
    ]
    target = scratch / "hello" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(target), *pins],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash", str(target)],
        check=True,
        capture_output=True,
    )
    function = scratch / "hello" / "function"
    function.mkdir()
    (function / "app.py").write_text(HELLO)
    return scratch / "hello"


def cold_start(rounds: int = ROUNDS) -> dict[str, Any]:
    python = _runtime_python()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        build = sam_build(scratch)
        layer = build / "FanoutLayer"
        bare = scratch / "no-bytecode"
        shutil.copytree(layer, bare)
        for cache in list(bare.rglob("__pycache__")):
            shutil.rmtree(cache)
        hello = hello_world(python, scratch)
        seed, seed_env = build / "SemaphoreFunction", _environment(build, "SemaphoreFunction")
        batch, batch_env = build / "BatchFunction", _environment(build, "BatchFunction")
        builds = {
            "fanout GET /async_sem, precompiled layer (sam build)": ((seed, layer / "python"), seed_env),
            "fanout POST /batch, precompiled layer (sam build)": ((batch, layer / "python"), batch_env),
            "fanout GET /async_sem, layer without bytecode": ((seed, bare / "python"), seed_env),
            HELLO_WORLD: ((hello / "function", hello / "python"), {}),
        }
        runs: dict[str, list[float]] = {name: [] for name in builds}
        for _ in range(rounds):
            for name in random.sample(list(builds), len(builds)):
                paths, env = builds[name]
                runs[name].append(import_ms(python, *paths, env=env))
        out: dict[str, Any] = {}
        for name, times in runs.items():
            ratio, first, third = paired_ratio(times, runs[HELLO_WORLD])
            out[name] = {
                "median": statistics.median(times),
                "min": min(times),
                "max": max(times),
                "ratio_median": ratio,
                "ratio_iqr": [first, third],
            }
        return {
            "import_ms": out,
            "layer_mb": _size_mb(layer),
            "layer_zip_mb": _zipped_mb(layer, scratch),
            "rounds": rounds,
        }


if __name__ == "__main__":
    import json

    print(json.dumps(cold_start(), indent=2))
