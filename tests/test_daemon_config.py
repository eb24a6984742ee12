"""Party configuration: TOML files, flags over files, errors that name the key, and --help covering every key."""
from __future__ import annotations

import subprocess
import sys

import pytest

from permllm.cli import main
from permllm.runtime.config import KEYS, ConfigError, load_config

from .daemons import ENV


def test_file_then_flags(tmp_path):
    conf = tmp_path / "model.toml"
    conf.write_text('listen = "0.0.0.0:7001"\nhelper = "h.example.org:7002"\nratio = 1024.0\n'
                    '[tls]\nca = "certs/ca.pem"\ncert = "/abs/model.pem"\nkey = "certs/model.key"\n'
                    '[tls.pins]\nhelper = "sha256:' + "ab" * 32 + '"\n'
                    '[limits]\nmax_sessions = 3\nmessage_timeout = 5\n')
    cfg = load_config("model", conf, {"limits.max_sessions": 4, "ratio": None})
    assert cfg["listen"] == "0.0.0.0:7001" and cfg["helper"] == "h.example.org:7002"
    assert cfg["tls.ca"] == str(tmp_path / "certs" / "ca.pem") and cfg["tls.cert"] == "/abs/model.pem"
    assert cfg["tls.pins"] == {"helper": "sha256:" + "ab" * 32}
    assert cfg["limits.max_sessions"] == 4 and cfg["limits.message_timeout"] == 5.0  # int accepted as float
    assert cfg.share_config().dtype == "float64" and cfg.share_config().ratio == 1024.0
    assert cfg["limits.drain_timeout"] == 60.0  # a default


@pytest.mark.parametrize("text, role, error", [
    ('lsten = "x"', "model", r"unknown key 'lsten'"),
    ('[limits]\nmax_session = 3', "helper", r"unknown key 'limits.max_session'"),
    ('helper = "h:1"', "helper", r"key 'helper' does not apply to the helper party \(it is for model, user\)"),
    ('[limits]\nmax_sessions = "8"', "model", r"limits.max_sessions must be int, got '8'"),
    ('[limits]\nmax_sessions = true', "model", r"limits.max_sessions must be int, got True"),
    ('[limits]\nmessage_timeout = 0', "model", r"limits.message_timeout must be positive"),
    ('dtype = "float16"', "model", r"dtype: share dtype must be one of float64, not 'float16'"),
    ('dtype = "float32"', "helper", r"dtype: float32 shares are refused: float32 masks of ratio 2\*\*4 do not hide the "
                                    r"inputs \(an audit identified 32 of 32 token ids exactly"),
    ('[tls.pins]\nmodel = "md5:1"', "user", r"tls.pins must map model/helper/user to 'sha256:<64 hex digits>'"),
    ('listen = ', "model", r"is not valid TOML"),
    ('speculate = "guess"', "user", r"speculate must be one of off, prompt-lookup, draft, got 'guess'"),
    ('speculate = "draft"', "user", r"speculate = 'draft' needs draft: a model with the same tokenizer"),
    ('speculate = "prompt-lookup"\noffline = "he"', "user", r"needs the dealt offline phase: offline = 'he'"),
    ('draft_tokens = -1', "user", r"draft_tokens must be 0 \(adaptive\) or more"),
    ('speculate = "prompt-lookup"', "model", r"key 'speculate' does not apply to the model party"),
])
def test_file_errors_name_the_key(tmp_path, text, role, error):
    conf = tmp_path / "p.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_config(role, conf)


def test_speculation_settings(tmp_path):
    """A user's file sets speculative decoding; the flags override it (--draft-tokens auto: 0, adaptive)."""
    from permllm.cli import _parser
    from permllm.runtime.config import from_args

    conf = tmp_path / "user.toml"
    conf.write_text('speculate = "draft"\ndraft = "smollm2"\ndraft_tokens = 4\n')
    cfg = load_config("user", conf)
    assert (cfg["speculate"], cfg["draft"], cfg["draft_tokens"]) == ("draft", "smollm2", 4)
    args = _parser().parse_args(["generate", "hi", "--config", str(conf), "--speculate", "prompt-lookup",
                                 "--draft-tokens", "auto"])
    cfg = from_args("user", args)
    assert (cfg["speculate"], cfg["draft_tokens"]) == ("prompt-lookup", 0)
    assert load_config("user")["speculate"] == "off"


def test_flag_for_another_party_is_refused():
    with pytest.raises(ConfigError, match="--helper does not apply to the helper party"):
        load_config("helper", overrides={"helper": "h:1"})


@pytest.mark.parametrize("argv", [["generate", "hi"], ["bench", "smollm2"], ["demo"], ["serve", "model"]])
def test_float32_flag_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--dtype", "float32"])
    assert e.value.code == 2
    assert "argument --dtype: float32 shares are refused: float32 masks of ratio 2**4 do not hide the inputs" in \
        capsys.readouterr().err


def test_tls_needs_all_three_files_unless_insecure(tmp_path):
    with pytest.raises(ConfigError, match=r"TLS is on by default and tls.key is not set .*--insecure"):
        load_config("user", overrides={"tls.ca": "a", "tls.cert": "b"}).client_ssl()
    assert load_config("user", overrides={"insecure": True}).client_ssl() is None


def _help(*argv: str) -> str:
    out = subprocess.run([sys.executable, "-m", "permllm.cli", *argv, "--help"], capture_output=True, text=True,
                         env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_serve_help_documents_every_key():
    text = _help("serve")
    for k in KEYS:
        if k.roles & {"model", "helper"}:
            assert f"  {k.name} " in text and k.flag in text, k.name
    assert "SIGTERM" in text and "mutual TLS" in text


def test_generate_has_every_user_flag():
    text = _help("generate")
    for k in KEYS:
        if "user" in k.roles:  # a daemon's settings (listen, ...) only in "serve user"
            assert (k.flag in text) != k.serve, k.flag


def test_keys_command(tmp_path, capsys):
    assert main(["keys", "--out", str(tmp_path / "k"), "--roles", "helper", "user", "--name", "h1", "alice"]) == 0
    out = capsys.readouterr().out
    assert "helper" in out and "alice.pem" in out and "sha256:" in out
    assert main(["keys", "--out", str(tmp_path / "k"), "--roles", "user", "--name", "bob", "carol"]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        f"{n}.{x}" for n in ("alice", "bob", "ca", "carol", "h1") for x in ("key", "pem")]
