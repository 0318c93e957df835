"""The device's Python runtime for windfleet components: one venv per requirements set.

Every code component's ``Install`` step runs this file with the host's ``python3``::

    python3 -I {artifacts:decompressedPath}/windfleet/windfleet/device_runtime.py \\
        --requirements {artifacts:decompressedPath}/windfleet/windfleet/components/<pkg>/requirements.txt \\
        --root {kernel:rootPath}/work/windfleet-runtime --link {work:path}/venv

and its ``Run`` step starts ``{work:path}/venv/bin/python3``.  By path and isolated
(``-I``), not ``-m``: the nucleus runs each lifecycle step through ``sudo -E``, and sudo's
default ``env_delete`` removes ``PYTHONPATH``, so a recipe's ``Setenv: PYTHONPATH`` does not
reach the step on a real core device.  This file therefore imports nothing but the
standard library, and the Run steps set ``PYTHONPATH`` on their own command line.

What it guarantees:

- **Once per device and requirements set.** The venv is ``<root>/py<XY>-<key>``, ``key``
  being a hash of the requirements file and of the host interpreter (implementation,
  version, machine, path).  Components whose requirements are the same share one venv;
  a new component version with unchanged requirements reuses it; all venvs share one
  pip cache (``<root>/pip-cache``), so a wheel is downloaded once per device.
- **Idempotent.** ``Install`` runs on every nucleus start: a ready venv (``.ready``
  matching the key) whose imports still work is only re-linked, in well under a second.
  A half-built or broken venv is rebuilt.  Concurrent installs of the same set (the
  nucleus installs independent components in parallel) serialize on a lock file.
- **Any distro pip from 20.3 on, any CPython 3.9-3.13.**  The venv is made without pip
  (``venv --without-pip --system-site-packages``, which needs no ``python3-venv`` /
  ensurepip on Debian) and sees the host's packages -- the distro's ``pip`` included --
  so ``<venv>/bin/python3 -m pip install -r REQ`` runs the host's own pip *inside* the
  venv: it installs into the venv and skips what the host already satisfies.  No
  ``pip --python`` (pip >= 22.3) is needed.  Without a host pip, ensurepip is tried; if
  neither exists it says what to install.
- **The host's packages are the host python3's.**  Besides the system site directories
  (``--system-site-packages``) the venv reads every site directory on the host
  interpreter's ``sys.path`` (``host-site.pth``), so a ``python3`` that is itself a
  venv (the local nucleus puts the project's venv first on PATH) lends its packages
  too, and a laptop downloads nothing.

On a real nucleus the step runs with ``RequiresPrivilege: true``: ``{kernel:rootPath}/work``
is root-owned (0755) and each component's work directory is private to its user, so a
device-wide runtime can only be created by root.  Components read and execute it; they
cannot modify it.

Errors end with ONE line that says what failed and what to do (the nucleus keeps a
failed step's last line); the exit status is non-zero.  Standard library only, and
Python 3.9 syntax: this runs on the device's own ``python3``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import site
import subprocess
import sys
import time
import venv
from pathlib import Path

PREFIX = "windfleet runtime"
IMPORTS_DIRECTIVE = re.compile(r"^#\s*imports:\s*(.+)$", re.MULTILINE)
_OLD_VENV = re.compile(r"^venv-[0-9a-f]{16}$")  # the former per-component layout in {work:path}


class RuntimeFailure(Exception):
    """A failed install: its message is the one line the log ends with."""


def say(message: str) -> None:
    print(f"{PREFIX}: {message}", flush=True)


# ----------------------------------------------------------------- identity
def host_identity() -> str:
    """What a venv built by this interpreter is only valid for."""
    impl = sys.implementation.name
    return f"{impl} {sys.version_info[0]}.{sys.version_info[1]} {platform.machine()} {os.path.realpath(sys.executable)}"


def runtime_key(requirements_text: str, identity: str | None = None) -> str:
    digest = hashlib.sha256()
    digest.update(requirements_text.replace("\r\n", "\n").encode())
    digest.update(b"\0")
    digest.update((identity or host_identity()).encode())
    return digest.hexdigest()[:16]


def venv_name(key: str) -> str:
    return f"py{sys.version_info[0]}{sys.version_info[1]}-{key}"


def required_imports(requirements_text: str) -> list[str]:
    """Modules named by ``# imports: a b.c`` lines: imported after installing, and on every start."""
    names: list[str] = []
    for match in IMPORTS_DIRECTIVE.finditer(requirements_text):
        names += [n for n in re.split(r"[\s,]+", match.group(1).strip()) if n]
    return names


def host_site_dirs() -> list[str]:
    """The host interpreter's site directories, in ``sys.path`` order, without the user
    site and without PYTHONPATH entries (those are the component's code, not packages)."""
    pythonpath = {os.path.realpath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    user_site = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    candidates = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    candidates += [p for p in sys.path if os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages")]
    result: list[str] = []
    for path in candidates:
        real = os.path.realpath(path)
        if (os.path.isdir(path) and path not in result and real not in pythonpath
                and (user_site is None or real != os.path.realpath(user_site))):
            result.append(path)
    return result


# ----------------------------------------------------------------- steps
def _python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python3"


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, **kwargs)


def _check_imports(python: Path, modules: list[str]) -> str | None:
    """None when every module imports in the venv, else the last line of the error."""
    if not modules:
        return None
    proc = _run([str(python), "-c", "import " + ", ".join(modules)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _pip_version(python: Path) -> str | None:
    proc = _run([str(python), "-c", "import pip, sys; sys.stdout.write(pip.__version__)"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock (fcntl) held while one venv is (re)built."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _create_venv(venv_dir: Path) -> Path:
    if venv_dir.exists() or venv_dir.is_symlink():
        shutil.rmtree(venv_dir, ignore_errors=True)
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True, clear=True).create(str(venv_dir))
    python = _python(venv_dir)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout.strip()
    Path(purelib).mkdir(parents=True, exist_ok=True)
    (Path(purelib) / "host-site.pth").write_text("".join(d + "\n" for d in host_site_dirs()))
    return python


def _ensure_pip(python: Path) -> str:
    version = _pip_version(python)
    if version:
        return version
    say(f"no pip visible to {os.path.realpath(sys.executable)}; trying ensurepip")
    _run([str(python), "-m", "ensurepip", "--default-pip"], stdout=sys.stdout, stderr=subprocess.STDOUT)
    version = _pip_version(python)
    if not version:
        raise RuntimeFailure(
            f"no pip for {os.path.realpath(sys.executable)}: install the distro's pip "
            "(Debian, Ubuntu, Raspberry Pi OS: apt-get install python3-pip) and redeploy")
    return version


def _install(python: Path, requirements: Path, cache: Path) -> None:
    # Options every pip since 20.3 knows; no --python, no --root-user-action.
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
           "--progress-bar", "off", "--cache-dir", str(cache), "-r", str(requirements)]
    proc = _run(cmd, stdout=sys.stdout, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeFailure(f"pip install -r {requirements} failed (exit {proc.returncode}); "
                             "the lines above say which package; fix the network or index and redeploy")


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (a symlink replaces the old one in one step)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    if link.exists() and not link.is_symlink():
        shutil.rmtree(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(str(target), str(tmp))
    os.replace(str(tmp), str(link))


def _remove_old_layout(work: Path) -> None:
    """Venvs the former recipes made inside the component's own work dir ({work:path}/venv-<hash>)."""
    for path in work.iterdir() if work.is_dir() else []:
        if _OLD_VENV.match(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            say(f"removed {path} (replaced by the shared runtime)")


def ensure_runtime(requirements: Path, root: Path, link: Path | None = None) -> Path:
    """Make (or reuse) the venv for ``requirements`` under ``root``; point ``link`` at it."""
    started = time.monotonic()
    if not requirements.is_file():
        raise RuntimeFailure(f"no requirements file at {requirements}")
    text = requirements.read_text()
    key = runtime_key(text)
    modules = required_imports(text)
    venv_dir = root / venv_name(key)
    ready = venv_dir / ".ready"
    python = _python(venv_dir)

    def is_ready() -> bool:
        try:
            return json.loads(ready.read_text()).get("key") == key and python.exists()
        except (OSError, ValueError):
            return False

    reused = False
    if is_ready():
        problem = _check_imports(python, modules)
        if problem is None:
            reused = True
        else:
            say(f"{venv_dir} no longer imports ({problem}); rebuilding it")
    if not reused:
        root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(root, 0o755)  # components (another user) read and execute it
        with _lock(root / f".{venv_dir.name}.lock"):
            if is_ready() and _check_imports(python, modules) is None:
                reused = True  # another install built it while this one waited
            else:
                say(f"creating {venv_dir} for {requirements.parent.name}/{requirements.name} ({host_identity()})")
                python = _create_venv(venv_dir)
                pip_version = _ensure_pip(python)
                say(f"pip {pip_version}: installing {requirements}")
                cache = root / "pip-cache"
                cache.mkdir(exist_ok=True)
                _install(python, requirements, cache)
                problem = _check_imports(python, modules)
                if problem is not None:
                    raise RuntimeFailure(
                        f"installed {requirements} but `import {', '.join(modules)}` fails: {problem}; "
                        "install the missing system library (e.g. apt-get install libopenblas0) and redeploy")
                ready.write_text(json.dumps({
                    "key": key, "identity": host_identity(), "pip": pip_version,
                    "requirements": text, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }, indent=1) + "\n")
    if link is not None:
        _link(link, venv_dir)
        _remove_old_layout(link.parent)
    say(f"{'reused' if reused else 'built'} {venv_dir}"
        f"{' -> ' + str(link) if link is not None else ''} in {time.monotonic() - started:.1f} s")
    return venv_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -I device_runtime.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--requirements", required=True, type=Path, help="the component's requirements.txt")
    parser.add_argument("--root", required=True, type=Path,
                        help="where the device's runtimes live ({kernel:rootPath}/work/windfleet-runtime)")
    parser.add_argument("--link", type=Path, default=None,
                        help="symlink to point at the runtime ({work:path}/venv)")
    args = parser.parse_args(argv)
    os.umask(0o022)  # root builds it; the components' user reads it
    try:
        ensure_runtime(args.requirements, args.root, args.link)
    except RuntimeFailure as exc:
        say(str(exc))
        return 1
    except (OSError, subprocess.CalledProcessError) as exc:
        say(f"failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
