"""docs/config.md is generated from base_config() and the comments beside each field; the committed file must equal
the generator's output, so a field or comment changed without regenerating fails here."""

import ast
import pathlib

from oefsmc_jax import config_reference
from oefsmc_jax.config_defaults import base_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_committed_config_reference_is_up_to_date():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_reference.markdown(), \
        f"docs/config.md is out of date: regenerate it with `{config_reference.COMMAND}`"


def test_every_field_and_method_sub_config_is_listed():
    text = config_reference.markdown()
    for section in ("data", "oe", "train", "optim", "eval", "method.practise", "method.fskd", "method.cd"):
        assert f"`{section}`" in text
    assert "| `method.cd.iters` | `3000` |" in text and "| `oe.heldout` | `1000` |" in text
    assert "| `train.device_pool_mb` | `2048` | MiB, the threshold of host_batches=auto |" in text
    assert all(f"`{k}." in text or f"`{k}`" in text for k in base_config())


def test_comments_attach_to_their_fields():
    src = '''def f(c):
    c.a = 1  # first
    # its continuation
    c.b = 2  # second

    # lead-in of c
    c.c = 3
    c.d = 4  # fourth
    # lead-in of e, whose own line has no comment
    c.e = 5
'''
    fields = config_reference.field_comments(src, ast.parse(src).body, "c")
    assert [(f.path, f.comment) for f in fields] == [
        ("a", "first its continuation"), ("b", "second"), ("c", "lead-in of c."), ("d", "fourth"),
        ("e", "lead-in of e, whose own line has no comment.")]


def test_check_names_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("# old\n")
    assert config_reference.main(["--check", str(stale)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {stale} is out of date; regenerate it with `{config_reference.COMMAND}`"
    stale.write_text(config_reference.markdown())
    assert config_reference.main(["--check", str(stale)]) == 0
