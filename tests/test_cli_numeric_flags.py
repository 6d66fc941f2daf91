"""Every numeric flag of every subcommand at 0, -1, NaN and a huge value: argparse refuses what is out of
range (one line naming the flag and where --help is, exit 2); what it accepts runs to the end or to a
one-line error. Never a traceback. The flags are found by walking the parser, so a new flag is covered."""

from __future__ import annotations

import argparse
import socket

import pytest

from edge_runtime.cli import build_parser, main

VALUES = ("0", "-1", "nan", "99999999999999999999")
RANGED = ("integer", "number")  # the __name__ of edge_runtime.cli_args's parsers


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*prefix, name))
            return
    yield prefix, parser


def _numeric_flags():
    out = []
    for path, sub in _subcommands(build_parser()):
        for action in sub._actions:
            if action.type is not None and action.option_strings:
                out.append((path, action.option_strings[0], action.type))
    return out


FLAGS = _numeric_flags()


def test_every_typed_flag_is_ranged():
    assert len(FLAGS) > 40
    assert [f for f in FLAGS if getattr(f[2], "__name__", "") not in RANGED] == []


@pytest.fixture(scope="module")
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "t.txt"
    p.write_text("The old man looked at the sea and the sea looked back at him. " * 8)
    return p


def _argv(path: tuple[str, ...], flag: str, value: str, tmp_path, text_file, taken_port) -> list[str]:
    """The subcommand with its required arguments, kept cheap, and the flag under test."""
    cmd = path[0]
    base = {
        "convert": [str(tmp_path / "no-hf"), str(tmp_path / "out")],
        "generate": ["--prompt", "The", "--max-new-tokens", "2", "--backend", "cpu"],
        "eval": ["--text", str(text_file), "--max-tokens", "16", "--window", "8", "--backend", "cpu"],
        "serve": ["--port", str(taken_port)],  # taken: refused with one line before anything loads
        "chat": ["--model", str(tmp_path / "no-model")],  # chat would read stdin; stop at the load
        "calibrate": ["--model", str(tmp_path / "no-model"), "--text", str(text_file)],
        "profile": ["--profile", "cpu-generic"],
        "monitor": ["--duration", "0.1"],
        "bench": ["--tokens", "2", "--repeats", "1", "--backend", "cpu"],
        "demo": ["--json"],
        "export-onnx": [str(tmp_path / "no-model"), str(tmp_path / "out.onnx")],
    }[cmd]
    return [*path, *base, flag, value]  # argparse keeps the last occurrence of a repeated flag


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize(("path", "flag", "parse"), FLAGS, ids=[f"{' '.join(p)} {f}" for p, f, _ in FLAGS])
def test_numeric_flag(capsys, tmp_path, text_file, taken_port, path, flag, parse, value):
    try:
        parse(value)
        accepted = True
    except argparse.ArgumentTypeError:
        accepted = False
    argv = _argv(path, flag, value, tmp_path, text_file, taken_port)
    if not accepted:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"edge-runtime {' '.join(path)}: error: argument {flag}")
        assert "Traceback" not in err
        return
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code != 0:
        assert code == 2
        errors = [line for line in err.splitlines() if line.startswith("edge-runtime: error:")]
        assert len(errors) == 1, err
