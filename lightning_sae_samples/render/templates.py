"""Where report templates live and the Jinja environment that renders them.

The shipped templates sit in the top-level ``templates/`` folder of a source checkout and are
packaged into the wheel as ``lightning_sae_samples/templates``. A user ``template_dir`` is searched
first, so a user can override one template and keep the shipped other one.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Optional, Union

import jinja2

from lightning_sae_samples.render import escaping

PACKAGE_DIR = Path(__file__).resolve().parent.parent
MARKDOWN_TEMPLATE = "report.md.j2"
HTML_TEMPLATE = "report.html.j2"
#: The index page of a run of many SAEs, linking each SAE's report.
RUN_INDEX_MARKDOWN_TEMPLATE = "run_index.md.j2"
RUN_INDEX_HTML_TEMPLATE = "run_index.html.j2"


class TemplateNotFoundError(FileNotFoundError):
    """The shipped templates or a user template directory cannot be found."""


def shipped_template_dir() -> Path:
    """The folder holding the shipped templates.

    Installed wheels hold them in ``<package>/templates``; an editable install or a source checkout
    uses ``<repo>/templates``.

    Raises:
        TemplateNotFoundError: Neither location holds the report templates.
    """
    candidates = (PACKAGE_DIR / "templates", PACKAGE_DIR.parent / "templates")
    for candidate in candidates:
        if (candidate / MARKDOWN_TEMPLATE).is_file():
            return candidate
    raise TemplateNotFoundError(
        f"The report templates are missing: looked in {candidates[0]} and {candidates[1]}."
        " Reinstall lightning-sae-samples, or pass `template_dir=` with report.md.j2 and report.html.j2."
    )


def _csp_hash(script: str) -> str:
    digest = hashlib.sha256(str(script).encode("utf-8")).digest()
    return "sha256-" + base64.b64encode(digest).decode("ascii")


def make_environment(template_dir: Optional[Union[str, os.PathLike]] = None) -> jinja2.Environment:
    """A Jinja environment that loads ``template_dir`` first, then the shipped templates.

    HTML templates (``*.html.j2``) are autoescaped; Markdown templates are not, and must print
    token text through the ``md`` filter (or use the pre-escaped fields the renderer provides).

    Args:
        template_dir: Optional folder of user templates overriding shipped ones by file name.

    Raises:
        TemplateNotFoundError: ``template_dir`` is not a directory.
    """
    loaders: list[jinja2.BaseLoader] = []
    if template_dir is not None:
        if not Path(template_dir).is_dir():
            raise TemplateNotFoundError(
                f"`template_dir` {template_dir} is not a directory. Pass a folder holding report.md.j2"
                " and/or report.html.j2, or leave it out to use the shipped templates."
            )
        loaders.append(jinja2.FileSystemLoader(str(template_dir)))
    loaders.append(jinja2.FileSystemLoader(str(shipped_template_dir())))
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2", "htm", "xml")),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["visible"] = escaping.visible
    env.filters["label"] = escaping.token_label
    env.filters["md"] = escaping.markdown_text
    env.filters["md_emphasis"] = escaping.markdown_emphasis
    env.filters["csp_hash"] = _csp_hash
    return env
