"""The ``permllm`` command line: generate (embedded or against daemons), serve (party daemons), keys
(a deployment's certificates), demo, bench."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any, Callable

__all__ = ["main"]


def _config(args: argparse.Namespace) -> Any:
    from .protocols import DEFAULT_RATIO, ShareConfig

    return ShareConfig(args.dtype, args.ratio or DEFAULT_RATIO, getattr(args, "route", None) or "auto",
                       arith=getattr(args, "arith", None) or "auto")


def _link(args: argparse.Namespace) -> Any:
    from .net import LinkEmulator

    if not args.rtt and not args.bandwidth:
        return None
    return LinkEmulator.from_spec(rtt_ms=args.rtt or 0.0, bandwidth_mbit=args.bandwidth)


class _Bar:
    """A one-line progress bar on stderr (only on a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.on = sys.stderr.isatty() and not quiet

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.on:
            return
        n = 30 * done // max(total, 1)
        label = {"setup": "setup: masked weights", "offline": "offline"}.get(what, what)
        sys.stderr.write(f"\r{label:<22} [{'#' * n}{'.' * (30 - n)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _audit(args: argparse.Namespace) -> int:
    """Print each role's counts and uniformity tests as JSON; exit 1 if a test fails."""
    from .protocols.transcript import audit

    report = audit(args.dir)
    if not report:
        raise SystemExit(f"permllm audit: no transcript (DIR/<role>/index.json) under {args.dir}")
    print(json.dumps(report, indent=1))
    tests = [t for r in report.values() for group in ("uniformity", "repeats") for t in r[group].values()]
    return 0 if all(t["pass"] is not False for t in tests) else 1


async def _generate(args: argparse.Namespace) -> int:
    from . import connect, local
    from .protocols.sampling import Sampler

    from .runtime.config import from_args

    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    bar = _Bar(args.json or args.quiet)
    cfg = from_args("user", args)
    if bool(cfg["model_party"]) != bool(cfg["helper"]):
        raise SystemExit("permllm generate: --model-party and --helper go together")
    if cfg["model_party"]:
        session = await connect(model=_tokenizer_source(cfg["model"], args.ids), settings=cfg, link=_link(args),
                                progress=bar, transcript=args.transcript)
    else:
        session = await local(cfg["model"], transport=args.transport, config=cfg.share_config(), link=_link(args),
                              progress=bar, transcript=args.transcript)
    async with session:
        prompt: Any = args.prompt
        if args.ids:
            prompt = [int(t) for t in args.prompt.replace(",", " ").split()]
        chunk = {} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}
        spec = _speculator(cfg.values, session)
        async for piece in session.generate(prompt, args.max_new_tokens, chat=not args.raw, sampler=sampler,
                                            speculate=spec, **chunk):
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        r = session.last
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        sys.stdout.write("\n")
        print(f"[{len(r.token_ids)} tokens, {r.tokens_per_s:.2f} tok/s online, online {r.online_s:.1f} s "
              f"({r.online_bytes / 1e6:.1f} MB, {r.online_hops} hops), offline {r.offline_s:.1f} s "
              f"({r.offline_bytes / 1e6:.1f} MB), setup {r.setup_s:.1f} s ({r.setup_bytes / 1e6:.0f} MB)]",
              file=sys.stderr)
        if r.speculative:
            print(f"[{r.passes} verify passes, {sum(r.accepted)} of {sum(r.drafted)} drafts accepted]",
                  file=sys.stderr)
    return 0


def _speculator(values: dict[str, Any], session: Any) -> Any:
    """The user's speculator from the speculate, draft_tokens and draft settings (None: off)."""
    from .runtime.speculate import make_drafter

    drafter = make_drafter(values["speculate"], values["draft"])
    return None if drafter is None else session.speculator(drafter, values["draft_tokens"])


def _tokenizer_source(model: str, ids: bool) -> str | None:
    """The model whose tokenizer the user loads; None when the prompt is token ids and the model has none."""
    from pathlib import Path

    from .model.loaders import NAMED_MODELS

    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if ids and model not in NAMED_MODELS and not any((Path(model) / f).exists() for f in files):
        return None
    return model


async def _serve(args: argparse.Namespace) -> int:
    from .runtime.config import from_args
    from .runtime.daemon import HelperDaemon, ModelDaemon

    cfg = from_args(args.role, args)
    logging.getLogger().setLevel(cfg["log_level"].upper())
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a daemon's log is records, not progress bars

    def ready(host: str, port: int) -> None:
        print(f"permllm {args.role} listening on {host}:{port}", flush=True)

    daemon: Any
    if args.role == "user":
        from .runtime.openai_server import UserDaemon
        daemon = await UserDaemon.create(cfg)
    else:
        daemon = await ModelDaemon.create(cfg) if args.role == "model" else HelperDaemon(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    await daemon.run(ready)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .runtime.keys import make_keys

    issued = make_keys(Path(args.out), tuple(args.roles), names=tuple(args.name) if args.name else None,
                       days=args.days)
    print(f"CA: {Path(args.out) / 'ca.pem'} (keep {Path(args.out) / 'ca.key'} offline)")
    for i in issued:
        print(f"{i.role:<6} {i.cert} {i.key} {i.fingerprint}")
    return 0


def _one_or_list(text: str, conv: Callable[[str], float], what: str, least: float) -> Any:
    """A flag that takes one number or a comma-separated list of them, each at least ``least``."""
    try:
        vals = [conv(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} or a comma-separated list of them, got {text!r}") from None
    if not vals or min(vals) < least:
        raise argparse.ArgumentTypeError(f"expected {what} of at least {least:g}, got {text!r}")
    return vals if "," in text else vals[0]


def _prompt_lens(text: str) -> int | list[int]:
    """``--prompt-len``: one length, or a comma-separated list of them (the scaling bench)."""
    return _one_or_list(text, int, "a prompt length", 1)


def _rtts(text: str) -> float | list[float]:
    """``--rtt``: one round-trip time (ms), or a comma-separated list of them (the speculation bench)."""
    return _one_or_list(text, float, "a round-trip time in ms", 0)


def _scaling(args: argparse.Namespace) -> int:
    """``permllm bench MODEL --prompt-len L1,L2,...``: the scaling bench, one report for all lengths."""
    from .runtime.scaling import bench_scaling, format_scaling, plot_scaling

    if args.target not in ("smollm2", "gemma3-270m"):
        raise SystemExit("permllm bench: a list of prompt lengths goes with smollm2 or gemma3-270m")
    if args.rtt or args.bandwidth:
        raise SystemExit("permllm bench: the scaling bench (a list of prompt lengths) runs without --rtt/--bandwidth")

    def progress(row: dict[str, Any]) -> None:  # a long run's progress, on stderr (stdout holds the report)
        failed = "; ".join(f"{k}: {v}" for k, v in row["errors"].items())
        ms = {k: "-" if row[k] is None else f"{row[k]:,.0f}" for k in ("ttft_ms", "plaintext_ttft_ms")}
        print(f"prompt {row['prompt_len']}: time to first token {ms['ttft_ms']} ms, plaintext "
              f"{ms['plaintext_ttft_ms']} ms" + (f"; failed: {failed}" if failed else ""), file=sys.stderr,
              flush=True)
    r = bench_scaling(args.target, args.prompt_len, transport=args.transport, config=_config(args),
                      progress=progress)
    if args.plot:
        plot_scaling(r, args.plot)
    print(json.dumps(r) if args.json else format_scaling(r))
    return 0


async def _bench_speculate(args: argparse.Namespace) -> int:
    """``permllm bench MODEL --speculate …``: decoding vs speculative decoding at each RTT, same run."""
    from .runtime.config import SPECULATE_KEYS, flag_values
    from .runtime.spec_bench import bench_speculate, format_speculate
    from .runtime.speculate import make_drafter

    if args.target not in ("smollm2", "gemma3-270m") or isinstance(args.prompt_len, list):
        raise SystemExit("permllm bench: --speculate goes with smollm2 or gemma3-270m and no list of prompt lengths")
    if not 1 <= args.prompts <= 4:
        raise SystemExit("permllm bench: --prompts is 1 to 4")
    v = flag_values("user", args, SPECULATE_KEYS)

    def progress(row: dict[str, Any]) -> None:
        print(f"RTT {row['rtt_ms']:g} ms, {row['kind']}: hops/token {row['decode']['hops_per_token']:.0f} -> "
              f"{row['speculate']['hops_per_token']:.0f}, online s/token {row['decode']['online_s_per_token']:.3f} "
              f"-> {row['speculate']['online_s_per_token']:.3f} ({row['bench_s']:.0f} s)", file=sys.stderr, flush=True)
    rtts = args.rtt if isinstance(args.rtt, list) else [args.rtt]
    r = await bench_speculate(args.target, lambda: make_drafter(v["speculate"], v["draft"]), v["draft_tokens"], rtts,
                              args.bandwidth, args.tokens, args.prompts, [k for k in args.kinds.split(",") if k],
                              args.transport, _config(args), progress)
    print(json.dumps(r) if args.json else format_speculate(r))
    return 0


async def _bench(args: argparse.Namespace) -> int:
    from .runtime.bench import KEYS, bench_chatglm_layer, bench_model

    if args.cfg_speculate not in (None, "off"):
        return await _bench_speculate(args)
    if isinstance(args.rtt, list):
        raise SystemExit("permllm bench: a list of round-trip times goes with --speculate")
    if isinstance(args.prompt_len, list):
        return await asyncio.to_thread(_scaling, args)
    if args.plot:
        raise SystemExit("permllm bench: --plot goes with a comma-separated list of prompt lengths")
    if args.target in ("smollm2", "gemma3-270m"):
        r = await bench_model(args.target, args.tokens, args.prompt_len, args.rtt, args.bandwidth, args.transport,
                              _config(args))
    else:
        r = await bench_chatglm_layer(args.tokens, args.prompt_len, args.rtt, args.bandwidth, args.dtype,
                                      route=args.route, arith=args.arith)
    if args.json:
        print(json.dumps(r))
    else:
        for k in (*KEYS, *(k for k in r if k not in KEYS)):
            print(f"{k:<28}{r[k]}")
    return 0


async def _profile(args: argparse.Namespace) -> int:
    from . import local
    from .runtime.profile import enable, format_table, plot, summarize

    link = _link(args)
    session = await local(args.model, transport=args.transport, config=_config(args), link=link)
    async with session:
        records = enable(session.trio.parties)  # type: ignore[union-attr]
        ids = session.encode(args.prompt, chat=not args.raw) if session.tokenizer else [1, 2, 3]
        [t async for t in session.generate_ids(ids, args.max_new_tokens, offline_first=True)]
        r = session.last
    s = summarize([x for rs in records for x in rs], link)
    print(format_table(s, "online"))
    print()
    print(format_table(s, "offline"))
    plot(s, args.out, title=f"{args.model}: {len(r.token_ids)} tokens, rtt {args.rtt} ms")
    print(f"\n{len(r.token_ids)} tokens, online {r.online_s:.2f} s, {r.online_hops} hops; chart: {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .net import run
    from .runtime.opsdemo import format_report, op_report

    rows = []
    for dtype in args.dtype:
        rows += run(op_report(dtype, args.transport))
    if args.json:
        print(json.dumps(rows))
    else:
        print("Each op run by model, user and helper over the", args.transport,
              "transport, checked against plaintext:\n")
        print(format_report(rows))
    return 0


def _share_args(p: argparse.ArgumentParser) -> None:
    from .runtime.config import dtype_arg

    p.add_argument("--dtype", type=dtype_arg, default="float64",
                   help="share dtype: float64, mask ratio 2^12 (float32 is refused: its masks do not hide the inputs)")
    p.add_argument("--ratio", type=float, default=None, help="mask ratio R (default 2^12)")
    p.add_argument("--route", choices=["auto", "12", "8"], default="auto",
                   help="attention route in decode: 12 or 8 online hops per layer (auto: 8 unless --arith float)")
    p.add_argument("--arith", choices=["auto", "ring", "float"], default="auto",
                   help="share arithmetic: ring (exact on Z_2^64, perfect hiding), float (real numbers), auto")


def _parser() -> argparse.ArgumentParser:
    """The ``permllm`` command line: every subcommand and its flags."""
    from .runtime.config import SPECULATE_KEYS, add_flags, add_key_flags, dtype_arg, keys_help

    ap = argparse.ArgumentParser(prog="permllm", description="Private LLM inference (PermLLM).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="private generation (all three parties here, or against daemons)")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--raw", action="store_true", help="send the prompt as is (no chat template)")
    g.add_argument("--ids", action="store_true", help="the prompt is a list of token ids")
    g.add_argument("--json", action="store_true", help="print exactly one JSON object")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prompt tokens per prefill step (default 256; 0: the whole prompt in one step): each "
                        "party then holds a few layers of one chunk's correlations, whatever the prompt length")
    g.add_argument("--transport", choices=["memory", "tcp"], default="memory",
                   help="links between the embedded parties")
    g.add_argument("--rtt", type=float, default=0.0, help="emulated round-trip time per link, ms")
    g.add_argument("--bandwidth", type=float, default=None, help="emulated bandwidth per link, Mbit/s")
    g.add_argument("--transcript", metavar="DIR", default=None,
                   help="write every array each party here receives to DIR/<role>/ (index.json + .npy) for audits; "
                        "check it with 'permllm audit DIR'")
    add_flags(g, frozenset({"user"}), serve=False)
    g.set_defaults(fn=lambda a: asyncio.run(_generate(a)))

    au = sub.add_parser("audit", help="check a transcript: is every array that should be uniform uniform?")
    au.add_argument("dir", metavar="DIR", help="a directory written by 'permllm generate --transcript DIR'")
    au.set_defaults(fn=_audit)

    parties = frozenset({"model", "helper", "user"})
    s = sub.add_parser("serve", help="run a party daemon (model party, helper, or the user's OpenAI-compatible "
                                     "endpoint)", epilog=keys_help(parties),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run the model party or the helper as a network service, or the user party as "
                                   "an OpenAI-compatible HTTP endpoint on this machine (/v1/chat/completions, "
                                   "/v1/completions, /v1/models). Links between parties are mutual TLS "
                                   "(certificates from 'permllm keys') unless --insecure. SIGTERM drains running "
                                   "sessions (the user party: requests), then exits.")
    s.add_argument("role", choices=["model", "helper", "user"])
    add_flags(s, parties)
    s.set_defaults(fn=lambda a: asyncio.run(_serve(a)))

    k = sub.add_parser("keys", help="create a deployment's CA and a certificate per party")
    k.add_argument("--out", required=True, metavar="DIR",
                   help="directory for ca.pem/ca.key and <name>.pem/<name>.key (an existing CA there is reused)")
    k.add_argument("--roles", nargs="+", choices=["model", "helper", "user"], default=["model", "helper", "user"])
    k.add_argument("--name", nargs="+", help="file name (and certificate name) per role, or several names for one "
                                            "role (e.g. --roles user --name alice bob); default: the role")
    k.add_argument("--days", type=int, default=365, help="validity of the party certificates")
    k.set_defaults(fn=_keys)

    d = sub.add_parser("demo", help="run every protocol op with all three parties and compare with plaintext")
    d.add_argument("--transport", choices=["memory", "tcp"], default="tcp")
    d.add_argument("--dtype", nargs="+", type=dtype_arg, default=["float64"], help="share dtypes to run")
    d.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    d.set_defaults(fn=_demo)

    b = sub.add_parser("bench", help="private vs plaintext, same run: smollm2, gemma3-270m or one ChatGLM-6B layer")
    b.add_argument("target", choices=["smollm2", "gemma3-270m", "chatglm6b-layer"])
    b.add_argument("--json", action="store_true")
    b.add_argument("--tokens", type=int, default=8, help="generated tokens (decode steps)")
    b.add_argument("--prompt-len", type=_prompt_lens, default=64, metavar="L[,L...]",
                   help="prompt length; a comma-separated list runs the scaling bench (smollm2, gemma3-270m): per "
                        "length, time to first token, prefill traffic and each party's peak memory")
    b.add_argument("--plot", metavar="PATH.png", default=None,
                   help="with a list of prompt lengths: write the scaling chart there")
    b.add_argument("--rtt", type=_rtts, default=0.0, metavar="MS[,MS...]",
                   help="emulated round-trip time per link, ms (a comma-separated list with --speculate)")
    b.add_argument("--bandwidth", type=float, default=None, help="emulated bandwidth per link, Mbit/s")
    b.add_argument("--transport", choices=["memory", "tcp"], default="tcp")
    add_key_flags(b, SPECULATE_KEYS)
    b.add_argument("--prompts", type=int, default=2, metavar="N",
                   help="with --speculate: the first N prompts of each kind (copying tasks, open questions; 4 each)")
    b.add_argument("--kinds", default="copy,open", metavar="KIND[,KIND]",
                   help="with --speculate: the kinds of prompt, copy (copying and extraction tasks) and/or open")
    _share_args(b)
    b.set_defaults(fn=lambda a: asyncio.run(_bench(a)))

    pr = sub.add_parser("profile", help="per-op time, bytes and hops of a private generation, with a chart")
    pr.add_argument("prompt", nargs="?", default="What is the capital of France?")
    pr.add_argument("--model", default="smollm2")
    pr.add_argument("--max-new-tokens", type=int, default=8)
    pr.add_argument("--raw", action="store_true")
    pr.add_argument("--out", default="profile.png", help="PNG chart path")
    pr.add_argument("--transport", choices=["memory", "tcp"], default="tcp")
    pr.add_argument("--rtt", type=float, default=0.0)
    pr.add_argument("--bandwidth", type=float, default=None)
    _share_args(pr)
    pr.set_defaults(fn=lambda a: asyncio.run(_profile(a)))
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``permllm`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    logging.basicConfig(level="WARNING", stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one clear line for the user, not a traceback
        from .model import ModelFileError
        from .net import NetError
        from .protocols import ProtocolError
        from .runtime.session import ContextTooLong
        if isinstance(e, (ModelFileError, NetError, ProtocolError, ContextTooLong, ValueError, OSError)):
            print(f"permllm: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
