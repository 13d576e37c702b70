#!/usr/bin/env python3
"""Set up the environment (first run only) and start the app, or run the tests.

    python3 launch.py               # create ./venv if needed, install, start the browser app
    python3 launch.py --run-tests   # same set-up plus test dependencies, then run pytest

Environment overrides: TORCH_COMMAND (default "pip install torch==2.13.0", a CPU build; use a
CUDA build command on a GPU machine), VENV_DIR (default ./venv; "-" uses the current Python).
This is the only module that parses the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_TORCH_COMMAND = "pip install torch==2.13.0"
MARKER = ".ldm-webui-installed"
_T0 = time.perf_counter()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Local latent-diffusion image generator")
    ap.add_argument(
        "--listen", action="store_true", help="bind 0.0.0.0 so other machines can connect"
    )
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="create a public Gradio link")
    ap.add_argument(
        "--auth", action="append", default=[], metavar="USER:PASS", help="login (repeatable)"
    )
    ap.add_argument("--auth-file", type=Path, help="file with one user:pass per line")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "models")
    ap.add_argument("--outputs-dir", type=Path, default=ROOT / "outputs")
    ap.add_argument("--ckpt", type=Path, help="checkpoint to load at start")
    ap.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: best available)")
    ap.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    ap.add_argument(
        "--enable-insecure-extension-access",
        action="store_true",
        help="allow installing extensions and downloads even with --share/--listen",
    )
    ap.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    ap.add_argument("--reinstall", action="store_true", help="re-run the dependency installation")
    ap.add_argument("--skip-install", action="store_true", help="never run pip")
    ap.add_argument(
        "--run-tests", action="store_true", help="install test dependencies and run pytest"
    )
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (with --run-tests)")
    args = ap.parse_args(argv)
    if args.pytest_args and not args.run_tests:
        ap.error(f"unrecognised arguments: {' '.join(args.pytest_args)}")
    return args


# -- environment ---------------------------------------------------------------------------------


def in_virtualenv() -> bool:
    return sys.prefix != sys.base_prefix or bool(os.environ.get("VIRTUAL_ENV"))


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> None:
    """Re-run this script inside ./venv (created on first use) unless a venv is active."""
    venv_dir = os.environ.get("VENV_DIR", str(ROOT / "venv"))
    if venv_dir == "-" or in_virtualenv():
        return
    venv = Path(venv_dir)
    py = venv_python(venv)
    if not py.exists():
        print(f"Creating virtual environment in {venv} ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
    env = dict(os.environ, VIRTUAL_ENV=str(venv))
    env["PATH"] = f"{py.parent}{os.pathsep}{env.get('PATH', '')}"
    os.execve(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]], env)


def install_fingerprint(requirement_files: list[Path], torch_command: str) -> str:
    h = hashlib.sha256(torch_command.encode())
    for f in requirement_files:
        h.update(f.read_bytes())
    h.update(sys.version.encode())
    return h.hexdigest()


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])


def prepare_environment(*, tests: bool, reinstall: bool) -> None:
    """Install torch (TORCH_COMMAND) and the requirements, once per change of those files."""
    torch_command = os.environ.get("TORCH_COMMAND", DEFAULT_TORCH_COMMAND)
    files = [ROOT / "requirements.txt"]
    if tests:
        files += [ROOT / "requirements-test.txt", ROOT / "requirements-test-nodeps.txt"]
    fingerprint = install_fingerprint(files, torch_command)
    marker = Path(sys.prefix) / (MARKER + ("-test" if tests else ""))
    if not reinstall and marker.is_file() and marker.read_text().strip() == fingerprint:
        return
    print("Installing dependencies (first run; later starts skip this) ...", flush=True)
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    if not have_torch or reinstall:
        cmd = shlex.split(torch_command)
        if cmd and cmd[0] == "pip":
            cmd = [sys.executable, "-m", "pip", *cmd[1:]]
        subprocess.check_call(cmd)
    # Pin the torch just installed so no requirement can swap it for another build.
    version = subprocess.check_output(
        [sys.executable, "-c", "import torch; print(torch.__version__.split('+')[0])"], text=True
    ).strip()
    constraints = Path(sys.prefix) / "torch-constraint.txt"
    constraints.write_text(f"torch=={version}\n")
    pip("install", "-c", str(constraints), "-r", str(files[1] if tests else files[0]))
    if tests:
        pip("install", "--no-deps", "-r", str(files[2]))
    marker.write_text(fingerprint + "\n")


# -- entry points --------------------------------------------------------------------------------


def run_tests(extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", *extra]
    print("+", " ".join(cmd), flush=True)
    code = subprocess.call(cmd, cwd=ROOT)
    return 0 if code == 5 and extra else code  # 5 = no tests collected for a filtered selection


def start_app(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from webui.settings import AppSettings, read_auth

    try:
        auth = read_auth(args.auth, args.auth_file)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    settings = AppSettings(
        host="0.0.0.0" if args.listen else "127.0.0.1",
        port=args.port,
        share=args.share,
        auth=auth,
        models_dir=args.models_dir.resolve(),
        outputs_dir=args.outputs_dir.resolve(),
        checkpoint=args.ckpt,
        device=args.device,
        precision=None if args.precision == "auto" else args.precision,
        allow_insecure=args.enable_insecure_extension_access,
        open_browser=not args.no_browser,
        started_at=_T0,
    )
    from webui.app import serve

    serve(settings)


def main() -> int:
    args = parse_args()
    ensure_venv()
    if not args.skip_install:
        prepare_environment(tests=args.run_tests, reinstall=args.reinstall)
    if args.run_tests:
        return run_tests(args.pytest_args)
    start_app(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
