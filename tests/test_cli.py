"""The command line's face: every verb explains itself, the study file has one name everywhere."""

from __future__ import annotations

import argparse

import pytest

from hsat.cli import build_parser


def _verbs(parser: argparse.ArgumentParser, name: str = "hsat"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield f"{name} {verb}", sub
                yield from _verbs(sub, f"{name} {verb}")


def test_every_verb_has_a_description_for_its_help():
    verbs = dict(_verbs(build_parser()))
    assert {"hsat embed", "hsat sanity", "hsat attention", "hsat language", "hsat mil", "hsat report tables"} <= set(verbs)
    missing = [name for name, sub in verbs.items() if not sub.description]
    assert not missing, f"no description in --help: {missing}"
    assert "Tables 1-5" in verbs["hsat report tables"].format_help()


@pytest.mark.parametrize("argv, dest, value", [
    (["config", "show", "--study", "a.yaml", "--configfile", "b.yaml"], "study", ["a.yaml", "b.yaml"]),
    (["pretrain", "--run-config", "r.yaml", "--out", "o"], "config", "r.yaml"),
    (["pretrain", "--config", "r.yaml", "--out", "o"], "config", "r.yaml"),  # the old name
    (["pretrain", "--study", "s.yaml", "--model", "m", "--out", "o"], "study", "s.yaml"),
    (["mil", "--embeddings", "e", "--study", "s.yaml", "--model", "m", "--out", "o.csv"], "study", "s.yaml"),
    (["report", "tables", "--config", "s.yaml", "--whitebox", "w", "--transfer", "t", "--out-dir", "o"], "study", "s.yaml"),
])
def test_the_study_file_is_study_everywhere_and_old_names_still_work(argv, dest, value):
    got = getattr(build_parser().parse_args(argv), dest)
    assert (list(map(str, got)) if isinstance(got, list) else str(got)) == value
