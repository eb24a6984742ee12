"""Party configuration: one TOML file per party, command-line flags override it.

Layer: runtime (above :mod:`permllm.net`, below the CLI). :data:`KEYS` is the one
list of settings: the TOML loader, the CLI flags of ``permllm serve`` and
``permllm generate`` and their ``--help`` text are all made from it, so every key
is documented and every key has a flag. Precedence: built-in default < TOML file
< flag. Relative paths in a file are relative to the file's directory.

Example (the model party)::

    listen = "0.0.0.0:7001"
    helper = "helper.example.org:7002"
    model = "smollm2"

    [tls]
    ca = "ca.pem"
    cert = "model.pem"
    key = "model.key"

    [limits]
    max_sessions = 8
"""
from __future__ import annotations

import argparse
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..net.tls import client_context, server_context
from ..protocols import DEFAULT_RATIO, ShareConfig
from ..protocols.config import ARITHS, DTYPES, OFFLINE_MODES, ROUTE_CHOICES, check_dtype

__all__ = ["ConfigError", "Key", "KEYS", "PartyConfig", "load_config", "add_flags", "add_key_flags", "flag_values",
           "from_args", "keys_help", "dtype_arg", "SPECULATE_MODES", "SPECULATE_KEYS"]

MODEL, HELPER, USER = "model", "helper", "user"
SPECULATE_MODES = ("off", "prompt-lookup", "draft")
DAEMONS = frozenset({MODEL, HELPER})
ALL = frozenset({MODEL, HELPER, USER})


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used; the message names the key and the file."""


@dataclass(frozen=True)
class Key:
    """One setting: its TOML key (dotted for a table), type, default, flag, the parties it applies to, and help."""

    name: str
    type: type
    default: Any
    flag: str
    roles: frozenset[str]
    help: str
    path: bool = False  # a file path (resolved against the TOML file's directory)
    metavar: str = ""
    serve: bool = False  # a daemon's setting: the user party has it in ``permllm serve user`` only
    user_default: Any = None  # the user party's default where it differs (``serve`` keys)
    choices: tuple[str, ...] = ()  # the values a str key takes (checked in files and flags)
    parse: Callable[[str], Any] | None = None  # the flag's parser, where it takes more than the type does

    def default_for(self, role: str) -> Any:
        """The built-in default of this key for ``role``."""
        return self.user_default if role == USER and self.user_default is not None else self.default

    @property
    def dest(self) -> str:
        """The argparse destination of the flag."""
        return "cfg_" + self.name.replace(".", "_")


def _draft_tokens(v: str) -> int:
    """The --draft-tokens flag: a number of drafts >= 0, or auto (0: adaptive)."""
    if v == "auto":
        return 0
    if not v.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or auto, got {v!r}")
    return int(v)


KEYS: tuple[Key, ...] = (
    Key("listen", str, "127.0.0.1:0", "--listen", ALL, "HOST:PORT to listen on (port 0: any free port); the user "
        "party serves its OpenAI-compatible HTTP endpoint there", metavar="HOST:PORT", serve=True),
    Key("helper", str, None, "--helper", frozenset({MODEL, USER}), "HOST:PORT of the helper daemon",
        metavar="HOST:PORT"),
    Key("model_party", str, None, "--model-party", frozenset({USER}), "HOST:PORT of the model-party daemon",
        metavar="HOST:PORT"),
    Key("model", str, "smollm2", "--model", frozenset({MODEL, USER}),
        "'smollm2', 'gemma3-270m' or a local Hugging Face directory (the user party loads only its tokenizer)",
        metavar="MODEL"),
    Key("dtype", str, "float64", "--dtype", ALL, f"share dtype, one of {', '.join(DTYPES)} (float32 is refused: "
        "its masks do not hide the inputs); all three parties must agree", metavar="DTYPE"),
    Key("ratio", float, None, "--ratio", ALL, "mask ratio R (default 2^12); all three parties must agree"),
    Key("route", str, "auto", "--route", ALL, f"attention route in decode, one of {', '.join(ROUTE_CHOICES)} (online "
        "hops per layer; auto: 8 in the dealt mode unless --arith float, else 12); all three parties must agree",
        metavar="ROUTE", choices=tuple(ROUTE_CHOICES)),
    Key("offline", str, "dealer", "--offline", ALL, f"offline phase of the linear layers, one of "
        f"{', '.join(OFFLINE_MODES)}: 'he' is the light client (CKKS products with the model party, no "
        "model-sized state at the user); all three parties must agree", metavar="MODE",
        choices=tuple(OFFLINE_MODES)),
    Key("arith", str, "auto", "--arith", ALL, f"share arithmetic, one of {', '.join(ARITHS)}: 'ring' is exact "
        "fixed point on Z_2^64 (perfect hiding; the dealt mode), 'float' real numbers (statistical "
        "hiding); 'auto' takes the ring where the model fits it at float-like precision; all three parties must "
        "agree", metavar="ARITH", choices=tuple(ARITHS)),
    Key("speculate", str, "off", "--speculate", frozenset({USER}), "speculative decoding: the user drafts tokens "
        "(prompt-lookup: copies from the context; draft: a small public model with the same tokenizer) and one "
        "private pass verifies them; the same tokens in fewer hops (the dealt mode only)", metavar="MODE",
        choices=SPECULATE_MODES),
    Key("draft_tokens", int, 0, "--draft-tokens", frozenset({USER}), "drafts per verify pass (0, or auto on the "
        "command line: as many as the recent acceptance makes worth a pass's hops)", metavar="K",
        parse=_draft_tokens),
    Key("draft", str, None, "--draft", frozenset({USER}), "the draft model for speculate = 'draft' (a named model "
        "or a local Hugging Face directory)", metavar="MODEL"),
    Key("model_fingerprint", str, None, "--model-fingerprint", frozenset({HELPER, USER}),
        "accept only the model with this fingerprint (the model daemon logs its own at start-up)", metavar="HEX"),
    Key("insecure", bool, False, "--insecure", ALL,
        "plain TCP without TLS: only on a network you trust (TLS is on by default)"),
    Key("log_level", str, "INFO", "--log-level", ALL, "DEBUG, INFO, WARNING or ERROR (logs never hold secrets)",
        metavar="LEVEL", serve=True),
    Key("tls.ca", str, None, "--ca", ALL, "PEM file of the deployment's CA (permllm keys makes it)", path=True,
        metavar="FILE"),
    Key("tls.cert", str, None, "--cert", ALL, "PEM file of this party's certificate", path=True, metavar="FILE"),
    Key("tls.key", str, None, "--key", ALL, "PEM file of this party's private key", path=True, metavar="FILE"),
    Key("tls.pins", dict, {}, "--pin", ALL, "peer certificates pinned by role: a table role = \"sha256:HEX\" "
        "(flag: --pin ROLE=sha256:HEX, repeatable)"),
    Key("limits.max_sessions", int, 8, "--max-sessions", ALL,
        "sessions served at once; past it a new user is refused with a 'busy' error (the user party: sessions "
        "it sets up at start-up, each holding the masked weights; more requests queue)", serve=True,
        user_default=1),
    Key("limits.message_timeout", float, 120.0, "--message-timeout", ALL,
        "seconds a peer may show no sign of life (no frame, keep-alives included, while a message is "
        "awaited); then the session ends. A live but busy or idle peer keeps its session"),
    Key("limits.handshake_timeout", float, 10.0, "--handshake-timeout", ALL,
        "seconds for a connection's TLS handshake and hello"),
    Key("limits.pairing_timeout", float, 30.0, "--pairing-timeout", frozenset({HELPER}),
        "seconds the helper waits for the second party of a session"),
    Key("limits.connect_retries", int, 10, "--connect-retries", frozenset({MODEL, USER}),
        "connection attempts to a peer after the first (start-up of a deployment)"),
    Key("limits.connect_backoff", float, 0.2, "--connect-backoff", frozenset({MODEL, USER}),
        "seconds before the first retry; doubles each time"),
    Key("limits.max_backoff", float, 5.0, "--max-backoff", frozenset({MODEL, USER}), "cap on the wait between retries"),
    Key("limits.max_frame", int, 256 * 1024 * 1024, "--max-frame", ALL, "largest frame accepted, bytes"),
    Key("limits.max_unread", int, 1 << 30, "--max-unread", DAEMONS,
        "bytes of received messages a session may hold from a user (or, at the helper, from any peer) "
        "before they are asked for"),
    Key("limits.drain_timeout", float, 60.0, "--drain-timeout", ALL,
        "on SIGTERM: seconds running sessions (the user party: requests) get to finish before they are ended",
        serve=True),
)
_BY_NAME = {k.name: k for k in KEYS}
SPECULATE_KEYS = ("speculate", "draft_tokens", "draft")


@dataclass
class PartyConfig:
    """The settings of one party: ``cfg["limits.max_sessions"]`` (keys as in the TOML file)."""

    role: str
    values: dict[str, Any] = field(default_factory=dict)
    source: str = "defaults"

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def share_config(self) -> ShareConfig:
        """The share configuration: dtype, mask ratio, attention route and offline mode."""
        return ShareConfig(self["dtype"], self["ratio"] or DEFAULT_RATIO, self["route"], self["offline"],
                           self["arith"])

    def _tls_files(self) -> tuple[str, str, str] | None:
        if self["insecure"]:
            return None
        files = (self["tls.ca"], self["tls.cert"], self["tls.key"])
        if not all(files):
            missing = [k for k, v in zip(("tls.ca", "tls.cert", "tls.key"), files) if not v]
            raise ConfigError(
                f"TLS is on by default and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set "
                f"({self.source}): give them in the config file or as --ca/--cert/--key (permllm keys makes "
                "them), or pass --insecure for plain TCP on a network you trust")
        return files  # type: ignore[return-value]

    def server_ssl(self) -> ssl.SSLContext | None:
        """The mutual-TLS server context, or None with ``insecure``."""
        files = self._tls_files()
        return None if files is None else server_context(*files)

    def client_ssl(self) -> ssl.SSLContext | None:
        """The mutual-TLS client context, or None with ``insecure``."""
        files = self._tls_files()
        return None if files is None else client_context(*files)


def _check(key: Key, value: Any, where: str) -> Any:
    if key.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is not None and not (isinstance(value, key.type) and not (key.type is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: {key.name} must be {key.type.__name__}, got {value!r}")
    if key.name == "dtype":
        try:
            check_dtype(value)
        except ValueError as e:
            raise ConfigError(f"{where}: dtype: {e}") from None
    if key.choices and value not in key.choices:
        raise ConfigError(f"{where}: {key.name} must be one of {', '.join(key.choices)}, got {value!r}")
    if key.name == "draft_tokens" and value < 0:
        raise ConfigError(f"{where}: draft_tokens must be 0 (adaptive) or more, got {value!r}")
    if key.name == "log_level" and str(value).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{where}: log_level must be DEBUG, INFO, WARNING or ERROR, got {value!r}")
    if key.name == "tls.pins":
        for role, fp in value.items():
            if role not in ALL or not (isinstance(fp, str) and fp.lower().startswith("sha256:") and len(fp) == 71):
                raise ConfigError(f"{where}: tls.pins must map model/helper/user to 'sha256:<64 hex digits>', "
                                  f"got {role} = {fp!r}")
    retries = key.name == "limits.connect_retries"
    if key.name.startswith("limits.") and (value < 0 if retries else value <= 0):
        raise ConfigError(f"{where}: {key.name} must be {'0 or more' if retries else 'positive'}, got {value!r}")
    return value


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        name = prefix + k
        if isinstance(v, dict) and name not in _BY_NAME:
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def load_config(role: str, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> PartyConfig:
    """Defaults, then the TOML file at ``path``, then ``overrides`` (key name → value; None = not given)."""
    values = {k.name: k.default_for(role) for k in KEYS if role in k.roles}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            table = tomllib.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {source!r}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {source!r} is not valid TOML: {e}") from None
        for name, value in _flatten(table).items():
            key = _BY_NAME.get(name)
            if key is None:
                raise ConfigError(f"{source}: unknown key {name!r}; see 'permllm serve --help' for the keys")
            if role not in key.roles:
                raise ConfigError(f"{source}: key {name!r} does not apply to the {role} party "
                                  f"(it is for {', '.join(sorted(key.roles))})")
            value = _check(key, value, source)
            if key.path and value is not None:
                value = str((path.parent / value).resolve()) if not Path(value).is_absolute() else value
            values[name] = value
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        key = _BY_NAME[name]
        if role not in key.roles:
            raise ConfigError(f"{key.flag} does not apply to the {role} party "
                              f"(it is for {', '.join(sorted(key.roles))})")
        values[name] = _check(key, value, "command line")
    mode = values.get("speculate", "off")
    if mode != "off" and values.get("offline") == "he":
        raise ConfigError(f"speculate = {mode!r} needs the dealt offline phase: offline = 'he' (the light client) has "
                          f"no verify passes ({source} and the command line)")
    if mode == "draft" and not values.get("draft"):
        raise ConfigError(f"speculate = 'draft' needs draft: a model with the same tokenizer ({source} and the command "
                          "line)")
    return PartyConfig(role, values, source)


def _pin(text: str) -> tuple[str, str]:
    role, sep, fp = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected ROLE=sha256:HEX, got {text!r}")
    return role, fp


def add_flags(parser: argparse.ArgumentParser, roles: frozenset[str], serve: bool = True) -> None:
    """Add the flag of every key that applies to one of ``roles`` (defaults None: 'not given');
    ``serve=False`` (``permllm generate``) leaves out the daemons' settings."""
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file (keys below)")
    for k in KEYS:
        if (k.roles & roles) and not (k.serve and not serve):
            _add_flag(parser, k)


def add_key_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """Add the flags of the keys ``names`` alone (a command without configuration files, e.g. ``permllm bench``);
    :func:`flag_values` reads them."""
    for n in names:
        _add_flag(parser, _BY_NAME[n])


def flag_values(role: str, args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The values of the keys ``names`` for ``role`` from the flags :func:`add_key_flags` added (else the defaults)."""
    cfg = load_config(role, None, {n: getattr(args, _BY_NAME[n].dest, None) for n in names})
    return {n: cfg[n] for n in names}


def _add_flag(parser: argparse.ArgumentParser, k: Key) -> None:
    dest = k.dest
    if k.type is bool:
        parser.add_argument(k.flag, dest=dest, action="store_const", const=True, default=None, help=k.help)
    elif k.type is dict:
        parser.add_argument(k.flag, dest=dest, action="append", type=_pin, default=None, metavar="ROLE=SHA256",
                            help=k.help)
    else:
        parser.add_argument(k.flag, dest=dest, type=k.parse or (dtype_arg if k.name == "dtype" else k.type),
                            default=None, metavar=k.metavar or k.type.__name__.upper(),
                            choices=list(k.choices) or None, help=k.help)


def dtype_arg(value: str) -> str:
    """A ``--dtype`` value, or argparse's error saying why it is refused."""
    try:
        return check_dtype(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def from_args(role: str, args: argparse.Namespace) -> PartyConfig:
    """The configuration of ``role`` from ``--config`` and the flags :func:`add_flags` added."""
    overrides = {}
    for k in KEYS:
        v = getattr(args, k.dest, None)
        overrides[k.name] = dict(v) if k.type is dict and v is not None else v
    return load_config(role, getattr(args, "config", None), overrides)


def keys_help(roles: frozenset[str]) -> str:
    """The TOML keys that apply to ``roles``, for an ``--help`` epilog."""
    lines = ["configuration file keys (TOML; the flag of the same name overrides the file):"]
    for k in KEYS:
        if k.roles & roles:
            default = "" if k.default in (None, {}) else f" (default {k.default!r}"
            if k.user_default is not None and USER in roles:
                default += f"; user {k.user_default!r}"
            default += ")" if default else ""
            who = "" if roles <= k.roles else f" [{', '.join(sorted(k.roles & roles))}]"
            lines.append(f"  {k.name:<26} {k.flag:<20} {k.type.__name__}{who}{default}")
            lines.append(f"      {k.help}")
    return "\n".join(lines)
