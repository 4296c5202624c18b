"""Generated documentation pages, and the MkDocs hook that adds them to the site.

* ``reference/configuration.md``: every field of :class:`worker.settings.Settings` with its
  environment variable, flag, type, default and description.
* ``reference/cli.md``: every command of the Typer app (``worker.cli.app``), from click's own
  description of it: usage, help, arguments and options.
* ``model/experiments.md`` and ``changelog.md``: ``models/shipped/MODEL_CARD.md`` and ``CHANGELOG.md``.

The site never holds a hand-written copy, so neither can drift. ``python tools/docs_reference.py cli``
(or ``configuration``) prints a page. The hook also leaves out of the nav the pages other parts of the
project add (``OPTIONAL_PAGES``) while they do not exist, so ``mkdocs build --strict`` passes either way.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PAGES = {
    "reference/configuration.md": "configuration_markdown",
    "reference/cli.md": "cli_markdown",
    "model/experiments.md": "experiments_markdown",
    "changelog.md": "changelog_markdown",
}


def experiments_markdown() -> str:
    """The shipped model's full card (``models/shipped/MODEL_CARD.md``, shown by the web page too)."""
    card = (REPO / "models" / "shipped" / "MODEL_CARD.md").read_text()
    body = card.split("\n", 1)[1]  # its own title names the model version
    return (
        "# Experiments and the full model card\n\n"
        "The shipped model's card as it ships in `models/shipped/MODEL_CARD.md`: training recipe,\n"
        "calibration, validation, stress tests, the input-validity guard and the variants tried.\n"
        "The short form is the [model card](card.md).\n" + body
    )


def changelog_markdown() -> str:
    return (REPO / "CHANGELOG.md").read_text()


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation).replace("typing.", "").replace("pathlib.", "")
    return text.replace("pipeline.model_folder.", "")


def _cell(text: str, code: bool = False) -> str:
    """Text for a Markdown table cell: a pipe would end the cell."""
    text = text.replace("|", "\\|")
    return f"<code>{text}</code>" if code else text


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "see description" if isinstance(value, str) and value.startswith("sqlite:") else repr(value)
    if field.default is None:
        return "none"
    return str(getattr(field.default, "value", field.default))


def configuration_markdown() -> str:
    from worker.settings import Settings, env_name, flag_name

    rows = [
        "# Configuration reference",
        "",
        "Generated from the settings class (`worker/settings.py`) when the site is built. Every setting",
        "is a command-line flag (where the command uses it), an environment variable, or a `KEY=value`",
        "line of the file named by `CXR_TRIAGE_ENV_FILE`; flags win over variables, variables over the",
        "file. Put credentials in the environment or the file, never on a command line.",
        "",
        "| setting | environment variable | flag | type | default | description |",
        "|---|---|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        kind = _cell(_type_name(field.annotation), code=True)
        names = f"`{name}` | `{env_name(name)}` | `{flag_name(name)}`"
        rows.append(f"| {names} | {kind} | `{_default(field)}` | {description} |")
    return "\n".join(rows) + "\n"


def _command_markdown(command: Any, path: list[str], level: int) -> list[str]:
    name = " ".join(path)
    out = [f"{'#' * level} `{name}`", ""]
    help_text = (command.help or command.short_help or "").strip()
    if help_text:
        out += [help_text.replace("\b\n", ""), ""]
    context = type(command).context_class(command, info_name=name)
    pieces = command.collect_usage_pieces(context)
    out += ["```text", f"Usage: {name} {' '.join(pieces)}".rstrip(), "```", ""]
    params = [p for p in command.params if not getattr(p, "hidden", False) and p.name != "help"]
    if params:
        out += ["| argument / option | type | default | description |", "|---|---|---|---|"]
        for param in params:
            names = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
            default = param.default if not callable(param.default) else None
            shown = "" if default in (None, (), []) else f"`{default}`"
            text = (getattr(param, "help", None) or "").replace("\\[", "[").replace("\n", " ")
            kind = param.display_type(context) if hasattr(param, "display_type") else param.type.name
            kind = kind.replace("<", "&lt;").replace(">", "&gt;")
            out.append(f"| {names} | {_cell(kind, True)} | {shown} | {_cell(text)} |")
        out.append("")
    for sub_name, sub in sorted(getattr(command, "commands", {}).items()):
        out += _command_markdown(sub, [*path, sub_name], min(level + 1, 4))
    return out


HIDDEN_ROOT_OPTIONS = {"help", "install_completion", "show_completion"}


def cli_markdown() -> str:
    import typer

    from worker.cli.app import app

    root = typer.main.get_command(app)
    lines = [
        "# Command-line reference",
        "",
        "Generated from the command-line application (`worker/cli/app.py`) when the site is built.",
        "`cxr-triage COMMAND --help` prints the same, with each option's environment variable.",
        "",
    ]
    options = [p for p in root.params if not p.hidden and p.name not in HIDDEN_ROOT_OPTIONS]
    if options:  # options of `cxr-triage` itself (for example --version)
        root_only = type(root)(name="cxr-triage", params=options, help=root.help)
        lines += _command_markdown(root_only, ["cxr-triage"], 2)
    for name, command in root.commands.items():  # in the order `cxr-triage --help` lists them
        lines += _command_markdown(command, ["cxr-triage", name], 2)
    return "\n".join(lines) + "\n"


# -- MkDocs hooks (mkdocs.yml: hooks) ----------------------------------------------------------------
OPTIONAL_PAGES = ("architecture.md", "web.md", "security.md", "sites.md", "dicom-results.md")


def _prune(nav: list, docs_dir: Path) -> list:
    kept = []
    for entry in nav:
        if isinstance(entry, dict):
            (title, target), = entry.items()
            if isinstance(target, list):
                kept.append({title: _prune(target, docs_dir)})
            elif target not in OPTIONAL_PAGES or (docs_dir / target).is_file():
                kept.append(entry)
        elif entry not in OPTIONAL_PAGES or (docs_dir / entry).is_file():
            kept.append(entry)
    return kept


def on_config(config: Any) -> Any:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    config["nav"] = _prune(config["nav"], Path(config["docs_dir"]))
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for uri, function in PAGES.items():
        files.append(File.generated(config, uri, content=globals()[function]()))
    return files


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "cli"
    sys.path.insert(0, str(REPO))
    print(configuration_markdown() if which == "configuration" else cli_markdown())
