"""The command line as a user runs it (subprocesses, real stdin/stdout)."""

import os
import subprocess
import sys

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


def test_bad_arguments_fail_with_a_message():
    r = run("generate", "x", "--model", TINY, "--temperature", "-1", "--max-model-len", "64")
    assert r.returncode != 0 and "temperature" in r.stderr
    r = run("generate", "x", "--model", "no/such/model")
    assert r.returncode != 0 and "cannot load model" in r.stderr
