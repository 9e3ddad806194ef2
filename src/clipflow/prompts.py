"""Prompt templates: the text around the one place a label goes, as evaluation and serving fill them.

On the ground floor, beside `clipflow.params`, so the templates in params.yaml can be checked
when params load, and the served `classify` checks a client's templates with the same rule.
"""

from __future__ import annotations

import string

from clipflow.errors import ClipflowError


def split_template(template: str) -> tuple[str, str]:
    """The text of a prompt template before and after its label, with `{{` and `}}` unescaped.

    A template holds the label exactly once, as `{}` with no name, conversion or format spec:
    a spec could pad a prompt to any length (`{:x>40000000}`) or cut the label (`{:.1}`). The
    label is then put between the two parts as it is, never through `str.format`.

    Raises:
        ClipflowError: the template has no `{}`, more than one field, or a field that is not `{}`.
    """
    shown = template if len(template) <= 80 else template[:77] + "..."
    problem = f"template {shown!r} must contain '{{}}' exactly once for the label"
    hint = "with no name, conversion or format spec (write literal braces as '{{' and '}}')"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone '{' or '}'
        raise ClipflowError(f"{problem}: {exc} ({hint})") from None
    fields = [i for i, (_, name, _, _) in enumerate(parts) if name is not None]
    if len(fields) != 1 or parts[fields[0]][1:] != ("", "", None):
        raise ClipflowError(f"{problem}, {hint}")
    before = "".join(literal for literal, *_ in parts[: fields[0] + 1])
    after = "".join(literal for literal, *_ in parts[fields[0] + 1 :])
    return before, after
