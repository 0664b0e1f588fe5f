"""`avssl cluster check FILE`: a cluster-launcher YAML checked before `ray up` spends any time.

Two layers: Ray's own validator (schema, provider fields, typos), then what avssl needs of a
cluster and the mistakes that break `ray up` / `ray submit` on first contact:

- avssl installed on every node, an MLflow server on the head that stops with Ray, the tracking
  URI and shared storage exported;
- commands that kill by a pattern their own shell matches (the launcher runs every command as
  `bash --login -c -i '<command>'`, whose command line contains the pattern);
- sync exclusions that drop a package folder of avssl from the nodes, and file mounts that shadow
  the installed package for scripts `ray submit` runs from the home folder;
- torch: CPU nodes must get the CPU build, GPU nodes a CUDA build, both of the version avssl pins;
- the Ray auth token readable by its owner only (mode 600) on every node;
- the head address pinned (provider.head_ip / RAY_HEAD_IP / a literal address / the cloud's
  instance metadata), never guessed from the node's interfaces;
- security defaults: no service bound to every interface, token auth on, no credentials in the file.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from avssl.config.loader import read_yaml_mapping
from avssl.errors import ConfigError

# Keys and values that look like secrets; a cluster file must read them from the environment.
_SECRET_KEYS = re.compile(r"(secret|password|passwd|token|api[_-]?key|access[_-]?key|private[_-]?key)$", re.I)
_SECRET_VALUES = re.compile(r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|(?:aws_secret_access_key|MLFLOW_TRACKING_PASSWORD|RAY_AUTH_TOKEN)\s*=\s*\S+)")
_PUBLIC_BIND = re.compile(r"--(?:dashboard-host|host)[= ](0\.0\.0\.0|::)(?![\w:.])")
# Paths to keys are fine (auth.ssh_private_key: ~/.ssh/id_ed25519); inline material is not.
_PATH_OK_KEYS = {"ssh_private_key", "ssh_public_key"}

# How Ray's SSH command runner wraps every command (ray/autoscaler/_private/command_runner.py).
_RAY_SHELL = "bash --login -c -i 'source ~/.bashrc; export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && ({})'"
# Guesses of "my address" from the node's interfaces or from the outside.
_ADDRESS_GUESS = re.compile(
    r"hostname\s+(?:-I|-i|--all-ip-addresses|--ip-address|--all-fqdns)\b"
    r"|\bip\s+(?:-\S+\s+)*(?:a|addr|address|r|route)\b"
    r"|\bifconfig\b"
    r"|ifconfig\.me|icanhazip|ipinfo\.io|api\.ipify|checkip\.amazonaws"
)
# Where a pinned head address may come from.
_PINNED_SOURCES = (
    ("RAY_HEAD_IP", "the launcher's RAY_HEAD_IP (workers)"),
    ("ray_bootstrap_config.yaml", "provider.head_ip in the launcher's ~/ray_bootstrap_config.yaml (head)"),
    ("169.254.169.254", "the instance metadata's private address (cloud head)"),
)
_CHMOD_600 = re.compile(r"\bchmod\s+(?:-\w+\s+)*(?:0?600|u=rw,go=|go-rwx|og-rwx|g-rwx,o-rwx|go=)\s+(?:\S+\s+)*\S*auth_token\b")
_PKILL_OPTS_WITH_ARG = {"-d", "-g", "-G", "-P", "-s", "-t", "-u", "-U", "-F", "--delimiter", "--pgroup", "--group",
                        "--parent", "--session", "--terminal", "--euid", "--uid", "--pidfile", "--ns", "--nslist", "--signal"}
_GPU_INSTANCE = re.compile(r"^(?:p\d|g\d|gr\d|dl\d|trn\d|inf\d)", re.I)


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
            yield path, k, v
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


_COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


def _located_commands(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """Every command of the file with where it is, e.g. ('head_start_ray_commands[1]', 'pkill ...')."""
    out: list[tuple[str, str]] = []
    for k in _COMMAND_KEYS:
        out += [(f"{k}[{i}]", str(c)) for i, c in enumerate(cfg.get(k) or [])]
    for name, node_type in (cfg.get("available_node_types") or {}).items():
        for k in ("initialization_commands", "worker_setup_commands", "setup_commands"):
            out += [(f"available_node_types.{name}.{k}[{i}]", str(c)) for i, c in enumerate(node_type.get(k) or [])]
    return out


def _commands(cfg: dict[str, Any]) -> list[str]:
    return [c for _, c in _located_commands(cfg)]


@dataclass
class Node:
    """One kind of node and the commands the launcher runs on it, in order."""

    name: str
    gpu: bool
    commands: list[tuple[str, str]] = field(default_factory=list)


def _nodes(cfg: dict[str, Any]) -> list[Node]:
    """The head and each worker type, with Ray's merge rules: setup_commands + head_setup_commands
    on the head, setup_commands + worker_setup_commands on workers, and a node type's own
    worker_setup_commands / initialization_commands replacing the global lists."""

    def listed(key: str, src: Optional[dict] = None, prefix: str = "") -> list[tuple[str, str]]:
        src = cfg if src is None else src
        return [(f"{prefix}{key}[{i}]", str(c)) for i, c in enumerate(src.get(key) or [])]

    types = cfg.get("available_node_types") or {}
    head_type = cfg.get("head_node_type")
    local = (cfg.get("provider") or {}).get("type") == "local"

    def is_gpu(node_type: dict) -> bool:
        resources = node_type.get("resources") or {}
        node_config = node_type.get("node_config") or {}
        if resources.get("GPU", 0) > 0 or node_config.get("guestAccelerators") or node_config.get("accelerators"):
            return True
        return bool(_GPU_INSTANCE.match(str(node_config.get("InstanceType", ""))))

    nodes = []
    head_t = types.get(head_type, {}) if head_type else {}
    head_init = listed("initialization_commands", head_t, f"available_node_types.{head_type}.") if "initialization_commands" in head_t \
        else listed("initialization_commands")
    nodes.append(Node("head", is_gpu(head_t), head_init + listed("setup_commands") + listed("head_setup_commands")
                      + listed("head_start_ray_commands")))
    workers = {n: t for n, t in types.items() if n != head_type} or ({"worker": {}} if local or not types else {})
    for name, t in workers.items():
        prefix = f"available_node_types.{name}."
        init = listed("initialization_commands", t, prefix) if "initialization_commands" in t else listed("initialization_commands")
        setup = listed("worker_setup_commands", t, prefix) if "worker_setup_commands" in t \
            else listed("setup_commands") + listed("worker_setup_commands")
        nodes.append(Node(f"worker type '{name}'" if types else "workers", is_gpu(t), init + setup + listed("worker_start_ray_commands")))
    for node in nodes:  # an on-prem node whose setup insists on a CUDA build is a GPU node
        if local and any(re.search(r"torch\.version\.cuda\s*(?:,|\)|and|$)", c) and "is None" not in c for _, c in node.commands):
            node.gpu = True
    return nodes


def _segments(command: str) -> list[list[str]]:
    """Simple commands of a shell line, split at ; && || | & and at command substitutions $(...)
    and `...` (quotes respected)."""
    command = command.replace("$(", " ; ").replace("`", " ; ")
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:
        tokens = command.split()
    out, cur = [], []
    for tok in tokens:
        while tok.endswith(")") and tok.count("(") < tok.count(")"):  # the end of a $( ... )
            tok = tok[:-1]
        if tok and set(tok) <= set(";&|"):
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(tok)
    if cur:
        out.append(cur)
    return out


# -- kill patterns ----------------------------------------------------------------------------------


def _kill_pattern_problems(cfg: dict[str, Any]) -> list[str]:
    problems = []
    for where, command in _located_commands(cfg):
        shell = _RAY_SHELL.format(command)
        for seg in _segments(command):
            tool = Path(seg[0]).name if seg else ""
            if tool == "sudo" and len(seg) > 1:
                seg, tool = seg[1:], Path(seg[1]).name
            if tool not in ("pkill", "pgrep", "killall"):
                continue
            full, pattern, args = False, None, iter(seg[1:])
            for tok in args:
                if tok in _PKILL_OPTS_WITH_ARG:
                    next(args, None)
                elif tok in ("-f", "--full") or (tok.startswith("-") and not tok.startswith("--") and "f" in tok[1:] and tool != "killall"):
                    full = True
                elif tok in ("-r", "--regexp") and tool == "killall":
                    continue
                elif tok.startswith("-"):
                    continue
                else:
                    pattern = tok
                    break
            if pattern is None:
                continue
            # pkill -f matches the whole command line; without -f (and killall) the process name.
            target = shell if full else "bash"
            try:
                hit = re.search(pattern, target) is not None
            except re.error:
                hit = pattern in target
            if hit:
                problems.append(
                    f"{where}: `{' '.join(shlex.quote(t) for t in seg)}` matches the shell that runs it (Ray runs each "
                    f"command as `bash --login -c -i '...'`, whose command line contains the pattern): it kills that shell "
                    f"and the command fails before `|| true`; stop a process by the id recorded when it started "
                    f"(scripts/head_services.py stop)")
    return problems


# -- sync exclusions ------------------------------------------------------------------------------


def _rsync_pattern_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(ch))
            else:
                out.append(pattern[i:end + 1])
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def rsync_excludes(pattern: str, relpath: str, is_dir: bool) -> bool:
    """Whether rsync's `--exclude PATTERN` matches relpath (relative to the synced folder):
    a leading / anchors it at the top, a trailing / matches folders only, a pattern with a /
    (or **) matches the end of the path, one without matches the last component."""
    pattern = pattern.strip()
    if not pattern:
        return False
    if pattern.endswith("/"):
        if not is_dir:
            return False
        pattern = pattern.rstrip("/")
    anchored = pattern.startswith("/")
    pattern = pattern.lstrip("/")
    regex = _rsync_pattern_regex(pattern)
    if anchored:
        return re.fullmatch(regex, relpath) is not None
    if "/" in pattern or "**" in pattern:
        return re.search(f"(?:^|/){regex}$", relpath) is not None
    return re.fullmatch(regex, relpath.rsplit("/", 1)[-1]) is not None


def _package_paths(root: Path) -> list[str]:
    """What a node needs of the synced repository: every package folder of avssl (and its
    __init__.py), the package data folders, pyproject.toml and the scripts the cluster runs."""
    need = []
    pkg = root / "avssl"
    for init in sorted(pkg.rglob("__init__.py")):
        need.append(init.relative_to(root).as_posix())
    for data in sorted(pkg.rglob("*.yaml")):
        need.append(data.relative_to(root).as_posix())
    for extra in ("pyproject.toml", "scripts/cluster_job.py", "scripts/head_services.py"):
        if (root / extra).exists():
            need.append(extra)
    return need


def _repo_root(cfg_path: Optional[Path], local: str) -> Optional[Path]:
    """The folder a file mount's local path names: relative to the cluster file's folder (where
    the README runs `ray up`), else the current folder; only if it holds the avssl sources."""
    candidates = []
    expanded = Path(local).expanduser()
    if expanded.is_absolute():
        candidates.append(expanded)
    else:
        if cfg_path is not None:
            candidates.append(cfg_path.resolve().parent / expanded)
        candidates.append(Path.cwd() / expanded)
    if local.strip() in (".", "./"):  # the checkout avssl runs from (an editable install's source folder)
        import avssl

        candidates.append(Path(avssl.__file__).resolve().parents[1])
    for c in candidates:
        if (c / "avssl" / "__init__.py").is_file():
            return c.resolve()
    return None


def _sync_problems(cfg: dict[str, Any], cfg_path: Optional[Path]) -> list[str]:
    problems = []
    excludes = [str(p) for p in cfg.get("rsync_exclude") or []]
    mounts = {str(k): str(v) for k, v in (cfg.get("file_mounts") or {}).items()}
    for remote, local in mounts.items():
        root = _repo_root(cfg_path, local)
        if root is None:
            continue
        name = remote.rstrip("/").rsplit("/", 1)[-1]
        parent = remote.rstrip("/")[: -len(name)].rstrip("/")
        if name == "avssl" and parent in ("~", "", ".", "$HOME") or (name == "avssl" and parent.startswith("/home/") and parent.count("/") == 2):
            problems.append(
                f"file_mounts syncs the repository to {remote}: `ray submit` runs scripts from the home folder, where a "
                f"folder named avssl (no __init__.py at its top) shadows the installed package (ImportError on "
                f"`from avssl import ...`); sync it to another name, e.g. ~/avssl-src")
        filters = []
        for merge in cfg.get("rsync_filter") or []:
            try:
                filters += [ln.strip() for ln in (root / str(merge)).read_text().splitlines()
                            if ln.strip() and not ln.lstrip().startswith(("#", "!"))]
            except OSError:
                pass
        reported: set[tuple[str, str]] = set()
        for path in _package_paths(root):
            parts = path.split("/")
            for depth in range(1, len(parts) + 1):
                sub = "/".join(parts[:depth])
                is_dir = depth < len(parts)
                for pattern in excludes + filters:
                    if rsync_excludes(pattern, sub, is_dir) and (pattern, sub) not in reported:
                        reported.add((pattern, sub))
                        kind = "the package folder" if is_dir and (root / sub / "__init__.py").exists() else \
                            ("the folder" if is_dir else "the file")
                        source = "rsync_exclude" if pattern in excludes else f"rsync_filter {cfg.get('rsync_filter')}"
                        fix = f" (anchor it at the top of the synced folder: '/{pattern.lstrip('/')}')" if not pattern.startswith("/") else ""
                        problems.append(f"{source} '{pattern}' removes {kind} {sub} from every node's copy of {local}"
                                        f" -> {remote}{fix}")
    return problems


# -- torch builds --------------------------------------------------------------------------------


def avssl_torch_pin() -> Optional[str]:
    """The exact torch version avssl requires (torch==X in its metadata)."""
    try:
        from importlib.metadata import requires

        for req in requires("avssl") or []:
            m = re.match(r"^torch\s*==\s*([0-9][^;\s,]*)", req)
            if m:
                return m.group(1)
    except Exception:
        pass
    return None


@dataclass
class _PipInstall:
    where: str
    command: str
    torch_spec: Optional[str]  # e.g. "torch==2.13.0+cpu"; None if torch is not named
    avssl: bool  # installs avssl (and with it its torch requirement)
    indexes: list[str]


def _pip_installs(commands: list[tuple[str, str]]) -> list[_PipInstall]:
    out = []
    for where, command in commands:
        for seg in _segments(command):
            names = [Path(t).name for t in seg]
            try:
                i = next(j for j in range(len(seg) - 1) if names[j] in ("pip", "pip3") or re.fullmatch(r"pip3?\.\d+", names[j]))
            except StopIteration:
                continue
            if seg[i + 1] != "install":
                continue
            torch_spec, avssl, indexes = None, False, []
            args = iter(seg[i + 2:])
            for tok in args:
                if tok in ("--index-url", "-i", "--extra-index-url", "-f", "--find-links"):
                    indexes.append(next(args, ""))
                elif tok.startswith(("--index-url=", "--extra-index-url=", "--find-links=")):
                    indexes.append(tok.split("=", 1)[1])
                elif tok in ("-e", "--editable"):
                    avssl |= "avssl" in next(args, "").lower()
                elif tok in ("-r", "--requirement", "-c", "--constraint"):
                    next(args, None)
                elif tok.startswith("-"):
                    continue
                elif re.match(r"^torch(?:\[[^\]]*\])?\s*(?:[=<>!~].*)?$", tok):
                    torch_spec = tok
                elif "avssl" in tok.lower():
                    avssl = True
            if torch_spec or avssl:
                out.append(_PipInstall(where, command, torch_spec, avssl, indexes))
    return out


def _torch_problems(cfg: dict[str, Any]) -> list[str]:
    pin = avssl_torch_pin() or "<avssl's pin>"
    found: dict[tuple[str, str], list[str]] = {}  # (where, problem) -> node names

    def add(where: str, problem: str, node: Node) -> None:
        found.setdefault((where, problem), []).append(node.name)

    for node in _nodes(cfg):
        first = next(iter(_pip_installs(node.commands)), None)
        if first is None:
            continue
        if first.torch_spec is None:
            if not node.gpu:
                add(first.where, f"`{first.command}` installs avssl before any torch, so pip pulls torch=={pin} from PyPI onto "
                    f"CPU nodes: for Linux that is the CUDA build (2.5 GB of CUDA wheels); install torch=={pin}+cpu "
                    f"--extra-index-url https://download.pytorch.org/whl/cpu first", node)
            continue
        m = re.match(r"^torch(?:\[[^\]]*\])?\s*==\s*([0-9][\w.]*)(?:\+([\w.]+))?$", first.torch_spec)
        if not m:
            add(first.where, f"`{first.torch_spec}` is not an exact version: any version other than avssl's torch=={pin} is "
                f"replaced when avssl installs, and PyPI's builds are CUDA builds", node)
            continue
        version, local = m.group(1), m.group(2) or ""
        if version != pin and not pin.startswith("<"):
            add(first.where, f"`{first.torch_spec}`, but avssl pins torch=={pin}: installing avssl then replaces it with "
                f"PyPI's (CUDA) build", node)
        cuda_index = any(re.search(r"/whl/(?:cu|rocm)\d", ix) for ix in first.indexes)
        if not node.gpu and local != "cpu":
            source = "from a CUDA index" if cuda_index else "from PyPI"
            add(first.where, f"`{first.torch_spec}` pulls a CUDA build {source} onto CPU nodes (2.5 GB of CUDA wheels): pin "
                f"the CPU build, torch=={version}+cpu --extra-index-url https://download.pytorch.org/whl/cpu", node)
        if node.gpu and local == "cpu":
            add(first.where, f"`{first.torch_spec}` is the CPU build on GPU nodes: install a CUDA build of torch=={version}", node)
    return [f"{where} (on {', '.join(nodes)}): {problem}" for (where, problem), nodes in found.items()]


# -- token, head address -------------------------------------------------------------------------


def _token_problems(cfg: dict[str, Any]) -> list[str]:
    mounts = {str(k): str(v) for k, v in (cfg.get("file_mounts") or {}).items()}
    tokens = [remote for remote in mounts if remote.rstrip("/").endswith("auth_token")]
    if not tokens:
        return ["file_mounts does not copy your Ray auth token (~/.ray/auth_token) to the nodes: with token "
                "authentication on, nodes with tokens of their own cannot join the head"]
    missing = [node.name for node in _nodes(cfg) if not any(_CHMOD_600.search(c) for _, c in node.commands)]
    if not missing:
        return []
    return [f"the Ray auth token copied to {tokens[0]} keeps the mode it had here (`ray get-auth-token --generate` writes it "
            f"644: readable by every user of the node) and nothing on the {', '.join(missing)} sets it to 600: add "
            f"`chmod 700 ~/.ray && chmod 600 {tokens[0]}` to setup_commands"]


def _head_address_problems(cfg: dict[str, Any]) -> list[str]:
    problems = []
    located = _located_commands(cfg)
    for where, command in located:
        m = _ADDRESS_GUESS.search(command)
        if m:
            problems.append(
                f"{where}: the head address is guessed from the node's interfaces (`{m.group(0)}`): on a head with several "
                f"(docker0, a management network) it picks the wrong one. Pin it: RAY_HEAD_IP on workers and provider.head_ip "
                f"from ~/ray_bootstrap_config.yaml on the head (see cluster.yaml), or a literal address on an EDIT line")
    head_ip = (cfg.get("provider") or {}).get("head_ip")
    defining = [(w, c) for w, c in located if re.search(r"AVSSL_HEAD_IP=", c)]
    if not defining:
        problems.append("nothing sets AVSSL_HEAD_IP, the head address the MLflow URI, the dashboard and `ray start` use: "
                        "the head address is not pinned")
        return problems
    for where, command in defining:
        text = command
        literal = re.search(r"AVSSL_HEAD_IP=['\"]?([0-9a-fA-F.:]+)['\"]?(?:\s|$|')", command)
        if literal:
            try:
                ipaddress.ip_address(literal.group(1))
            except ValueError:
                literal = None
        if literal:
            if head_ip and literal.group(1) != str(head_ip):
                problems.append(f"{where}: AVSSL_HEAD_IP={literal.group(1)} is not provider.head_ip ({head_ip})")
            continue
        if not any(marker in text for marker, _ in _PINNED_SOURCES):
            sources = "; ".join(desc for _, desc in _PINNED_SOURCES)
            problems.append(f"{where}: AVSSL_HEAD_IP does not come from a pinned source ({sources}; or a literal address): "
                            f"the head address is not pinned")
        elif "ray_bootstrap_config.yaml" in text and not head_ip and "169.254.169.254" not in text:
            problems.append(f"{where}: reads provider.head_ip from ~/ray_bootstrap_config.yaml, but this provider has no head_ip")
    return problems


def _start_problems(cfg: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("head_start_ray_commands",):
        for i, command in enumerate(cfg.get(key) or []):
            command = str(command)
            if "mlflow server" in command and re.search(r"(?:^|[^&])&\s*$|\bnohup\b|&\s*(?:$|;)", command):
                problems.append(
                    f"{key}[{i}]: an MLflow server started in the background on its own outlives `ray down` (which only runs "
                    f"`ray stop`); start it with scripts/head_services.py start, which stops it when Ray stops")
    return problems


_EXPORTED = re.compile(r"\b([A-Z][A-Z0-9_]*)=(\S+)")
_S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$")


def _storage_locations(commands: str) -> dict[str, str]:
    """Where the nodes keep corpora, runs and MLflow artifacts, as the commands set them: exported
    AVSSL_* / MLflow variables and the MLflow server's --artifacts-destination, with `$VAR`
    references to other exported variables expanded."""
    exported: dict[str, str] = {}
    for name, value in _EXPORTED.findall(commands):
        exported.setdefault(name, value.strip("'\""))

    def expand(value: str) -> str:
        return re.sub(r"\$\{?([A-Z][A-Z0-9_]*)\}?", lambda m: exported.get(m.group(1), m.group(0)), value)

    found = {name: expand(v) for name, v in exported.items() if name in ("AVSSL_STORAGE_PATH", "AVSSL_BUCKET")}
    m = re.search(r"--artifacts-destination[ =](\S+)", commands)
    if m:
        found["--artifacts-destination"] = expand(m.group(1))
    return found


def _object_storage_problems(cfg: dict[str, Any]) -> list[str]:
    """Storage in S3: well-formed bucket URIs, and a way for every node to reach them without a key
    in the file (an instance profile on AWS; an exported AWS_ENDPOINT_URL elsewhere)."""
    commands = "\n".join(_commands(cfg))
    remote = {k: v for k, v in _storage_locations(commands).items() if "://" in v}
    problems = [f"{k}={v} is not an S3 URI of the form s3://bucket/prefix (bucket: 3-63 lowercase letters, digits, dots, hyphens)"
                for k, v in remote.items() if v.startswith("s3") and not _S3_URI.match(v)]
    if not any(v.startswith("s3://") for v in remote.values()):
        return problems
    where = ", ".join(f"{k}={v}" for k, v in remote.items())
    if (cfg.get("provider") or {}).get("type") == "aws":
        for name, node_type in (cfg.get("available_node_types") or {}).items():
            profile = (node_type.get("node_config") or {}).get("IamInstanceProfile") or {}
            if not (profile.get("Arn") or profile.get("Name")):
                problems.append(f"node type '{name}' has no IamInstanceProfile: its processes cannot reach {where} "
                                "(give the nodes a role with access to the bucket; keys never go in this file)")
    elif "AWS_ENDPOINT_URL" not in commands:
        problems.append(f"storage in S3 ({where}) on a '{(cfg.get('provider') or {}).get('type')}' cluster: export AWS_ENDPOINT_URL "
                        "(the S3-compatible server) to the nodes; credentials come from the nodes' environment or ~/.aws")
    return problems


def avssl_problems(cfg: dict[str, Any], text: str, path: Optional[Path] = None) -> list[str]:
    """What a Ray-valid file can still get wrong for avssl."""
    problems = []
    commands = "\n".join(_commands(cfg))
    if "pip install" not in commands or "avssl" not in commands:
        problems.append("no setup command installs avssl on the nodes (expected `pip install ... avssl` in setup_commands)")
    head_start = "\n".join(str(c) for c in cfg.get("head_start_ray_commands") or [])
    if "mlflow server" not in head_start and "head_services.py start" not in head_start:
        problems.append("no MLflow server is started on the head (head_start_ray_commands)")
    for var in ("MLFLOW_TRACKING_URI", "AVSSL_STORAGE_PATH"):
        if var not in commands:
            problems.append(f"{var} is not exported to the nodes: runs would track / checkpoint locally on each node")
    for m in _PUBLIC_BIND.finditer(commands):
        problems.append(f"`{m.group(0)}` binds a service to every interface; bind the head's private address")
    if "RAY_AUTH_MODE=disabled" in commands:
        problems.append("Ray token authentication is disabled (RAY_AUTH_MODE=disabled)")
    problems += _kill_pattern_problems(cfg)
    problems += _sync_problems(cfg, path)
    problems += _torch_problems(cfg)
    problems += _token_problems(cfg)
    problems += _head_address_problems(cfg)
    problems += _start_problems(cfg)
    problems += _object_storage_problems(cfg)
    for p_, key, value in _walk(cfg):
        where = f"{p_}.{key}" if p_ else str(key)
        if p_.startswith("file_mounts"):
            continue  # remote path -> local path: copying a key file is how secrets should travel
        if isinstance(value, str) and _SECRET_KEYS.search(str(key)) and str(key) not in _PATH_OK_KEYS and value.strip():
            problems.append(f"{where} holds a credential; read it from the environment instead")
    for m in _SECRET_VALUES.finditer(text):
        problems.append(f"a credential is written into the file ({m.group(0)[:24]}...); read it from the environment")
    return problems


def check_cluster_file(path: str | Path) -> dict[str, Any]:
    """Ray's validator, then avssl's checks; raises ConfigError listing every problem found."""
    import copy
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(path)
    cfg = read_yaml_mapping(path, "cluster-launcher config")
    text = path.read_text()
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # its INFO lines are about `ray up`, not this check
    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except BaseException as e:  # jsonschema.ValidationError, ValueError, click's exit on a PANIC
        if isinstance(e, KeyboardInterrupt):
            raise
        message = getattr(e, "message", None) or getattr(e, "format_message", lambda: None)() or str(e)
        raise ConfigError(f"Ray's cluster validator rejected {path}: {str(message).splitlines()[0]}") from None
    problems = avssl_problems(cfg, text, path)
    if problems:
        raise ConfigError(f"{path} is a valid Ray cluster config, but:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def local_token_warning(cfg: dict[str, Any]) -> Optional[str]:
    """Your own copy of the token: `ray get-auth-token --generate` leaves it readable by everyone."""
    for remote, local in (cfg.get("file_mounts") or {}).items():
        if str(remote).rstrip("/").endswith("auth_token"):
            p = Path(str(local)).expanduser()
            try:
                mode = p.stat().st_mode & 0o777
            except OSError:
                return f"note: {local} does not exist yet: run `ray get-auth-token --generate && chmod 600 {local}` before `ray up`"
            if mode & 0o077:
                return f"note: your {local} has mode {mode:o}: other users of this machine can read it (chmod 600 {local})"
    return None


def cluster_check_command(paths: list[str]) -> int:
    import sys

    for p in paths:
        cfg = check_cluster_file(p)
        provider = cfg.get("provider", {}).get("type")
        print(f"{p}: accepted by Ray's cluster validator and avssl's checks (provider {provider}, cluster '{cfg.get('cluster_name')}')")
        note = local_token_warning(cfg)
        if note:
            print(note, file=sys.stderr)
    return 0
