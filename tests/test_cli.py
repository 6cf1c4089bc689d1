"""The command line as a user runs it (subprocesses, real stdin/stdout), and which flags reach
the engine (in-process)."""

import argparse
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "tests", "data", "tiny", "llama3")


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "imp_jax.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_generate_prints_text_and_speed():
    r = run("generate", "hello world", "--model", TINY, "--max-tokens", "6",
            "--max-model-len", "64")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello world")
    assert "tokens/s" in r.stderr and "time to first token" in r.stderr


def test_chat_streams_answers_until_empty_line():
    r = run("chat", "--model", TINY, "--max-tokens", "4", "--max-model-len", "128",
            stdin="hi\nand again\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("time to first token") == 2  # one report per answer
    # a turn that fits alone but not after the history starts a new conversation; one that
    # never fits is skipped with a message; a setting that can never answer fails at once
    r = run("chat", "--model", TINY, "--max-tokens", "4", "--max-model-len", "64",
            stdin="hi\n" + "word " * 20 + "\n" + "word " * 80 + "\n\n")
    assert r.returncode == 0, r.stderr
    assert "starting a new one" in r.stderr and "do not fit --max-model-len 64" in r.stderr
    assert r.stderr.count("time to first token") == 2 and "Traceback" not in r.stderr
    r = run("chat", "--model", TINY, "--max-model-len", "64", stdin="hi\n\n")  # 256 tokens
    assert r.returncode == 2 and "--max-tokens 256 leaves no room" in r.stderr


def test_bad_arguments_fail_with_a_message(tmp_path):
    r = run("generate", "x", "--model", TINY, "--temperature", "-1", "--max-model-len", "64")
    assert r.returncode != 0 and "temperature" in r.stderr
    r = run("generate", "x", "--model", "no/such/model")
    assert r.returncode != 0 and "cannot load model" in r.stderr
    # every subcommand: one line naming the problem, exit 2, no traceback
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "method": "POST", "url": '
                                       '"/v1/completions", "body": {"prompt": "x"}}\n')
    for args, says in ((("serve", "no/such/model"), "imp-jax serve: error: cannot load model"),
                       (("serve", "no/such/model", "--log-level", "trace"),  # uvicorn's level
                        "imp-jax serve: error: cannot load model"),
                       (("batch", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                         "--model", "no/such/model"), "imp-jax batch: error: cannot load model"),
                       (("info", "llama-7b"), "imp-jax info: error: cannot load model"),
                       (("serve", TINY, "--port", "99999"), "'99999' is not a TCP port"),
                       (("generate", "x", "--model", TINY, "--dtype", "int8"),
                        "dtype 'int8' is not supported")):
        r = run(*args)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, \
            (args, r.stderr[-800:])


class _Built(Exception):
    """Raised by the stand-in LLM below once it has the arguments a command built it with."""


@pytest.mark.parametrize("command", ["generate", "chat", "bench", "batch", "serve"])
def test_quantization_flags_reach_the_llm(command, monkeypatch, tmp_path):
    """Every command that loads a model passes --quantization and --quant-policy on to LLM
    (LLM(quant_policy=) itself is tested with real models in test_quant / test_checkpoints)."""
    import imp_jax
    import imp_jax.llm
    from imp_jax import quant
    from imp_jax.cli import add_quantization_args

    got = {}

    def record(*args, **kwargs):
        got.update(kwargs)
        raise _Built

    monkeypatch.setattr(imp_jax, "LLM", record)
    monkeypatch.setattr(imp_jax.llm, "LLM", record)
    flags = ["--quantization", "int8", "--quant-policy", "all,keep_first=1"]
    inp = tmp_path / "in.jsonl"
    inp.write_text("")
    if command in ("generate", "chat"):
        from imp_jax.cli import main
        argv = [command] + (["hi"] if command == "generate" else []) + ["--model", "random:tiny"]
    elif command == "bench":
        from imp_jax.bench import main
        argv = ["latency", "--model", "random:tiny"]
    elif command == "batch":
        from imp_jax.batch import main
        argv = [str(inp), "-o", str(tmp_path / "out.jsonl"), "--model", "random:tiny"]
    else:
        from imp_jax.server.cli import main
        argv = ["random:tiny"]
    with pytest.raises(_Built):
        main(argv + flags)
    assert got["quantization"] == "int8" and got["quant_policy"] == "all,keep_first=1"
    p = argparse.ArgumentParser()
    add_quantization_args(p)
    assert tuple(p._option_string_actions["--quantization"].choices) == quant.MODES
