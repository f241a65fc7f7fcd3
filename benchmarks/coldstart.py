"""Cold start: importing the handler from built artifacts, as Lambda loads them.

Lambda puts the function at /var/task and the layer at /opt/python, both
read-only, so no .pyc can be written there: a layer without bytecode compiles
every module on every cold start. Each figure is the median of 10 fresh
interpreters (`-S`: nothing but the artifacts on the path; PYTHONDONTWRITEBYTECODE
as on a read-only /opt), timing `import app` inside the interpreter.

Compared: the service's layer as `sam build` makes it (precompiled, see
layers/fanout/Makefile); the same layer with its bytecode removed (what
`BuildMethod: python3.13` ships); and a bare FastAPI + Mangum hello-world built
the same way as ours, the floor for this stack.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 10
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


def import_ms(python: str, *paths: Path, env: dict[str, str] | None = None) -> list[float]:
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": os.pathsep.join(map(str, paths)),
        "PYTHONDONTWRITEBYTECODE": "1",
        **(env or {}),
    }
    runs = []
    for _ in range(SAMPLES):
        done = subprocess.run([python, "-S", "-c", TIME_IMPORT], env=environment, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr)
        runs.append(float(done.stdout))
    return runs


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


def cold_start() -> dict[str, Any]:
    python = _runtime_python()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        build = sam_build(scratch)
        layer, function = build / "FanoutLayer", build / "SemaphoreFunction"
        bare = scratch / "no-bytecode"
        shutil.copytree(layer, bare)
        for cache in list(bare.rglob("__pycache__")):
            shutil.rmtree(cache)
        hello = hello_world(python, scratch)
        runs = {
            "fanout, precompiled layer (sam build)": import_ms(python, function, layer / "python"),
            "fanout, layer without bytecode": import_ms(python, function, bare / "python"),
            "FastAPI + Mangum hello-world, precompiled": import_ms(python, hello / "function", hello / "python"),
        }
        return {
            "import_ms": {
                name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in runs.items()
            },
            "layer_mb": _size_mb(layer),
            "layer_zip_mb": _zipped_mb(layer, scratch),
            "samples": SAMPLES,
        }


if __name__ == "__main__":
    import json

    print(json.dumps(cold_start(), indent=2))
