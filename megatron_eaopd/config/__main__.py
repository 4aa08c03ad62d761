"""Print a resolved config, or the markdown field reference of the schema.

python -m megatron_eaopd.config --config configs/tiny-cpu.yaml loss.objective=opd
python -m megatron_eaopd.config --reference      # the table in docs/configs.md
"""

from __future__ import annotations

import sys

import yaml

from megatron_eaopd.config.loader import (
    ConfigError,
    build_arg_parser,
    config_to_dict,
    describe_fields,
    load_config,
)


def reference_markdown() -> str:
    """The field reference as markdown: one table per top-level section."""
    lines: list[str] = [
        "### top level",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for path, tp, default, doc in describe_fields():
        if tp == "section":
            if "." not in path:
                lines += ["", f"### `{path}`", "", doc, ""]
                lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
            else:
                lines.append(f"| `{path}` | section | | {doc} |")
            continue
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...")
        shown = shown.strip().replace("|", "\\|")
        typ = tp.replace("|", "\\|")
        lines.append(f"| `{path}` | {typ} | `{shown}` | {doc.replace('|', '/')} |")
    return "\n".join(lines).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``--reference`` or ``--config FILE [overrides]``."""
    parser = build_arg_parser("python -m megatron_eaopd.config")
    parser.add_argument("--reference", action="store_true", help="print the field reference")
    args = parser.parse_args(argv)
    if args.reference:
        sys.stdout.write(reference_markdown())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
