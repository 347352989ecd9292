"""Write docs/api.md from the code: each trainer's docstring and signature, each config's fields (type, default,
help), the shared fields, and the public functions of `losses`, `teacher`, `models`, `vocabulary`, `addition` and
`testing`.

    python scripts/api_reference.py            # rewrite docs/api.md
    python scripts/api_reference.py --check    # exit 1 if docs/api.md is out of date (tests/test_docs.py runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path

import trl_distill
from trl_distill import addition, losses, models, teacher, testing, vocabulary
from trl_distill.trainers._common import DistillArguments
from trl_distill.trainers._teacher import TeacherArguments

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"

PAIRS = [  # (trainer, config, TRL parent pair, page)
    ("GKDVariant", "GKDVariantConfig", "GKDTrainer / GKDConfig", "gkd_variant.md"),
    ("OKDTrainer", "OKDConfig", "SFTTrainer / SFTConfig", "okd.md"),
    ("DistillDPOTrainer", "DistillDPOConfig", "DPOTrainer / DPOConfig", "distill_dpo.md"),
    ("ADPOTrainer", "ADPOConfig", "DPOTrainer / DPOConfig", "adpo.md"),
    ("REDITrainer", "REDIConfig", "DPOTrainer / DPOConfig", "redi.md"),
]
MODULES = [
    (losses, "Pure loss functions; see [losses.md](losses.md)."),
    (teacher, "Teacher loading (4-bit, LoRA); also re-exports the names of `models` and `vocabulary`."),
    (models, "What the trainers need to know about any causal LM, student or teacher."),
    (vocabulary, "Student/teacher vocabulary checks; see [teacher.md](teacher.md#vocabulary-checks)."),
    (addition, "The shipped addition task: data, tokenizer, rewards, metric."),
    (testing, "Tiny offline models for tests, examples and benchmarks."),
]


def _own_fields(config: type) -> list[dataclasses.Field]:
    """The fields a class declares itself (not those of TrainingArguments / the TRL config it extends)."""
    names = vars(config).get("__annotations__", {})
    return [f for f in dataclasses.fields(config) if f.name in names]


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def _annotation(config: type, name: str) -> str:
    """The annotation as written in the class (`HfArgumentParser` rewrites `Field.type` in place)."""
    for base in config.__mro__:
        if name in vars(base).get("__annotations__", {}):
            annotation = vars(base)["__annotations__"][name]
            return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return "?"


def _fields_table(config: type) -> str:
    rows = ["| field | type | default | help |", "|---|---|---|---|"]
    for f in _own_fields(config):
        help_text = f.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{f.name}` | `{_annotation(config, f.name)}` | `{_default(f)}` | {help_text} |")
    return "\n".join(rows)


def _doc(obj) -> str:
    return textwrap.dedent(inspect.getdoc(obj) or "").strip()


def _first_paragraph(obj) -> str:
    return _doc(obj).split("\n\n")[0].replace("\n", " ")


def _public_functions(module) -> list[tuple[str, object]]:
    members = []
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value) or inspect.isclass(value):
            members.append((name, value))
    return sorted(members)


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def render() -> str:
    out = [
        "# API reference",
        "",
        "Generated from the code by `python scripts/api_reference.py` (a test fails when this page is out of date).",
        "Each config extends its TRL config: every TRL field keeps its meaning and is documented in TRL; the tables",
        "list only the fields trl-distill adds. Every trainer also takes the shared fields below.",
        "",
        "## Shared fields (every config)",
        "",
        _first_paragraph(DistillArguments),
        "",
        _fields_table(DistillArguments),
        "",
        "## Teacher fields (every config with a teacher: GKDVariant, OKD, DistillDPO, ADPO)",
        "",
        _first_paragraph(TeacherArguments),
        "",
        _fields_table(TeacherArguments),
        "",
    ]
    for trainer_name, config_name, parents, page in PAIRS:
        trainer, config = getattr(trl_distill, trainer_name), getattr(trl_distill, config_name)
        out += [
            f"## `{trainer_name}` / `{config_name}`",
            "",
            f"Extends TRL's `{parents}`. Guide: [{page}]({page}).",
            "",
            "```python",
            f"{trainer_name}{_signature(trainer.__init__).replace('(self, ', '(', 1)}",
            "```",
            "",
            _doc(trainer),
            "",
            f"### `{config_name}` fields",
            "",
            _fields_table(config),
            "",
        ]
    for module, summary in MODULES:
        out += [f"## `{module.__name__}`", "", summary, ""]
        for name, value in _public_functions(module):
            out += [f"- `{name}{_signature(value)}`: {_first_paragraph(value)}"]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md differs from the code")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOCS.exists() or DOCS.read_text() != text:
            print(f"{DOCS} is out of date: run `python scripts/api_reference.py`.", file=sys.stderr)
            return 1
        return 0
    DOCS.write_text(text)
    print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
